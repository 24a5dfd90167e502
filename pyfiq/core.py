"""The decisions of pyfiq, without I/O.

``Ops`` turns each atomic step into a script call (name, keys, args) and interprets the reply;
``StreamRun`` is the state machine of one lease (take, run, acknowledge, dead-letter,
release). The threaded and the asyncio drivers feed it replies and task outcomes; they differ
only in how they wait, never in what they decide.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import Settings
from .errors import DecodeError
from .keys import KeySchema, StreamKeys, queue_of
from .task import Entry, TaskContext, TaskRecord


class Flag(Protocol):
    """``threading.Event`` or ``asyncio.Event``: the core only sets and reads it."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Call:
    script: str
    keys: list[str]
    args: list[Any]


@dataclass
class Lease:
    stream: str
    keys: StreamKeys
    token: str
    fence: int
    #: Set when the lease is lost (refused renewal) or the worker stops: ends retry back-offs.
    abort: Flag
    renewed_at: float = field(default_factory=time.monotonic)
    lost: bool = False
    lost_reason: str = ""
    #: A call that may end the lease is in flight: a refused renewal then means "released".
    ending: bool = False
    #: Tasks taken together with the lease, for the holder's first batch.
    initial: list[tuple[Entry, int]] = field(default_factory=list)
    ttl: float = 0.0

    def lapsed(self) -> bool:
        """True once no renewal has been confirmed for a whole TTL: the lease may be gone even
        if no heartbeat said so yet (this process was paused), so start nothing new."""
        if not self.lost and time.monotonic() - self.renewed_at >= self.ttl:
            self.mark_lost("no renewal confirmed within the lease TTL")
        return self.lost

    def mark_lost(self, reason: str) -> None:
        if not self.lost:
            self.lost, self.lost_reason = True, reason
        self.abort.set()


def release_retry_delays(lease_ttl: float) -> list[float]:
    """Pauses before each attempt to release a lease after an I/O error: quick at first, and
    all within half the TTL, after which letting the lease lapse is as fast."""
    delays, total, step = [0.0], 0.0, 0.05
    while total + step <= lease_ttl / 2:
        delays.append(step)
        total += step
        step *= 2
    return delays


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


#: Due entries one ``due`` call scans at most (it pages on from there in later calls).
DUE_SCAN = 200


