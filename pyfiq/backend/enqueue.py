"""Enqueue: the one path by which tasks reach Redis, ``Enqueuer.enqueue`` (and its asyncio
twin ``aenqueue``), with its coalescing and its retries.

Concurrent callers share round trips (see ``coalesce``), except in durable mode, where each
caller's enqueue waits for its own replication, and the first time (when the shard layout is
checked). A caller alone, or one whose shared round trip failed, goes on alone with retries.

One caller, one outcome: a request that may have been written is never sent again blindly.
Redis may have stored it, so only a retry that cannot store a task twice is made (every task
has a dedup key that outlives the retries: a task found stored under its own id was stored by
an earlier attempt, and is answered as new). Otherwise ``EnqueueOutcomeUnknown``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

from ..config import Settings
from ..engine.protocol import ENQUEUE_ITEMS, ENQUEUE_STRIDE, Call, ScriptCalls
from ..errors import BackendUnavailableError, EnqueueOutcomeUnknown, NotReplicatedError
from ..task import EncodedTask
from .coalesce import AsyncCoalescer, Coalescer
from .failures import is_transient, is_unlaid, never_ran
from .lean import Attempt, Exchange
from .transport import PipelineExchange, Transport

#: What an enqueue answers per task: its id, and whether it was stored now (False: a dedup key
#: found it stored already, under that id).
Stored = tuple[str, bool]


class RetryBudget:
    """The retry budget of one enqueue. Transient failures are retried with exponential back-off
    (50 ms doubling up to 1 s, plus up to 50 ms of jitter) until ``enqueue_timeout`` has passed
    since the enqueue began, or ``enqueue_attempts`` tries were made. A failure after which the
    request may have run (``never_ran`` says no, and it was sent) ends the enqueue with
    ``EnqueueOutcomeUnknown``, unless re-sending cannot store a task twice: every task has a
    dedup key, and the dedup window outlasts twice the retry window."""

    def __init__(
        self, enqueuer: Enqueuer, call: Call, stream: str, dedup_keys: Sequence[str] | None, started: float | None
    ) -> None:
        self.enqueuer, self.call, self.stream = enqueuer, call, stream
        self.started = time.monotonic() if started is None else started
        settings = enqueuer.settings
        every = dedup_keys is not None and len(dedup_keys) == len(call.args[ENQUEUE_ITEMS::ENQUEUE_STRIDE])
        self.resend_safe = every and settings.dedup_window > 2 * settings.enqueue_timeout
        self.tries = 0
        #: An earlier try may have stored the tasks (then re-sent with their dedup keys).
        self.maybe = False

    def failed(self, exc: BaseException | None, sent: bool, *, shared: bool = False) -> float:
        """Seconds to wait before the next try after one failed with ``exc`` (None: nothing
        failed yet); raises when there is to be none. A refusal that ran nothing is raised as
        it is, except one of a ``shared`` round trip, whose callers each try alone."""
        if exc is None:
            return 0.0
        if isinstance(exc, NotReplicatedError):
            raise exc  # stored, short of replicas: the outcome, told as it is
        if sent and not never_ran(exc):
            if not self.resend_safe:
                raise self.enqueuer.outcome_unknown(self.stream, self.call, exc) from exc
            self.maybe = True
        elif not is_transient(exc):
            if shared:
                return 0.0
            if self.maybe:  # an earlier try may have stored the tasks: a refusal now cannot say
                raise self.enqueuer.outcome_unknown(self.stream, self.call, exc) from exc
            raise exc
        return self.again(exc)

    def again(self, exc: BaseException) -> float:
        """Seconds to wait before trying again after ``exc``, a failure that stored nothing;
        raises when the budget is spent."""
        self.tries += 1
        settings = self.enqueuer.settings
        elapsed = time.monotonic() - self.started
        if elapsed >= settings.enqueue_timeout or (
            settings.enqueue_attempts is not None and self.tries >= settings.enqueue_attempts
        ):
            if self.maybe:
                raise self.enqueuer.outcome_unknown(self.stream, self.call, exc) from exc
            raise BackendUnavailableError(
                f"could not enqueue to {self.stream!r} on {self.enqueuer.address}: Redis unreachable after "
                f"{self.tries} attempts ({exc}); nothing was stored"
            ) from exc
        backoff = min(1.0, 0.05 * 2.0 ** (self.tries - 1)) + random.uniform(0, 0.05)
        return min(backoff, settings.enqueue_timeout - elapsed)


class Enqueuer:
    """The enqueue path of one backend, over its ``transport`` and script ``ops``."""

    def __init__(self, transport: Transport, ops: ScriptCalls) -> None:
        self.transport = transport
        self.ops = ops
        self.settings: Settings = transport.settings
        self._coalescer = Coalescer(self)
        self._acoalescer: AsyncCoalescer | None = None

    @property
    def address(self) -> str:
        return self.transport.address

    def enqueue(
        self, stream: str, tasks: Sequence[EncodedTask], dedup_keys: Sequence[str] | None = None
    ) -> list[Stored]:
        """Append ``tasks`` to ``stream``, atomically and in order; ``dedup_keys``, one per
        task, make a repeat within the dedup window answer the first task's id instead."""
        if not self.transport.layout_checked or self.settings.durable:
            return self.retry_alone(stream, tasks, dedup_keys)
        return self._coalescer.enqueue(stream, tasks, dedup_keys)

    async def aenqueue(
        self, stream: str, tasks: Sequence[EncodedTask], dedup_keys: Sequence[str] | None = None
    ) -> list[Stored]:
        """``enqueue`` without blocking the event loop."""
        if not self.transport.layout_checked or self.settings.durable:
            return await self.aretry_alone(stream, tasks, dedup_keys)
        coalescer = self._acoalescer
        loop = asyncio.get_running_loop()
        if coalescer is None or coalescer.loop is not loop:
            # One per loop: a turn left unfinished by a loop that ended must not hold up the next.
            coalescer = self._acoalescer = AsyncCoalescer(self, loop)
        return await coalescer.enqueue(stream, tasks, dedup_keys)

    # -- what the coalescer needs: one bare try, a shared round trip, the retries alone -------

    def try_once(
        self, stream: str, tasks: Sequence[EncodedTask], dedup_keys: Sequence[str] | None, attempt: Attempt
    ) -> list[Stored]:
        """One plain attempt, no retry bookkeeping (it costs a fifth of an enqueue)."""
        call = self.ops.enqueue(stream, tasks, dedup_keys)
        return ScriptCalls.parse_enqueue(call, self.transport.call_once(call, attempt))

    async def atry_once(
        self, stream: str, tasks: Sequence[EncodedTask], dedup_keys: Sequence[str] | None, attempt: Attempt
    ) -> list[Stored]:
        """``try_once`` on the asyncio client."""
        call = self.ops.enqueue(stream, tasks, dedup_keys)
        return ScriptCalls.parse_enqueue(call, await self.transport.acall_once(call, attempt))

    def shared_round_trip(self, calls: Sequence[Call]) -> Exchange | PipelineExchange:
        """Several callers' enqueue calls in one write (``Transport.exchange``)."""
        return self.transport.exchange(calls)

    async def ashared_round_trip(self, calls: Sequence[Call], attempt: Attempt) -> list[Any]:
        """Several callers' enqueue calls in one write on the asyncio client, run to its end."""
        return await self.transport.aexchange(calls, attempt)

    def retry_alone(
        self,
        stream: str,
        tasks: Sequence[EncodedTask],
        dedup_keys: Sequence[str] | None,
        *,
        sent: bool = False,
        cause: BaseException | None = None,
        started: float | None = None,
    ) -> list[Stored]:
        """Enqueue alone, retrying transient errors until ``enqueue_timeout`` after ``started``
        (now by default): the first time (when the shard layout is checked too), in durable
        mode, or after a shared round trip failed with ``cause`` (``sent``: its request may
        have been written). See the module for what is never sent again."""
        call = self.ops.enqueue(stream, tasks, dedup_keys)
        budget = RetryBudget(self, call, stream, dedup_keys, started)
        budget.failed(cause, sent, shared=True)
        laid = cause is not None and is_unlaid(cause)
        unlaid = self.transport.keys.shard_of(stream) if laid else None  # to lay out before the next try
        while True:
            attempt = Attempt()
            try:
                if unlaid is not None:
                    self.transport.lay_out(unlaid)
                    unlaid = None
                self.transport.check_layout()
                return self._own(call, self.transport.call_once(call, attempt))
            except Exception as exc:
                delay, shard = self._after(budget, exc, attempt.sent, stream, laid)
                if shard is not None:  # else a lay-out that failed is still owed
                    unlaid, laid = shard, True
            time.sleep(delay)

    async def aretry_alone(
        self,
        stream: str,
        tasks: Sequence[EncodedTask],
        dedup_keys: Sequence[str] | None,
        *,
        sent: bool = False,
        cause: BaseException | None = None,
        started: float | None = None,
    ) -> list[Stored]:
        """``retry_alone`` without blocking the event loop."""
        call = self.ops.enqueue(stream, tasks, dedup_keys)
        budget = RetryBudget(self, call, stream, dedup_keys, started)
        budget.failed(cause, sent, shared=True)
        laid = cause is not None and is_unlaid(cause)
        unlaid = self.transport.keys.shard_of(stream) if laid else None  # to lay out before the next try
        while True:
            attempt = Attempt()
            try:
                if unlaid is not None:
                    await self.transport.alay_out(unlaid)
                    unlaid = None
                await self.transport.acheck_layout()
                return self._own(call, await self.transport.acall_once(call, attempt))
            except Exception as exc:
                delay, shard = self._after(budget, exc, attempt.sent, stream, laid)
                if shard is not None:  # else a lay-out that failed is still owed
                    unlaid, laid = shard, True
            await asyncio.sleep(delay)

    def _after(
        self, budget: RetryBudget, exc: BaseException, sent: bool, stream: str, laid: bool
    ) -> tuple[float, int | None]:
        """After a try failed with ``exc``: seconds to wait, and the shard to lay out before the
        next try (None: none). A shard without a layout (a new prefix, an empty restart) stored
        nothing: laid out at once the first time, after a back-off should it be erased again."""
        if is_unlaid(exc):
            return (budget.again(exc) if laid else 0.0), self.transport.keys.shard_of(stream)
        return budget.failed(exc, sent), None

    @staticmethod
    def _own(call: Call, reply: Any) -> list[Stored]:
        """``ScriptCalls.parse_enqueue``, where a task a dedup key found stored under its own id
        (random, 128 bits) is new: an earlier attempt whose reply was lost stored it."""
        parsed = ScriptCalls.parse_enqueue(call, reply)
        if isinstance(reply, int):
            return parsed
        ids = call.args[ENQUEUE_ITEMS::ENQUEUE_STRIDE]
        return [(task_id, new or task_id == own) for (task_id, new), own in zip(parsed, ids, strict=True)]

    # -- outcomes ------------------------------------------------------------------------------

    def timed_out(self, stream: str, tasks: Sequence[EncodedTask], sent: bool) -> Exception:
        """For a caller whose shared round trip did not end within ``enqueue_timeout``."""
        why = f"the round trip carrying it did not end within enqueue_timeout ({self.settings.enqueue_timeout} s)"
        if sent:
            return EnqueueOutcomeUnknown(
                f"{len(tasks)} task(s) for {stream!r} MAY be stored on {self.address}: {why}; they are "
                "not sent again, which could store them twice",
                [task.id for task in tasks],
            )
        return BackendUnavailableError(
            f"could not enqueue to {stream!r} on {self.address}: {why}, and nothing of it was sent: not stored"
        )

    def outcome_unknown(self, stream: str, call: Call, cause: BaseException | None) -> EnqueueOutcomeUnknown:
        ids = [str(task_id) for task_id in call.args[ENQUEUE_ITEMS::ENQUEUE_STRIDE]]
        return EnqueueOutcomeUnknown(
            f"{len(ids)} task(s) for {stream!r} MAY be stored on {self.address}: the request was written "
            f"but no reply came back ({type(cause).__name__}: {cause}); not sent again, which could store "
            "them twice. Look for the task ids before sending again; a dedup_key makes enqueues safe to re-send",
            ids,
        )
