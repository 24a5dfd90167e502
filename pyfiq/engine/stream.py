"""``StreamRun``: the state machine of one lease, from acquisition to release.

It says which script to call next and what to do with each reply and each task outcome; the
drivers (threads, asyncio) only carry the calls out and wait. Must not import redis or do I/O.

With ``ack_mode="group"`` a run keeps up to ``MAX_SENT`` calls in the background while tasks
run (takes that acknowledge what finished and take more). The driver sends ``RunTask.send``
before running the task, after any call still in flight and never beside one (so Redis applies
acknowledgements in order), hands their replies to ``collect`` in the order sent, and waits for
the oldest when told to (``Await``). A dead letter Redis confirmed is kept in ``events`` for
the driver's hooks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..task import Entry
from .events import Clock, DeadLetterConfirmed, Outbox
from .keys import queue_of
from .lease import Lease
from .outcomes import Aborted, Acked, DeadLettered, Deferred, Fenced, Outcome
from .protocol import PARK_AFTER_MS, Call, FencedReply, RateLimit, ScriptCalls, TakeReply


@dataclass(frozen=True)
class RunTask:
    entry: Entry
    deliveries: int
    #: A call to send in the background before running the task (group commit).
    send: Call | None = None


#: Background calls a group-commit run may have outstanding: one in flight and one queued behind
#: it, so that what finishes while a call is on the wire goes as soon as it returns, even if the
#: next task runs long. More would only split acknowledgements into more round trips.
MAX_SENT = 2


@dataclass(frozen=True)
class Await:
    """Wait for the background call's reply (or error) and ``feed`` it."""


@dataclass(frozen=True)
class Pause:
    """Wait this long (abortably), then feed ``None``: the queue's rate limit says not yet."""

    seconds: float


#: How a run ended: 'empty' (stream drained and forgotten), 'released', 'parked' (handed back
#: until its rate permit), 'paused' (an operator paused it), 'skipped' (an operator's skip
#: revoked the lease: let go), 'fenced', 'abandoned', 'failed' (the background call failed: the
#: driver raises its error and hands the stream back).
FinishReason = Literal["empty", "released", "parked", "paused", "skipped", "fenced", "abandoned", "failed"]
#: The ways a run hands its lease back with a ``release`` call.
ReleaseReason = Literal["released", "parked", "paused", "skipped"]


@dataclass(frozen=True)
class Finished:
    reason: FinishReason


Step = Call | RunTask | Pause | Await | Finished

#: What ``StreamRun.feed`` does with a result, by what the run waits for.
_HANDLERS = {
    "run": "_on_outcome",
    "await": "_on_await",
    "pause": "_after_pause",
    "rate": "_on_rate",
    "take": "_on_take",
    "dead_letter": "_on_dead_letter",
    "release": "_on_release",
    "lost": "_after_lost",
}


