"""Running one task under its retry policy: the decisions both drivers share.

The drivers keep only the loop itself and how the function is invoked and how they wait;
what an attempt, a failure, an exhausted policy or an interruption means is decided here.
What the driver must say or do besides (log, call hooks, run the task's own callbacks) is
kept in ``events`` for it, in order: it takes them after each call, before it goes on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tenacity import DoSleep, RetryCallState, Retrying, stop_when_event_set

from ..errors import ResultRefused, TimeLimitExceeded
from ..task import TaskContext
from .events import (
    AttemptEnded,
    AttemptFailed,
    AttemptStarted,
    CallbackDue,
    Clock,
    LimitReached,
    Outbox,
    RetryScheduled,
    RunningLong,
    TaskExhausted,
    TaskFenced,
    TaskInterrupted,
)
from .lease import Lease
from .outcomes import (
    Aborted,
    Acked,
    DeadLettered,
    DeadLetterReason,
    Fenced,
    Outcome,
    Prepared,
    dead_letter_header,
    describe_error,
)

#: Pause between exhausted rounds of an ``on_exhausted="block"`` task whose policy has no wait.
BLOCK_MIN_PAUSE = 0.1


class TaskExit(Exception):
    """A task raised SystemExit or another BaseException: recorded as its failure."""


class TaskRun:
    """One task's attempts. Tenacity is consulted only after a failure, through its decision
    core (``Retrying.iter``): a task that succeeds at once, as most do, costs no retry
    bookkeeping at all."""

    def __init__(self, prepared: Prepared, lease: Lease, clock: Clock, *, max_wait: float | None = None) -> None:
        self.fn = prepared.func
        #: A cap on the wait between attempts (the worker's ``max_retry_wait``).
        self.max_wait = max_wait
        self.record = prepared.record
        self.ctx = prepared.context
        self.lease = lease
        self.clock = clock
        self.events = Outbox()
        self.policy = self.fn.policy
        self.attempts = 0
        self._retrying: Retrying | None = None
        self._state: RetryCallState | None = None
        #: Seconds from an attempt's start to its interruption, and to the warning that it runs
        #: long; the drivers time them, the how (a thread's exception, a cancel) is theirs.
        self.time_limit = prepared.time_limit
        self.time_warning = prepared.time_warning
        self.results = prepared.results
        self.started = 0.0
        self._warned = 0  # the attempt the running-long warning was logged for

    def begin(self) -> TaskContext | None:
        """Start an attempt: the context the function runs with, or None if the lease was
        lost or the worker is stopping."""
        if self.lease.abort.is_set() or self.lease.lapsed(self.clock.monotonic()):
            return None
        if self.attempts == 0:
            # Under the lease's gate: a halt that has returned (and been confirmed to an
            # operator's pause) is never followed by a first attempt here.
            with self.lease.gate:
                if self.lease.halted:
                    return None
                self.attempts = 1
        else:
            self.attempts += 1
        self.lease.attempt, self.lease.retry_at_ms = self.attempts, 0
        self.started = self.clock.monotonic()
        if self.attempts > 1:
            self.ctx = replace(self.ctx, attempt=self.attempts)
        self.events.put(AttemptStarted(self.ctx))
        return self.ctx

    def after_failure(self, exc: BaseException) -> Outcome | float:
        """Record a failed attempt; returns seconds to wait before the next attempt, or the
        final outcome. The driver re-raises its own control flow (asyncio's cancellation)
        before it gets here."""
        if isinstance(exc, TimeLimitExceeded) and not exc.args:  # raised by class in a thread
            exc.args = (f"the attempt ran past its time limit of {self.time_limit:g}s",)
        duration = self.clock.monotonic() - self.started
        self.events.put(AttemptFailed(self.ctx, exc))
        self.events.put(AttemptEnded(self.ctx, "fenced" if self.lease.lost else "failed", duration))
        if self.fn.on_error is not None:
            self.events.put(CallbackDue("on_error", self.fn.on_error, (exc, self.ctx, self.fn), self.ctx))
        # SystemExit and friends from a task are the task's failure, not the worker's end. A
        # time limit stays itself, so that the policy and the dead letter can tell it apart.
        failure = exc if isinstance(exc, (Exception, TimeLimitExceeded)) else TaskExit(describe_error(exc))
        if self._retrying is None:
            self._retrying = Retrying(
                stop=self.policy.stop | stop_when_event_set(self.lease.abort),  # type: ignore[arg-type]
                wait=self.policy.wait,
                retry=self.policy.retry,
                reraise=True,
            )
            self._retrying.begin()
            self._state = RetryCallState(self._retrying, fn=None, args=(), kwargs={})
        else:
            assert self._state is not None
            self._state.prepare_for_next_attempt()
        assert self._state is not None
        self._state.set_exception((type(failure), failure, failure.__traceback__))
        try:
            action = self._retrying.iter(self._state)
        except (Exception, TimeLimitExceeded) as final:  # stop reached or not retryable: re-raised
            return self._exhausted(final)
        if not isinstance(action, DoSleep):  # pragma: no cover - tenacity always sleeps after a failure
            raise RuntimeError(f"unexpected retry action {action!r}")
        wait = self._capped(float(action))
        self.events.put(RetryScheduled(self.ctx, failure, wait, self.attempts))
        self._retry_in(wait)
        return wait

    def _capped(self, wait: float) -> float:
        return wait if self.max_wait is None else min(wait, self.max_wait)

    def _retry_in(self, seconds: float) -> None:
        """Note when the next attempt starts, for the heartbeat to tell a status read."""
        self.lease.retry_at_ms = int(self.lease.redis_now_ms(self.clock.monotonic()) + seconds * 1000)

    def _exhausted(self, exc: BaseException) -> Outcome | float:
        if self.lease.abort.is_set():
            return self.interrupted()
        if self.fn.on_exhausted == "block":
            pause = max(float(self.policy.wait(self._state)) if self._state else 0.0, BLOCK_MIN_PAUSE)
            self._retrying = None  # a fresh round of the policy after the pause
            self.events.put(RetryScheduled(self.ctx, exc, pause, self.attempts, blocking=True))
            self._retry_in(pause)
            return pause
        self.events.put(TaskExhausted(self.ctx, exc, self.attempts))
        return self._dead_letter("exhausted", exc)

    def _dead_letter(self, reason: DeadLetterReason, error: BaseException) -> DeadLettered:
        """The dead letter of this task after its attempts, saying ``reason`` and ``error``."""
        header = dead_letter_header(
            reason,
            replica=self.ctx.replica,
            deliveries=self.ctx.deliveries,
            attempts=self.attempts,
            name=self.ctx.name,
            error=error,
            at_ms=self.clock.wall_ms(),
        )
        return DeadLettered(header, context=self.ctx)

    def running_long(self) -> None:
        """The driver's timer says the attempt passed ``time_warning``: say so, once."""
        if self._warned == self.attempts:
            return
        self._warned = self.attempts
        elapsed = round(self.clock.monotonic() - self.started, 3)
        self.events.put(RunningLong(self.ctx, self.attempts, elapsed, self.time_warning, self.time_limit))

    def limit_reached(self) -> None:
        """The driver's timer says the attempt passed ``time_limit``; the driver interrupts it."""
        elapsed = round(self.clock.monotonic() - self.started, 3)
        self.events.put(LimitReached(self.ctx, self.attempts, elapsed, self.time_limit))

    def _fenced(self) -> Outcome:
        if self.lease.revoked and self.ctx.id in self.lease.skipped.split():
            self.events.put(TaskFenced(self.ctx, self.attempts, self.lease.lost_reason, skipped=True))
            return Fenced(ran=False)  # dead-lettered by the operator: nothing to report
        if self.attempts:
            self.events.put(TaskFenced(self.ctx, self.attempts, self.lease.lost_reason, skipped=False))
        return Fenced(ran=self.attempts > 0)

    def interrupted(self) -> Outcome:
        if self.lease.lost:
            return self._fenced()
        if self.attempts == 0:
            return Aborted(ran=False)  # halted by an operator before it started
        self.events.put(TaskInterrupted(self.ctx))
        return Aborted()

    def cancelled(self) -> None:
        """The driver cancelled the running attempt (an asyncio stop past its deadline)."""
        self.events.put(AttemptEnded(self.ctx, "cancelled", self.clock.monotonic() - self.started))

    def succeeded(self, result: Any) -> Outcome:
        fenced = self.lease.lost or self.lease.lapsed(self.clock.monotonic())
        duration = self.clock.monotonic() - self.started
        self.events.put(AttemptEnded(self.ctx, "fenced" if fenced else "succeeded", duration))
        if fenced:
            return self._fenced()
        stored: tuple[int, bytes] | None = None
        if self.results is not None:
            encoded = self._encode_result(result)
            if isinstance(encoded, DeadLettered):
                return encoded
            stored = encoded
        if self.fn.on_success is not None:
            self.events.put(CallbackDue("on_success", self.fn.on_success, (result, self.ctx, self.fn), self.ctx))
        return Acked(stored)

    def _encode_result(self, result: Any) -> tuple[int, bytes] | DeadLettered:
        """The result to store with the acknowledgement, or the dead letter of a task whose
        result cannot be kept: a caller waiting for it must hear why, not wait in vain."""
        spec = self.results
        assert spec is not None
        try:
            payload = spec.serializer.dumps(result)
        except Exception as exc:
            error: BaseException = ResultRefused(
                f"the result of {self.ctx.name} cannot be stored: {type(spec.serializer).__name__} "
                f"refused it ({describe_error(exc)})"
            )
        else:
            if len(payload) <= spec.max_bytes:
                return (spec.ttl_ms, payload)
            error = ResultRefused(
                f"the result of {self.ctx.name} is {len(payload):,} bytes encoded, more than "
                f"result_max_bytes ({spec.max_bytes:,}): return less, or keep it elsewhere and return where"
            )
        return self._dead_letter("result-refused", error)
