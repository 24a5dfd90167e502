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

from .config import MAX_PREFETCH, Settings
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


def lease_margin(ttl: float) -> float:
    """How much earlier than Redis a holder counts its lease as gone: room for the time a
    request spends before Redis runs it and for clock-rate differences."""
    return min(0.1 * ttl, 1.0)


@dataclass
class Lease:
    stream: str
    keys: StreamKeys
    token: str
    fence: int
    #: Set when the lease is lost (refused renewal) or the worker stops: ends retry back-offs.
    abort: Flag
    ttl: float = 0.0
    #: Monotonic time until which the lease is surely held. Every deadline counts from the
    #: moment the acquiring or renewing request was *sent*: Redis may have run it at any
    #: point after that, so a slow reply must never extend the lease in the holder's eyes.
    valid_until: float = 0.0
    lost: bool = False
    lost_reason: str = ""
    #: A call that may end the lease is in flight: a refused renewal then means "released".
    ending: bool = False
    #: Tasks taken together with the lease, for the holder's first batch.
    initial: list[tuple[Entry, int]] = field(default_factory=list)
    #: Redis's clock (ms) when it ran the last take or acquire, and when that request was sent.
    redis_ms: int = 0
    redis_at: float = 0.0

    def confirm(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` succeeded."""
        self.valid_until = max(self.valid_until, sent_at + self.ttl - lease_margin(self.ttl))

    def lapsed(self) -> bool:
        """True once the lease may be gone even if no heartbeat said so yet (this process was
        paused, or replies are slow): start nothing new."""
        if not self.lost and time.monotonic() >= self.valid_until:
            self.mark_lost("no renewal confirmed within the lease TTL (counted from when it was sent)")
        return self.lost

    def mark_lost(self, reason: str) -> None:
        if not self.lost:
            self.lost, self.lost_reason = True, reason
        self.abort.set()

    def clock(self, redis_ms: int, sent_at: float) -> None:
        self.redis_ms, self.redis_at = redis_ms, sent_at

    def redis_now_ms(self) -> float:
        """Redis's clock now, estimated from the last reply: counted from the request's send
        time, so it errs late by at most a round trip (a deadline is never passed unseen)."""
        return self.redis_ms + (time.monotonic() - self.redis_at) * 1000


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


#: Due queues of a shard's index one ``due`` call scans at most (it pages on in later calls).
DUE_SCAN = 200

#: A rate-limited stream whose permit is further away than this hands its lease back (parked
#: until then) instead of holding a worker slot while it waits.
PARK_AFTER_MS = 50


#: The keys each script takes, in order, by name: a stream's keys are ``StreamKeys`` attributes;
#: every script names them the same way (``local pending = KEYS[2]``), which a test checks, so the
#: order is stated once. ``enqueue`` takes one dedup key per task after these.
KEY_NAMES: dict[str, tuple[str, ...]] = {
    "enqueue": ("pending", "ready", "queues", "layout"),
    "due": ("queues", "layout"),
    "acquire": ("queues", "ready", "epoch", "lease", "meta", "pending", "inflight", "dead", "dead_ids", "dlq_index"),
    "renew": ("lease", "ready", "queues"),
    "take": ("lease", "pending", "inflight", "meta", "ready", "queues", "dead", "dead_ids", "dlq_index"),
    "dead_letter": ("lease", "inflight", "meta", "dead", "dead_ids", "dlq_index"),
    "release": ("lease", "pending", "inflight", "meta", "ready", "queues"),
    "requeue": ("dead", "dead_ids", "pending", "ready", "queues", "dlq_index"),
    "rate": ("rate",),
    "lost": ("inflight", "meta"),
}


def stream_call(script: str, k: StreamKeys, args: list[Any], extra_keys: Sequence[str] = ()) -> Call:
    return Call(script, [*(getattr(k, name) for name in KEY_NAMES[script]), *extra_keys], args)


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
        args: list[Any] = [
            stream,
            self.keys.wake_channel,
            k.shard,
            int(self.settings.dedup_window * 1000),
            self.keys.shards,
            len(items),
        ]
        for task_id, expires_in_ms, payload in items:
            args += [task_id, expires_in_ms, payload]
        return stream_call("enqueue", k, args, [k.dedup(d) for d in dedup_keys or ()])

    @staticmethod
    def parse_enqueue(reply: list[Any]) -> list[tuple[str, bool]]:
        return [(_text(reply[i]), bool(int(reply[i + 1]))) for i in range(0, len(reply), 2)]

    def due(self, shard: int, want: int, queues: Sequence[str] | None, offset: int = 0) -> Call:
        return Call(
            "due",
            [self.keys.queues(shard), self.keys.layout(shard)],
            [want, self.keys.shards, DUE_SCAN, offset, *(queues or ())],
        )

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
        return stream_call(
            "acquire", k, [stream, self.settings.lease_ttl_ms, secrets.token_hex(8), want, self.settings.max_deliveries]
        )

    def parse_acquire(self, stream: str, reply: list[Any], abort: Flag, sent_at: float) -> Lease | None:
        """The lease a successful ``acquire`` reply grants; ``sent_at`` is the monotonic time the
        request was sent, from which the lease's validity is counted."""
        if int(reply[0]) != 1:
            return None
        ttl = self.settings.lease_ttl
        lease = Lease(stream, self.keys.stream(stream), _text(reply[1]), int(reply[2]), abort, ttl=ttl)
        lease.confirm(sent_at)
        lease.clock(int(reply[3]), sent_at)
        lease.initial = [(Entry.load(reply[i]), int(reply[i + 1])) for i in range(4, len(reply), 2)]
        return lease

    def renew(self, lease: Lease) -> Call:
        k = lease.keys
        return stream_call("renew", k, [lease.token, self.settings.lease_ttl_ms, k.stream])

    def take(self, lease: Lease, acks: Sequence[str], want: int) -> Call:
        k = lease.keys
        return stream_call("take", k, [lease.token, k.stream, len(acks), want, self.settings.max_deliveries, *acks])

    def dead_letter(self, lease: Lease, acks: Sequence[str], task_id: str | bytes, header: str) -> Call:
        k = lease.keys
        return stream_call("dead_letter", k, [lease.token, k.stream, len(acks), task_id, header, *acks])

    def release(self, lease: Lease, acks: Sequence[str], started: Sequence[str] = (), delay_ms: int = 0) -> Call:
        """Give the lease up. ``started``: tasks this holder started and did not finish (they
        may have run); every other task it was handed goes back as never delivered here.
        ``delay_ms``: the stream may not be claimed again before then (a parked stream)."""
        k = lease.keys
        return stream_call(
            "release",
            k,
            [
                lease.token,
                k.stream,
                len(acks),
                len(started),
                self.keys.wake_channel,
                k.shard,
                max(0, int(delay_ms)),
                *acks,
                *started,
            ],
        )

    def lost(self, lease: Lease, entry: Entry) -> Call:
        """Note that ``entry`` ran past this holder's lease while the holder was alive."""
        k = lease.keys
        return stream_call("lost", k, [entry.raw, MAX_PREFETCH + 1])

    def rate(self, queue: str, limit: RateLimit) -> Call:
        return Call("rate", [self.keys.rate(queue)], [1000.0 / limit.per_second, limit.burst])

    def requeue(
        self, stream: str, *, front: bool, limit: int, low: str = "-inf", high: str = "+inf", task_id: str | None = None
    ) -> Call:
        """One bounded step of moving dead letters back to pending; see ``requeue.lua``."""
        k = self.keys.stream(stream)
        return stream_call(
            "requeue",
            k,
            [stream, self.keys.wake_channel, k.shard, "front" if front else "back", limit, low, high, task_id or ""],
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
    """The lease was lost: drop the result, change nothing. ``ran``: the task ran (at least
    partly) on this holder after or while its lease went, which the holder reports."""

    ran: bool = False


@dataclass(frozen=True)
class Deferred:
    """This replica cannot run the task (its function is not registered here, as during a
    rolling deploy): hand the stream over untouched so a replica that can run it takes it."""

    task_id: str


Outcome = Acked | DeadLettered | Aborted | Fenced | Deferred


def safe_text(value: object) -> str:
    """``str(value)``, or a fallback when that raises: whatever a task raises is hostile input,
    and the bookkeeping around it must survive it."""
    try:
        return str(value)
    except BaseException as exc:
        return f"<{type(value).__qualname__} object: str() raised {type(exc).__qualname__}>"


def safe_repr(value: object) -> str:
    try:
        return repr(value)
    except BaseException as exc:
        return f"<{type(value).__qualname__} object: repr() raised {type(exc).__qualname__}>"


def describe_error(error: BaseException) -> str:
    """``Type: message``, safely: how errors appear in logs and dead letters."""
    return f"{type(error).__qualname__}: {safe_text(error)}"


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
        header["error"] = safe_text(error)
        try:
            header["traceback"] = "".join(traceback.format_exception(error))
        except BaseException:
            header["traceback"] = ""
    # One line: the stored record is "<header>\n<entry>".
    return json.dumps(header, separators=(",", ":"), default=safe_text)


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
    A task whose deadline has passed by Redis's clock (estimated from the last reply) is
    dead-lettered as expired, however long it waited in this holder's buffer.
    """
    if entry.malformed:
        error = DecodeError(f"malformed task entry {entry.raw[:80]!r}")
        return DeadLettered(dead_letter_header("undecodable", replica=replica, deliveries=deliveries, error=error))
    try:
        record = TaskRecord.decode(entry.payload, settings.serializer)
    except DecodeError as exc:
        return DeadLettered(dead_letter_header("undecodable", replica=replica, deliveries=deliveries, error=exc))
    if entry.expires_ms and entry.expires_ms <= lease.redis_now_ms():
        return DeadLettered(
            dead_letter_header(
                "expired",
                replica=replica,
                deliveries=deliveries,
                name=record.name,
                error=TimeoutError(f"the task's deadline passed before it could start (expires_ms={entry.expires_ms})"),
            )
        )
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
    #: 'empty' (stream drained and forgotten), 'released', 'parked' (handed back until its rate
    #: permit), 'fenced', 'abandoned'
    reason: str


Step = Call | RunTask | Pause | Finished


class StreamRun:
    """Drives one lease from acquisition to release.

    Acknowledgements are carried on the next call (take, dead-letter or release), so a
    stream costs one round trip per ``prefetch`` tasks. A crash re-runs the tasks taken but
    not yet acknowledged: at most ``prefetch`` of them. A rate-limited stream asks its permit
    before each task starts, and before the take that hands the next one over, so Redis's
    'started' mark on a handed task is true; a permit further away than ``PARK_AFTER_MS``
    parks the stream (its lease handed back until then) instead of holding a worker slot.
    """

    def __init__(
        self,
        ops: Ops,
        lease: Lease,
        *,
        stopping: Callable[[], bool],
        abandoned: Callable[[], bool],
        rate_limit: RateLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ops = ops
        self.lease = lease
        self.rate_limit = rate_limit
        self._permit = False
        self.settings = ops.settings
        self._stopping = stopping
        self._abandoned = abandoned
        self._clock = clock
        self.acks: list[str] = []
        self.buffer: deque[tuple[Entry, int]] = deque()
        self.processed = 0
        #: Set when the run ended by handing the stream over for a task it cannot run.
        self.deferred: str | None = None
        #: Set when the run gave the stream up after ``batch_limit`` tasks to let others run.
        self.yielded = False
        #: Set when the run handed the stream back to wait for its rate permit.
        self.parked = False
        self._waiting: str | None = None
        self._head_started = False
        self._sent_at = 0.0
        self._final = "released"

    def start(self) -> Step:
        self.buffer.extend(self.lease.initial)
        self.lease.initial = []
        return self._next()

    def _call(self, call: Call) -> Call:
        self._waiting = call.script
        self._sent_at = self._clock()
        # take may release an empty stream, release always does.
        self.lease.ending = call.script in ("take", "release")
        return call

    def _release(self, started: list[str], delay_ms: int = 0, final: str = "released") -> Call:
        self._final = final
        return self._call(self.ops.release(self.lease, self.acks, started, delay_ms))

    def _next(self) -> Step:
        if self._abandoned():
            return Finished("abandoned")
        if self.lease.lost:
            return Finished("fenced")
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
            return RunTask(entry, deliveries)
        want = min(self.settings.prefetch, self.settings.batch_limit - self.processed)
        if self.rate_limit is not None:
            want = 1  # one permit, one task: each start is asked for when it happens
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
            if wait_ms > PARK_AFTER_MS:
                self.parked = True
                return self._release([], wait_ms, final="parked")
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
            self.lease.clock(int(result[1]), self._sent_at)
            for i in range(2, len(result), 2):
                self.buffer.append((Entry.load(result[i]), int(result[i + 1])))
            if not self.buffer:
                return self._release([])
            return self._next()
        if waiting == "dead_letter":
            if int(result) == -1:
                self.lease.mark_lost("dead-letter refused")
                return Finished("fenced")
            self.acks = []
            self.buffer.popleft()
            self._head_started = False
            return self._next()
        if waiting == "release":
            if int(result) == -1:
                self.lease.mark_lost("release refused")
                return Finished("fenced")
            self.acks = []
            return Finished(self._final)
        if waiting == "lost":
            return Finished("fenced")
        raise RuntimeError(f"StreamRun fed while waiting for {waiting!r}")

    def _on_outcome(self, outcome: Outcome) -> Step:
        if isinstance(outcome, Fenced) or self.lease.lost:
            if isinstance(outcome, Fenced) and outcome.ran and self.buffer:
                # Say so in Redis (unfenced, changes no queue state): if this keeps happening
                # the task is dead-lettered as 'lease-lost', not as a task that kills workers.
                self._waiting = "lost"
                return self.ops.lost(self.lease, self.buffer[0][0])
            return Finished("fenced")
        if self._abandoned():
            return Finished("abandoned")
        if isinstance(outcome, Acked):
            entry, _ = self.buffer.popleft()
            self._head_started = False
            self.acks.append(entry.id)
            self.processed += 1
            return self._next()
        if isinstance(outcome, DeadLettered):
            entry, _ = self.buffer[0]
            self.processed += 1
            task_id: str | bytes = entry.raw[:32] if entry.malformed else entry.id
            return self._call(self.ops.dead_letter(self.lease, self.acks, task_id, outcome.header))
        if isinstance(outcome, Deferred):
            self.deferred = outcome.task_id
            return self._release([])
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
        call = None if self.lease.lost else self.ops.release(self.lease, self.acks, started)
        self.buffer.clear()
        return call