class StreamRun:
    """Drives one lease from acquisition to release.

    ``ack_mode="inline"``: acknowledgements are carried on the next call (take, dead-letter or
    release), sent when the tasks taken have run, so a stream costs one round trip per
    ``prefetch`` tasks and a crash re-runs at most ``prefetch`` of them. ``"group"``: while a
    task runs, one background take acknowledges every task finished since the last one and
    tops the buffer up to ``prefetch``; a crash re-runs the tasks whose acknowledgement had not
    landed. Tasks taken ahead are not marked started in Redis (the holder may die before it
    gets to them), so a task that kills its worker is charged from its second delivery on,
    which it gets as an earlier holder's task, one at a time and marked. A rate-limited stream
    always acknowledges inline and asks its permit
    before each task starts, and before the take that hands the next one over, so Redis's
    'started' mark on a handed task is true; a permit further away than ``PARK_AFTER_MS``
    parks the stream (its lease handed back until then) instead of holding a worker slot.
    """

    def __init__(
        self,
        ops: ScriptCalls,
        lease: Lease,
        *,
        stopping: Callable[[], bool],
        abandoned: Callable[[], bool],
        clock: Clock,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.ops = ops
        self.lease = lease
        self.rate_limit = rate_limit
        self._permit = False
        self.settings = ops.settings
        self._stopping = stopping
        self._abandoned = abandoned
        self.clock = clock
        self.events = Outbox()
        self.acks: list[str] = []
        self.buffer: deque[tuple[Entry, int]] = deque()
        self.processed = 0
        #: Set when the run ended by handing the stream over for a task it cannot run.
        self.deferred: str | None = None
        self.deferred_name = ""
        #: Set when the run gave the stream up after ``batch_limit`` tasks to let others run.
        self.yielded = False
        #: Set when the run handed the stream back to wait for its rate permit.
        self.parked = False
        #: Seconds until the stream's first delayed task falls due, when the run ended because the
        #: stream had nothing else: the worker looks at it again then.
        self.due_in: float | None = None
        self._waiting: str | None = None
        self._head_started = False
        self._sent_at = 0.0
        self._final: ReleaseReason = "released"
        self.group = self.settings.ack_mode == "group" and rate_limit is None
        #: The background calls outstanding, oldest first: the acknowledgements each carries,
        #: how many tasks it asks for and when it was handed to the driver.
        self._sent: deque[tuple[list[str], int, float]] = deque()
        self._want = 0
        #: The last hand-out brought fewer tasks than asked: the stream had no more then, so
        #: only acknowledgements are worth a background call.
        self._drained = False
        #: What to do once the background call's reply is in (set with an ``Await`` step).
        self._then: Callable[[], Step] | None = None
        #: The background call's error: the driver raises it once the outcome it ran beside is
        #: fed, so ``fail`` names what really finished.
        self.broken: BaseException | None = None
        #: Acknowledgements sent in a call whose reply was lost: resent, tolerated, by ``fail``.
        self._unconfirmed: list[str] = []
        # The dead letter asked for, reported to hooks once Redis confirms it.
        self._dead: DeadLettered | None = None
        # Bound once: a feed per task and per call is a hot path.
        self._handlers: dict[str, Callable[[Any], Step]] = {w: getattr(self, m) for w, m in _HANDLERS.items()}
        lease.unconfirmed_acks = self._unconfirmed_acks

    def _unconfirmed_acks(self) -> list[str]:
        """Acknowledgements not yet confirmed by Redis, oldest first. Read by the heartbeat
        (another thread) to let go on this run's behalf: copied before iterating."""
        sent = list(self._sent)
        return [*self._unconfirmed, *(a for acks, _, _ in sent for a in acks), *self.acks]

    def start(self) -> Step:
        self.buffer.extend(self.lease.initial)
        self._drained = len(self.lease.initial) < min(self.settings.effective_prefetch, self.settings.batch_limit)
        self.lease.initial = []
        return self._next()

    def _call(self, call: Call) -> Call:
        self._waiting = call.script
        self._sent_at = self.clock.monotonic()
        # take may release an empty stream, release always does.
        self.lease.ending = call.script in ("take", "release")
        return call

    def _release(self, started: list[str], delay_ms: int = 0, final: ReleaseReason = "released") -> Step:
        def release() -> Step:
            self._final = final
            # Acknowledgements a revoked lease's takes carried were refused: they go again here.
            acks = [*self._unconfirmed, *self.acks] if self.lease.revoked else self.acks
            return self._call(self.ops.release(self.lease, acks, started, delay_ms))

        return self._sync(release)

    def _sync(self, make: Callable[[], Step]) -> Step:
        """``make()``'s call, once no background call is outstanding (calls in order)."""
        if not self._sent:
            return make()
        self._then = make
        self._waiting = "await"
        return Await()

    def _ahead(self) -> Call | None:
        """The background take to send as the next task starts, if one is due."""
        if not self.group or len(self._sent) >= MAX_SENT:
            return None
        asked = sum(want for _, want, _ in self._sent)
        room = (
            min(self.settings.effective_prefetch, self.settings.batch_limit - self.processed) - len(self.buffer) - asked
        )
        if not self.acks and (room <= 0 or self._drained or self._sent):
            return None
        want = max(room, 0)
        call = self.ops.take(self.lease, self.acks, want, ahead=True)
        self._sent.append((self.acks, want, self.clock.monotonic()))
        self.acks = []
        return call

    def collect(self, result: Any) -> None:
        """Take in the reply of the oldest background call, or the exception it raised."""
        acks, want, sent_at = self._sent.popleft()
        if isinstance(result, BaseException):
            self.broken = result
            self._unconfirmed += acks
            return
        status = TakeReply(int(result[0]))
        if status not in (TakeReply.FENCED, TakeReply.REVOKED):
            self._confirmed(acks)
        if status is TakeReply.FENCED:
            self.lease.mark_lost("take refused")
        elif status is TakeReply.REVOKED:
            self._unconfirmed += acks
            self.lease.revoke()
        elif status is TakeReply.EMPTY:  # cannot happen while tasks are in flight: trust Redis
            self.lease.mark_lost("stream forgotten by Redis")
        elif status is TakeReply.PAUSED:
            self.lease.halt("paused")
        elif status is TakeReply.TASKS:
            self.lease.clock(int(result[1]), sent_at)
            for i in range(2, len(result), 2):
                self.buffer.append((Entry.load(result[i]), int(result[i + 1])))
            self._drained = len(result) - 2 < 2 * want

    def _confirmed(self, acks: list[str]) -> None:
        """Redis applied ``acks``: their results are stored, and need not travel again."""
        if self.lease.results:
            for task_id in acks:
                self.lease.results.pop(task_id, None)

    def _on_await(self, result: Any) -> Step:
        self.collect(result)
        then, self._then = self._then, None
        if self.broken is not None:
            return Finished("failed")
        return self._sync(then) if then is not None else self._next()

    def _next(self) -> Step:
        if self.broken is not None:  # the driver raises it now: start nothing more
            return Finished("failed")
        if self._abandoned():
            return Finished("abandoned")
        if self.lease.lost:
            return Finished("fenced")
        if self.lease.halted:
            # An operator paused the stream or skipped its head: what was taken ahead goes
            # back, in order, and a revoked lease is let go (see skip.lua).
            return self._release([], final="skipped" if self.lease.revoked else "paused")
        if self._stopping() or (not self.buffer and self.processed >= self.settings.batch_limit):
            # Graceful stop or fair yield: give back what was taken but not started.
            self.yielded = not self._stopping()
            return self._release([])
        if self.rate_limit is not None and not self._permit:
            return self._call(self.ops.rate(queue_of(self.lease.stream), self.rate_limit))
        if self.buffer:
            self._permit = False
            self._head_started = True
            self._waiting = "run"
            entry, deliveries = self.buffer[0]
            if self.lease.running is None or self.lease.running[0] != entry.id:
                self.lease.running = (entry.id, int(self.lease.redis_now_ms(self.clock.monotonic())))
            return RunTask(entry, deliveries, self._ahead())
        if self._sent:  # out of tasks: the background takes may bring some
            return self._sync(self._next)
        want = min(self.settings.effective_prefetch, self.settings.batch_limit - self.processed)
        if self.rate_limit is not None:
            want = 1  # one permit, one task: each start is asked for when it happens
        self._want = want
        return self._call(self.ops.take(self.lease, self.acks, want))

    def feed(self, result: Any) -> Step:
        """Give the reply of the last call, or the ``Outcome`` of the last ``RunTask``."""
        waiting, self._waiting = self._waiting, None
        handler = self._handlers.get(waiting or "")
        if handler is None:
            raise RuntimeError(f"StreamRun fed while waiting for {waiting!r}")
        return handler(result)

    def _after_pause(self, _: Any) -> Step:
        return self._next()

    def _after_lost(self, _: Any) -> Step:
        return Finished("fenced")

    def _on_rate(self, result: Any) -> Step:
        wait_ms = int(result)
        if wait_ms <= 0:
            self._permit = True
            return self._next()
        if wait_ms > PARK_AFTER_MS:
            self.parked = True
            return self._release([], wait_ms, final="parked")
        self._waiting = "pause"
        return Pause(wait_ms / 1000)

    def _on_take(self, result: Any) -> Step:
        status = TakeReply(int(result[0]))
        if status is TakeReply.FENCED:
            self.lease.mark_lost("take refused")
            return Finished("fenced")
        if status is TakeReply.REVOKED:
            self.lease.revoke()  # the acknowledgements it carried go with the let-go
            return self._next()
        self._confirmed(self.acks)
        self.acks = []
        if status is TakeReply.EMPTY:
            if len(result) > 1:
                self.due_in = int(result[1]) / 1000
            return Finished("empty")
        self.lease.ending = False
        if status is TakeReply.ACKED:
            return self._next()
        if status is TakeReply.PAUSED:
            self.lease.halt("paused")
            return self._next()
        self.lease.clock(int(result[1]), self._sent_at)
        for i in range(2, len(result), 2):
            self.buffer.append((Entry.load(result[i]), int(result[i + 1])))
        self._drained = len(result) - 2 < 2 * self._want
        if not self.buffer:
            return self._release([])
        return self._next()

    def _on_dead_letter(self, result: Any) -> Step:
        if FencedReply(int(result)) is FencedReply.FENCED:
            self.lease.mark_lost("dead-letter refused")
            return Finished("fenced")
        self._confirmed(self.acks)
        self.acks = []
        self.buffer.popleft()
        self._head_started = False
        self.lease.running = None
        self.lease.done += 1
        dead, self._dead = self._dead, None
        if dead is not None:
            self.events.put(DeadLetterConfirmed(self.lease.stream, dead.reason, dead.context))
        return self._next()

    def _on_release(self, result: Any) -> Step:
        if FencedReply(int(result)) is FencedReply.FENCED:
            self.lease.mark_lost("release refused")
            return Finished("fenced")
        self.lease.results.clear()  # every acknowledgement went with the release
        self.acks = []
        return Finished(self._final)

    def _on_outcome(self, outcome: Outcome) -> Step:
        if isinstance(outcome, Fenced) or self.lease.lost:
            if isinstance(outcome, Fenced) and outcome.ran and self.buffer:
                # Say so in Redis (unfenced, changes no queue state): if this keeps happening
                # the task is dead-lettered as 'lease-lost', not as a task that kills workers.
                head = self.buffer[0][0]

                def report() -> Step:
                    self._waiting = "lost"
                    return self.ops.lost(self.lease, head)

                return self._sync(report)
            return Finished("fenced")
        if self._abandoned():
            return Finished("abandoned")
        if isinstance(outcome, Acked):
            entry, _ = self.buffer.popleft()
            self._head_started = False
            self.acks.append(entry.id)
            if outcome.result is not None:
                self.lease.results[entry.id] = outcome.result
            self.processed += 1
            self.lease.running = None
            self.lease.done += 1
            return self._next()
        if isinstance(outcome, DeadLettered):
            entry, _ = self.buffer[0]
            self.processed += 1
            task_id: str | bytes = entry.raw[:32] if entry.malformed else entry.id
            self._dead = outcome
            return self._sync(lambda: self._call(self.ops.dead_letter(self.lease, self.acks, task_id, outcome.header)))
        if isinstance(outcome, Deferred):
            self.deferred, self.deferred_name = outcome.task_id, outcome.name
            self._head_started = False  # handed back unrun: a resend after an error must say so
            return self._release([])
        if isinstance(outcome, Aborted) and not outcome.ran:
            self._head_started = False  # halted before it started: it goes back unrun
            return self._next()
        # Aborted by a stop mid-retry: the task ran, so it may not go back as never delivered.
        return self._release([self.buffer[0][0].id])

    def fail(self) -> Call | None:
        """After an I/O error the state of the last call is unknown: give the lease up, resending
        the acknowledgements (applied tolerantly) and naming only the task that may have run,
        so tasks this holder never started are not charged a delivery."""
        started = [self.buffer[0][0].id] if self._head_started and self.buffer else []
        self.lease.ending = True
        self._final = "released"
        self._waiting = "release"
        # A background call whose reply never came may or may not have applied its acks.
        acks = [*self._unconfirmed, *(a for sent, _, _ in self._sent for a in sent), *self.acks]
        call = None if self.lease.lost else self.ops.release(self.lease, acks, started)
        self.buffer.clear()
        return call