class Ops:
    def __init__(self, keys: KeySchema, settings: Settings) -> None:
        self.keys = keys
        self.settings = settings

    def enqueue(
        self,
        stream: str,
        items: Sequence[tuple[str, int, bytes]],
        dedup_keys: Sequence[str] | None = None,
    ) -> Call:
        k = self.keys.stream(stream)
        keys = [k.pending, k.ready]
        if dedup_keys is not None:
            keys += [k.dedup(d) for d in dedup_keys]
        args: list[Any] = [
            stream,
            self.keys.wake_channel,
            k.shard,
            int(self.settings.dedup_window * 1000),
            len(items),
        ]
        for task_id, expires_in_ms, payload in items:
            args += [task_id, expires_in_ms, payload]
        return Call("enqueue", keys, args)

    @staticmethod
    def parse_enqueue(reply: list[Any]) -> list[tuple[str, bool]]:
        return [(_text(reply[i]), bool(int(reply[i + 1]))) for i in range(0, len(reply), 2)]

    def due(self, shard: int, want: int, queues: Sequence[str] | None, offset: int = 0) -> Call:
        return Call("due", [self.keys.ready(shard)], [want, DUE_SCAN, offset, *(queues or ())])

    @staticmethod
    def parse_due(reply: list[Any]) -> tuple[float | None, int, list[tuple[str, float]]]:
        """(seconds until the shard's next stream falls due or None, offset to continue the
        scan from or 0, [(due stream, due since in ms)] oldest first)."""
        nxt = int(reply[0])
        due = [(_text(reply[i]), float(reply[i + 1])) for i in range(2, len(reply), 2)]
        return (nxt / 1000 if nxt >= 0 else None), int(reply[1]), due

    def acquire(self, stream: str, want: int = 0) -> Call:
        """Claim a stream and, with ``want``, take its first tasks in the same round trip."""
        k = self.keys.stream(stream)
        return Call(
            "acquire",
            [k.ready, k.epoch, k.lease, k.meta, k.pending, k.inflight, k.dlq, k.dlq_index],
            [stream, self.settings.lease_ttl_ms, secrets.token_hex(8), want, self.settings.max_deliveries],
        )

    def parse_acquire(self, stream: str, reply: list[Any], abort: Flag) -> Lease | None:
        if int(reply[0]) != 1:
            return None
        lease = Lease(stream, self.keys.stream(stream), _text(reply[1]), int(reply[2]), abort)
        lease.ttl = self.settings.lease_ttl
        lease.initial = [(Entry.parse(reply[i]), int(reply[i + 1])) for i in range(3, len(reply), 2)]
        return lease

    def renew(self, lease: Lease) -> Call:
        k = lease.keys
        return Call("renew", [k.lease, k.ready], [lease.token, self.settings.lease_ttl_ms, k.stream])

    def take(self, lease: Lease, acks: Sequence[str], want: int) -> Call:
        k = lease.keys
        return Call(
            "take",
            [k.lease, k.pending, k.inflight, k.meta, k.ready, k.dlq, k.dlq_index],
            [lease.token, k.stream, len(acks), want, self.settings.max_deliveries, *acks],
        )

    def dead_letter(self, lease: Lease, acks: Sequence[str], task_id: str, header: str) -> Call:
        k = lease.keys
        return Call(
            "dead_letter",
            [k.lease, k.inflight, k.meta, k.dlq, k.dlq_index],
            [lease.token, k.stream, len(acks), task_id, header, *acks],
        )

    def release(self, lease: Lease, acks: Sequence[str], unstarted: int, *, hand_off: bool = True) -> Call:
        """Give the lease up. ``hand_off=False`` after an error: tasks left in flight may have
        run, so they keep their raised delivery counts."""
        k = lease.keys
        return Call(
            "release",
            [k.lease, k.pending, k.inflight, k.meta, k.ready],
            [
                lease.token,
                k.stream,
                len(acks),
                unstarted,
                self.keys.wake_channel,
                k.shard,
                "1" if hand_off else "0",
                *acks,
            ],
        )

    def rate(self, queue: str, limit: RateLimit) -> Call:
        return Call("rate", [self.keys.rate(queue)], [1000.0 / limit.per_second, limit.burst])

    def requeue(self, stream: str, count: int, front: bool, task_id: str | None) -> Call:
        k = self.keys.stream(stream)
        return Call(
            "requeue",
            [k.dlq, k.pending, k.ready, k.dlq_index],
            [stream, self.keys.wake_channel, k.shard, count, "front" if front else "back", task_id or ""],
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class RateLimit:
    """At most ``per_second`` task starts per second on a queue, across the fleet; ``burst``
    starts may follow each other without spacing."""

    per_second: float
    burst: int = 1


# -- outcomes of running one task --------------------------------------------------------


@dataclass(frozen=True)
class Acked:
    """The task succeeded: acknowledge it."""


@dataclass(frozen=True)
class DeadLettered:
    header: str


@dataclass(frozen=True)
class Aborted:
    """The worker is stopping mid-retry: the task stays in flight for the next holder."""


@dataclass(frozen=True)
class Fenced:
    """The lease was lost: drop the result, change nothing."""


@dataclass(frozen=True)
class Deferred:
    """This replica cannot run the task (its function is not registered here, as during a
    rolling deploy): hand the stream over untouched so a replica that can run it takes it."""

    task_id: str


Outcome = Acked | DeadLettered | Aborted | Fenced | Deferred


def dead_letter_header(
    reason: str,
    *,
    replica: str,
    deliveries: int,
    attempts: int = 0,
    name: str | None = None,
    error: BaseException | None = None,
) -> str:
    header: dict[str, Any] = {
        "reason": reason,
        "deliveries": deliveries,
        "attempts": attempts,
        "at_ms": int(time.time() * 1000),
        "replica": replica,
    }
    if name is not None:
        header["name"] = name
    if error is not None:
        header["error_type"] = f"{type(error).__module__}.{type(error).__qualname__}"
        header["error"] = str(error)
        header["traceback"] = "".join(traceback.format_exception(error))
    # One line: the stored record is "<header>\n<entry>".
    return json.dumps(header, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Prepared:
    """A task ready to run: its function and its context."""

    func: Any  # registry.FifoFunction; typed loosely to keep core free of the registry
    record: TaskRecord
    context: TaskContext


def prepare(
    entry: Entry,
    deliveries: int,
    lease: Lease,
    lookup: Callable[[str], Any],
    settings: Settings,
    replica: str,
    unknown_for: Callable[[str], float] = lambda task_id: float("inf"),
) -> Prepared | DeadLettered | Deferred:
    """Decode a taken task and find its function, or say why it must be dead-lettered.

    ``unknown_for(task_id)`` tells how long this replica has been meeting a task whose
    function it lacks; within ``settings.unknown_task_grace`` the task is deferred to other
    replicas (a rolling deploy may not have reached this one), after it dead-lettered.
    """
    try:
        record = TaskRecord.decode(entry.payload, settings.serializer)
    except DecodeError as exc:
        return DeadLettered(dead_letter_header("undecodable", replica=replica, deliveries=deliveries, error=exc))
    func = lookup(record.name)
    if func is None and unknown_for(entry.id) < settings.unknown_task_grace:
        return Deferred(entry.id)
    if func is None:
        return DeadLettered(
            dead_letter_header(
                "unknown-task",
                replica=replica,
                deliveries=deliveries,
                name=record.name,
                error=LookupError(
                    f"no replica ran a @fifo function named {record.name!r} within {settings.unknown_task_grace}s"
                ),
            )
        )
    context = TaskContext(
        id=entry.id,
        name=record.name,
        queue=queue_of(lease.stream),
        stream=lease.stream,
        key=record.key,
        attempt=1,
        deliveries=deliveries,
        fencing_token=lease.fence,
        enqueued_ms=entry.enqueued_ms,
        expires_ms=entry.expires_ms,
        replica=replica,
    )
    return Prepared(func, record, context)


# -- one lease, as a state machine ---------------------------------------------------------


@dataclass(frozen=True)
class RunTask:
    entry: Entry
    deliveries: int


@dataclass(frozen=True)
class Pause:
    """Wait this long (abortably), then feed ``None``: the queue's rate limit says not yet."""

    seconds: float


@dataclass(frozen=True)
class Finished:
    #: 'empty' (stream drained and forgotten), 'released', 'fenced', 'abandoned'
    reason: str


Step = Call | RunTask | Pause | Finished


class StreamRun:
    """Drives one lease from acquisition to release.

    Acknowledgements are carried on the next call (take, dead-letter or release), so a
    stream costs one round trip per ``prefetch`` tasks. A crash re-runs the tasks taken but
    not yet acknowledged: at most ``prefetch`` of them.
    """

    def __init__(
        self,
        ops: Ops,
        lease: Lease,
        *,
        stopping: Callable[[], bool],
        abandoned: Callable[[], bool],
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.ops = ops
        self.lease = lease
        self.rate_limit = rate_limit
        self._permit = False
        self.settings = ops.settings
        self._stopping = stopping
        self._abandoned = abandoned
        self.acks: list[str] = []
        self.buffer: deque[tuple[Entry, int]] = deque()
        self.processed = 0
        #: Set when the run ended by handing the stream over for a task it cannot run.
        self.deferred: str | None = None
        #: Set when the run gave the stream up after ``batch_limit`` tasks to let others run.
        self.yielded = False
        self._waiting: str | None = None

    def start(self) -> Step:
        self.buffer.extend(self.lease.initial)
        self.lease.initial = []
        return self._next()

    def _call(self, call: Call) -> Call:
        self._waiting = call.script
        # take may release an empty stream, release always does.
        self.lease.ending = call.script in ("take", "release")
        return call

    def _next(self) -> Step:
        if self._abandoned():
            return Finished("abandoned")
        if self.lease.lost:
            return Finished("fenced")
        if self._stopping() or (not self.buffer and self.processed >= self.settings.batch_limit):
            # Graceful stop or fair yield: give back what was taken but not started.
            self.yielded = not self._stopping()
            return self._call(self.ops.release(self.lease, self.acks, len(self.buffer)))
        if self.buffer:
            if self.rate_limit is not None and not self._permit:
                return self._call(self.ops.rate(queue_of(self.lease.stream), self.rate_limit))
            self._permit = False
            self._waiting = "run"
            entry, deliveries = self.buffer[0]
            return RunTask(entry, deliveries)
        want = min(self.settings.prefetch, self.settings.batch_limit - self.processed)
        return self._call(self.ops.take(self.lease, self.acks, want))

    def feed(self, result: Any) -> Step:
        """Give the reply of the last call, or the ``Outcome`` of the last ``RunTask``."""
        waiting, self._waiting = self._waiting, None
        if waiting == "run":
            return self._on_outcome(result)
        if waiting == "pause":
            return self._next()
        if waiting == "rate":
            wait_ms = int(result)
            if wait_ms <= 0:
                self._permit = True
                return self._next()
            self._waiting = "pause"
            return Pause(wait_ms / 1000)
        if waiting == "take":
            status = int(result[0])
            if status == -1:
                self.lease.mark_lost("take refused")
                return Finished("fenced")
            self.acks = []
            if status == 0:
                return Finished("empty")
            self.lease.ending = False
            for i in range(1, len(result), 2):
                self.buffer.append((Entry.parse(result[i]), int(result[i + 1])))
            if not self.buffer:
                return self._call(self.ops.release(self.lease, [], 0))
            return self._next()
        if waiting == "dead_letter":
            if int(result) == -1:
                self.lease.mark_lost("dead-letter refused")
                return Finished("fenced")
            self.acks = []
            self.buffer.popleft()
            return self._next()
        if waiting == "release":
            if int(result) == -1:
                self.lease.mark_lost("release refused")
                return Finished("fenced")
            self.acks = []
            return Finished("released")
        raise RuntimeError(f"StreamRun fed while waiting for {waiting!r}")

    def _on_outcome(self, outcome: Outcome) -> Step:
        if isinstance(outcome, Fenced) or self.lease.lost:
            return Finished("fenced")
        if self._abandoned():
            return Finished("abandoned")
        if isinstance(outcome, Acked):
            entry, _ = self.buffer.popleft()
            self.acks.append(entry.id)
            self.processed += 1
            return self._next()
        if isinstance(outcome, DeadLettered):
            entry, _ = self.buffer[0]
            self.processed += 1
            return self._call(self.ops.dead_letter(self.lease, self.acks, entry.id, outcome.header))
        if isinstance(outcome, Deferred):
            self.deferred = outcome.task_id
        # Aborted or deferred: the task stays in flight; only the ones behind it go back.
        return self._call(self.ops.release(self.lease, self.acks, len(self.buffer) - 1))

    def fail(self) -> Call | None:
        """After an I/O error the state of the last call is unknown: give the lease up without
        acknowledging anything, so the next holder re-runs whatever is still in flight."""
        self._waiting = "release"
        self.lease.ending = True
        self.acks = []
        self.buffer.clear()
        return None if self.lease.lost else self.ops.release(self.lease, [], 0, hand_off=False)
