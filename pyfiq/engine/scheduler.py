"""What a worker claims and when, and what its heartbeats mean, without I/O.

Both drivers (threads and asyncio) own one ``Scheduler``: they ask it which script calls to
make, hand it the replies, and wait as long as it says. It is guarded by a lock because the
threaded driver touches it from several threads; under asyncio the lock is never contended.
It learns about the application's tasks only through the ``TaskDirectory`` it is given (the
``pyfiq.api`` module in a worker, anything with the same three functions in a test); it must
not import redis, the API or the drivers.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..config import Settings
from ..logs import log
from .keys import queue_of
from .lease import Flag, Lease
from .outcomes import DeadLettered, Deferred, Prepared, describe_error, prepare
from .protocol import Call, Ops, RateLimit, RenewReply
from .stream import Finished, RunTask, StreamRun


class TaskDirectory(Protocol):
    """Where the scheduler finds the application's tasks (``pyfiq.api`` satisfies it)."""

    def registered_queues(self) -> list[str]: ...

    def lookup(self, name: str) -> Any: ...

    def rate_limit_of(self, queue: str) -> RateLimit | None: ...


#: At most this many task ids whose function is unknown are remembered per worker.
UNKNOWN_MEMORY = 10_000


class Scheduler:
    def __init__(self, ops: Ops, concurrency: int, queues: Sequence[str] | None, tasks: TaskDirectory) -> None:
        self.ops = ops
        self.settings: Settings = ops.settings
        self.concurrency = concurrency
        self._queues = list(queues) if queues is not None else None
        self.tasks = tasks
        shards = ops.keys.shards
        self.held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._shard_due = [0.0] * shards
        self._scan_offset = [0] * shards
        # Shards named by wake-up messages; swapped out before a look, so a message arriving
        # during the look is kept for the next one, never overwritten.
        self._woken: set[int] = set()
        # Streams handed back for a task this replica cannot run: left to others for a while.
        self._avoid: dict[str, float] = {}
        self._unknown_since: dict[str, float] = {}
        self._backoff = 0.0
        self._identity: tuple[str, dict[str, Any]] | None = None
        self._next_beat = time.monotonic() + self.settings.heartbeat
        #: Tasks ended under leases given up since the start, and (time, total) per heartbeat
        #: over the last minute: the replica's rate that operators see.
        self._done = 0
        self._done_seen: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])
        #: Tasks taken together with a lease: a claim and the first batch in one round trip.
        self.first_batch = min(self.settings.window, self.settings.batch_limit)

    # -- claiming -------------------------------------------------------------------------

    def consumed_queues(self) -> list[str]:
        return self._queues if self._queues is not None else self.tasks.registered_queues()

    def free(self) -> int:
        with self._lock:
            return self.concurrency - len(self.held)

    def held_leases(self) -> list[Lease]:
        with self._lock:
            return list(self.held.values())

    def wake(self, shards: Iterable[int]) -> None:
        with self._lock:
            self._woken.update(s for s in shards if 0 <= s < len(self._shard_due))

    def wake_all(self) -> None:
        self.wake(range(len(self._shard_due)))

    def due_calls(self, now: float) -> tuple[list[int], list[Call]]:
        """The shards worth a look now, and the calls that look."""
        queues = self.consumed_queues()
        with self._lock:
            free = self.concurrency - len(self.held)
            if free <= 0 or not queues:
                return [], []  # wake-ups stay pending until there is room to act on them
            woken, self._woken = self._woken, set()
            for stream, until in list(self._avoid.items()):
                if until <= now:
                    del self._avoid[stream]
            want = free + len(self._avoid)
        shards = [s for s, due in enumerate(self._shard_due) if due <= now or s in woken]
        return shards, [self.ops.due(s, want, queues, self._scan_offset[s]) for s in shards]

    def candidates(self, shards: Sequence[int], replies: Sequence[Any], now: float) -> list[tuple[int, str]]:
        found: list[tuple[float, int, str]] = []
        for shard, reply in zip(shards, replies, strict=True):
            if isinstance(reply, Exception) and "PYFIQLAYOUT" in str(reply):
                # Another shard count wrote this shard's layout (a misconfigured replica or
                # producer after an empty restart): say so loudly, keep serving other shards.
                self._shard_due[shard] = now + self.settings.poll_interval
                log.error(
                    "pyfiq.layout_mismatch",
                    shard=shard,
                    shards=self.ops.keys.shards,
                    error=str(reply).split("PYFIQLAYOUT ", 1)[-1],
                )
                continue
            if isinstance(reply, Exception):
                raise reply
            nxt, offset, streams = self.ops.parse_due(reply)
            self._scan_offset[shard] = offset
            wait = self.settings.poll_interval if nxt is None else min(nxt, self.settings.poll_interval)
            # Page on at once past streams of queues this replica does not consume.
            self._shard_due[shard] = now if offset else now + wait
            found += [(since, shard, s) for s, since in streams]
        # Oldest due first, across shards: a stream that yielded after its batch queues up
        # behind streams that have waited longer, which is what makes the yield fair.
        found.sort()
        with self._lock:
            return [(sh, s) for _, sh, s in found if s not in self.held and s not in self._avoid]

    def first_take(self, stream: str) -> int:
        """Tasks to take together with the lease. None for a rate-limited queue: its holder
        asks the permit first, so a task is only taken when it can start."""
        return 0 if self.tasks.rate_limit_of(queue_of(stream)) is not None else self.first_batch

    def on_acquired(self, shard: int, stream: str, reply: Any, abort: Flag, now: float) -> Lease | None:
        """``now``: the monotonic time the acquire request was sent."""
        lease = self.ops.parse_acquire(stream, reply, abort, now)
        if lease is None:
            if len(reply) > 1:  # still leased for a moment: look again right when it lapses
                self._shard_due[shard] = min(self._shard_due[shard], now + int(reply[1]) / 1000)
            return None
        with self._lock:
            self.held[stream] = lease
        # The shard may hold more due streams than it returned: look again soon.
        self._shard_due[shard] = now
        return lease

    def finished(self, lease: Lease, run: StreamRun | None) -> None:
        with self._lock:
            self.held.pop(lease.stream, None)
            self._done += lease.done
            if run is not None and run.deferred is not None:
                self._avoid[lease.stream] = time.monotonic() + max(self.settings.poll_interval, 1.0)
            if run is not None and run.yielded:
                # Look at every shard before claiming again, so the stream that has waited
                # longest wins even if its wake-up message has not arrived yet.
                self._woken.update(range(len(self._shard_due)))

    def idle_wait(self, now: float) -> float:
        """How long the dispatcher may sleep unless woken."""
        with self._lock:
            full = len(self.held) >= self.concurrency
            woken = bool(self._woken)
        if full or not self.consumed_queues():
            return self.settings.poll_interval
        if woken:
            return 0.0
        return min(self.settings.poll_interval, max(0.0, min(self._shard_due) - now))

    def prepare(self, lease: Lease, step: RunTask, replica: str) -> Prepared | DeadLettered | Deferred:
        """Decode a taken task and find its function (see ``core.prepare``), logging why a task
        is dead-lettered instead."""
        prepared = prepare(
            step.entry, step.deliveries, lease, self.tasks.lookup, self.settings, replica, unknown_for=self.unknown_for
        )
        if not isinstance(prepared, Deferred):
            # The grace starts again at the task's next meeting (say, after a requeue).
            self.forget_unknown(step.entry.id)
        if isinstance(prepared, DeadLettered):
            log.error("pyfiq.task_dead_lettered", stream=lease.stream, task_id=step.entry.id, header=prepared.header)
        return prepared

    def report(self, run: StreamRun, step: Finished) -> None:
        """Say loudly how a lease ended when it did not end well."""
        lease = run.lease
        if run.deferred is not None:
            log.warning(
                "pyfiq.task_deferred_unknown",
                stream=lease.stream,
                task_id=run.deferred,
                grace=self.settings.unknown_task_grace,
            )
        if step.reason == "fenced":
            log.error("pyfiq.lease_lost", stream=lease.stream, fencing_token=lease.fence, reason=lease.lost_reason)

    def forget_unknown(self, task_id: str) -> None:
        if self._unknown_since:
            with self._lock:
                self._unknown_since.pop(task_id, None)

    def unknown_for(self, task_id: str) -> float:
        now = time.monotonic()
        with self._lock:
            if len(self._unknown_since) > UNKNOWN_MEMORY:
                self._unknown_since.clear()
            return now - self._unknown_since.setdefault(task_id, now)

    def claim_failed(self, exc: BaseException) -> float:
        """A look or claim failed (Redis unreachable, a restart): how long to wait before the
        next one, doubling up to the poll interval."""
        self._backoff = min(max(self._backoff * 2, 0.1), self.settings.poll_interval)
        log.warning("pyfiq.claim_failed", error=describe_error(exc), retry_in=self._backoff)
        return self._backoff

    def claim_succeeded(self) -> None:
        self._backoff = 0.0

    # -- heartbeats -----------------------------------------------------------------------

    def heartbeat_wait(self, now: float) -> float:
        """How long the heartbeat may sleep before its next round."""
        return max(0.0, self._next_beat - now)

    def identify(self, replica: str, **info: Any) -> None:
        """Who this worker is, for the replica registry its heartbeats keep up to date."""
        self._identity = (replica, {**info, "heartbeat_ms": int(self.settings.heartbeat * 1000)})

    def heartbeat_round(self, now: float) -> tuple[list[Lease], list[Call]]:
        """Start a round of renewals at ``now``; a round later than a whole interval is logged
        (the process was paused, or the GIL held), since it eats into every lease's margin."""
        interval = self.settings.heartbeat
        late = now - self._next_beat
        if late > interval:
            log.warning("pyfiq.heartbeat_late", late_by=round(late, 3), interval=interval)
        self._next_beat = now + interval
        leases, calls = self.renew_calls()
        if self._identity is not None:
            replica, info = self._identity
            # After the renewals: on_renewed reads the first len(leases) replies.
            calls.append(self.ops.beat(replica, {**info, **self._activity(leases, now)}))
        return leases, calls

    def _activity(self, leases: Sequence[Lease], now: float) -> dict[str, Any]:
        """What the heartbeat says this worker does: the streams it holds, the task each runs
        and since when (Redis ms), tasks ended so far and per second over the last minute."""
        with self._lock:
            done = self._done + sum(lease.done for lease in self.held.values())
        self._done_seen.append((now, done))
        while now - self._done_seen[0][0] > 60:
            self._done_seen.popleft()
        first_at, first_done = self._done_seen[0]
        rate = (done - first_done) / (now - first_at) if now > first_at else 0.0
        running = {lease.stream: list(lease.running) for lease in leases if lease.running is not None}
        held = sorted(lease.stream for lease in leases)
        return {"held": held, "running": running, "done": done, "tasks_per_s": round(rate, 3)}

    def renew_calls(self) -> tuple[list[Lease], list[Call]]:
        leases = [lease for lease in self.held_leases() if not lease.lost]
        return leases, [self.ops.renew(lease) for lease in leases]

    def on_renewed(self, leases: Sequence[Lease], replies: Sequence[Any], sent_at: float) -> list[Lease]:
        """Apply renewal replies (an exception stands for a failed call) of the round sent at
        ``sent_at``; returns the leases found lost by this round."""
        lost: list[Lease] = []
        for lease, reply in zip(leases, replies[: len(leases)], strict=True):
            if isinstance(reply, Exception):
                # Unknown whether Redis still holds it: assume lost once it may have lapsed.
                if time.monotonic() >= lease.valid_until:
                    lease.mark_lost(f"renewal failed until the lease may have lapsed: {describe_error(reply)}")
                    lost.append(lease)
            elif RenewReply(int(reply)) is RenewReply.RENEWED:
                lease.confirm(sent_at)
            elif not lease.ending:  # a lease released a moment ago is not lost
                lease.mark_lost("renewal refused: the lease lapsed or was taken over")
                lost.append(lease)
        for lease in lost:
            log.error("pyfiq.lease_lost", stream=lease.stream, fencing_token=lease.fence, reason=lease.lost_reason)
        return lost

    def abort_all(self) -> None:
        for lease in self.held_leases():
            lease.abort.set()
