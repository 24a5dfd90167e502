"""Running one task under its retry policy: the decisions both drivers share.

The drivers keep only the loop itself and how the function is invoked and how they wait;
what an attempt, a failure, an exhausted policy or an interruption means is decided here.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from tenacity import DoSleep, RetryCallState, Retrying, stop_when_event_set

from .. import hooks
from ..errors import TimeLimitExceeded
from ..logs import debug_enabled, log
from ..task import TaskContext
from .lease import Lease
from .outcomes import Aborted, Acked, DeadLettered, Fenced, Outcome, Prepared, dead_letter_header, describe_error

#: Pause between exhausted rounds of an ``on_exhausted="block"`` task whose policy has no wait.
BLOCK_MIN_PAUSE = 0.1


class TaskExit(Exception):
    """A task raised SystemExit or another BaseException: recorded as its failure."""


def call_hook(hook: Any, *args: Any, event: str, ctx: TaskContext) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("pyfiq.callback_failed", callback=event, task_id=ctx.id, queue=ctx.queue)


class TaskRun:
    """One task's attempts. Tenacity is consulted only after a failure, through its decision
    core (``Retrying.iter``): a task that succeeds at once, as most do, costs no retry
    bookkeeping at all."""

    def __init__(self, prepared: Prepared, lease: Lease) -> None:
        self.fn = prepared.func
        self.record = prepared.record
        self.ctx = prepared.context
        self.lease = lease
        self.policy = self.fn.policy
        self.attempts = 0
        self._retrying: Retrying | None = None
        self._state: RetryCallState | None = None
        self._logger: Any = None
        #: Seconds from an attempt's start to its interruption, and to the warning that it runs
        #: long; the drivers time them, the how (a thread's exception, a cancel) is theirs.
        self.time_limit = prepared.time_limit
        self.time_warning = prepared.time_warning
        self.started = 0.0
        self._warned = 0  # the attempt the running-long warning was logged for

    @property
    def logger(self) -> Any:
        # Bound on first use: binding costs more than a no-op task.
        if self._logger is None:
            self._logger = log.bind(
                queue=self.ctx.queue,
                stream=self.ctx.stream,
                task_id=self.ctx.id,
                task=self.ctx.name,
                deliveries=self.ctx.deliveries,
                fencing_token=self.ctx.fencing_token,
            )
        return self._logger

    def begin(self) -> TaskContext | None:
        """Start an attempt: the context the function runs with, or None if the lease was
        lost or the worker is stopping."""
        if self.lease.abort.is_set() or self.lease.lapsed():
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
        self.started = time.monotonic()
        if self.attempts > 1:
            self.ctx = replace(self.ctx, attempt=self.attempts)
        hooks.emit("before_execution", self.ctx)
        return self.ctx

    def after_failure(self, exc: BaseException) -> Outcome | float:
        """Record a failed attempt; returns seconds to wait before the next attempt, or the
        final outcome. The driver re-raises its own control flow (asyncio's cancellation)
        before it gets here."""
        if isinstance(exc, TimeLimitExceeded) and not exc.args:  # raised by class in a thread
            exc.args = (f"the attempt ran past its time limit of {self.time_limit:g}s",)
        outcome = "fenced" if self.lease.lost else "failed"
        hooks.emit("on_failure", self.ctx, exc)
        hooks.emit("after_execution", self.ctx, outcome, time.monotonic() - self.started)
        call_hook(self.fn.on_error, exc, self.ctx, self.fn, event="on_error", ctx=self.ctx)
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
        self.logger.info(
            "pyfiq.task_retry_scheduled", attempt=self.attempts, wait=float(action), error=describe_error(failure)
        )
        hooks.emit("on_retry", self.ctx, failure, float(action))
        return float(action)

    def _exhausted(self, exc: BaseException) -> Outcome | float:
        if self.lease.abort.is_set():
            return self.interrupted()
        if self.fn.on_exhausted == "block":
            pause = max(float(self.policy.wait(self._state)) if self._state else 0.0, BLOCK_MIN_PAUSE)
            self.logger.error(
                "pyfiq.task_blocking_queue", attempts=self.attempts, error=describe_error(exc), retry_in=pause
            )
            self._retrying = None  # a fresh round of the policy after the pause
            hooks.emit("on_retry", self.ctx, exc, pause)
            return pause
        self.logger.error(
            "pyfiq.task_dead_lettered", reason="exhausted", attempts=self.attempts, error=describe_error(exc)
        )
        return DeadLettered(
            dead_letter_header(
                "exhausted",
                replica=self.ctx.replica,
                deliveries=self.ctx.deliveries,
                attempts=self.attempts,
                name=self.ctx.name,
                error=exc,
            ),
            context=self.ctx,
        )

    def running_long(self) -> None:
        """The driver's timer says the attempt passed ``time_warning``: say so, once."""
        if self._warned == self.attempts:
            return
        self._warned = self.attempts
        self.logger.warning(
            "pyfiq.task_running_long",
            attempt=self.attempts,
            elapsed=round(time.monotonic() - self.started, 3),
            time_warning=self.time_warning,
            time_limit=self.time_limit,
        )

    def limit_reached(self) -> None:
        """The driver's timer says the attempt passed ``time_limit``; the driver interrupts it."""
        self.logger.error(
            "pyfiq.task_time_limit_exceeded",
            attempt=self.attempts,
            elapsed=round(time.monotonic() - self.started, 3),
            time_limit=self.time_limit,
            hint="interrupting it; the lease stays held until it has really ended (a plain function "
            "blocked in one C call, such as a socket read without timeout, ends only when the call returns)",
        )

    def _fenced(self) -> Outcome:
        if self.lease.revoked and self.ctx.id in self.lease.skipped.split():
            self.logger.info("pyfiq.task_skipped_while_running", attempts=self.attempts)
            return Fenced(ran=False)  # dead-lettered by the operator: nothing to report
        if self.attempts:
            self.logger.error(
                "pyfiq.task_outlived_lease",
                reason=self.lease.lost_reason,
                attempts=self.attempts,
                hint="the result is dropped and the task runs again on the new holder; if the task holds "
                "the GIL or blocks the event loop longer than lease_ttl, raise lease_ttl",
            )
        return Fenced(ran=self.attempts > 0)

    def interrupted(self) -> Outcome:
        if self.lease.lost:
            return self._fenced()
        if self.attempts == 0:
            return Aborted(ran=False)  # halted by an operator before it started
        self.logger.info("pyfiq.task_interrupted_by_stop")
        return Aborted()

    def cancelled(self) -> None:
        """The driver cancelled the running attempt (an asyncio stop past its deadline)."""
        hooks.emit("after_execution", self.ctx, "cancelled", time.monotonic() - self.started)

    def succeeded(self, result: Any) -> Outcome:
        fenced = self.lease.lost or self.lease.lapsed()
        duration = time.monotonic() - self.started
        hooks.emit("after_execution", self.ctx, "fenced" if fenced else "succeeded", duration)
        if fenced:
            return self._fenced()
        if debug_enabled():  # binding the task's logger costs more than a no-op task
            self.logger.debug("pyfiq.task_succeeded", attempt=self.attempts, duration=round(duration, 6))
        if self.fn.on_success is not None:
            call_hook(self.fn.on_success, result, self.ctx, self.fn, event="on_success", ctx=self.ctx)
        return Acked()
