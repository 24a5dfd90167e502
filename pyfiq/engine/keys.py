"""The Redis key schema: the only module that formats a key.

Every key of a stream shares the hash tag of the stream's *shard*::

    {prefix}:{s<N>}:queues             sorted set: queue -> earliest claimable-at of its streams
    {prefix}:{s<N>}:r:<queue>          sorted set: stream -> claimable-at (ms, Redis clock)
    {prefix}:{s<N>}:epoch              fencing counter of the shard
    {prefix}:{s<N>}:layout             the shard count (written by polls and producers, "<count>?" while
                                       a producer lays it out; checked by enqueues)
    {prefix}:{s<N>}:dlqs               set of streams of the shard with dead letters
    {prefix}:{s<N>}:paused             set of paused queues and streams (a queue is in every shard's)
    {prefix}:{s<N>}:counts:<queue>     hash: per-minute counts of the queue's finished tasks in the
                                       shard, a ring of COUNT_MINUTES slots (see lib.lua tally)
    {prefix}:{s<N>}:q:<stream>:pending list of encoded tasks, oldest first
    {prefix}:{s<N>}:q:<stream>:later   sorted set: delayed tasks by due time (Redis ms), as
                                       "<seq>|<encoded task>" (see lib.lua promote)
    {prefix}:{s<N>}:q:<stream>:lseq    counter giving delayed tasks their seq (enqueue order)
    {prefix}:{s<N>}:q:<stream>:inflight list of tasks handed to a lease holder, oldest first
    {prefix}:{s<N>}:q:<stream>:lease   string "<fencing token>:<nonce>", with PX expiry
    {prefix}:{s<N>}:q:<stream>:meta    hash: 'handed'; what the holder's last heartbeat said it
                                       runs ('running', and 'attempt' while it retries it);
                                       an operator's 'skipped' and 'halted' (these five are
                                       META_FIELDS in lib.lua: every other field is a mark);
                                       per task id: 'd:' deliveries, 's:' started
                                       by the holder (the Redis ms of its hand-out), 'x:' holders
                                       lost while it ran, 'l:' runs that outlived their lease
    {prefix}:{s<N>}:q:<stream>:dead    sorted set: "<header json>\\n<encoded task>" by sequence
    {prefix}:{s<N>}:q:<stream>:deadids hash: task id -> its dead letter's sequence
    {prefix}:{s<N>}:q:<stream>:dedup:<key>  string: id of the task accepted under <key>
    {prefix}:{s<N>}:q:<stream>:res:<id>     string: the stored result of task <id> (with a TTL);
                                       also the sharded channel announcing that task's end
    {prefix}:{s<N>}:q:<stream>:res:<id>#deleted  string: an operator deleted pending task <id>
                                       (kept a day, so a status read says so at any depth)

    {prefix}:{s<N>}:sched:<name>       hash: a periodic schedule whose tasks go to a stream of
                                       this shard (see tick.lua): its last tick, rule, version
    {prefix}:{s<N>}:sched:<name>:forgotten  the record an operator forgot, kept FORGOTTEN_MS (admin)
    {prefix}:{s<N>}:scheds             set of the names of the shard's schedules

    {prefix}:wake                      Pub/Sub channel; message: the shard that has new work
    {prefix}:{s<N>}:wake               on Redis Cluster instead: the shard's sharded channel
    {prefix}:shards                    the shard count, as earlier versions wrote it: read, not written
    {prefix}:{rl:<queue>}:rate         rate limit state of a queue (its own slot)
    {prefix}:{replicas}                hash: replica id -> what it last said of itself (heartbeat)
    {prefix}:{replicas}:pollers        sorted set by name: "<group>|<replica id>" of the replicas
                                       sharing the safety poll (see beat.lua)

A stream is a logical queue (``"billing"``) or one ordered stream of a keyed queue
(``"webhooks#c-42"``). The ready sets are per queue and shard, indexed by the shard's ``queues``
set, so a worker looks only at the queues it consumes, whatever backlog other queues hold.
Because a stream's keys and its shard's ready sets and epoch live in one
slot, every script touches one slot, so the same scripts run on one Redis, under Sentinel and
on Redis Cluster, and the shards spread over the cluster's nodes.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from ..errors import ConfigurationError

_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:/@-]{1,200}")
STREAM_SEPARATOR = "#"
#: Bounds of a stream key. Redis keeps each stream's name in several keys, a process caches the
#: names it meets, and logs and the operator's terminal show them.
MAX_KEY_CHARS = 200
MAX_KEY_BYTES = 512
#: C0 and C1 controls and DEL (they would reach logs and terminals), and lone surrogates (which
#: UTF-8 cannot encode, so Redis could not be sent the name).
_KEY_REFUSED = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: The longest name of a stream whose queue and key are valid: only such names are cached.
MAX_STREAM_CHARS = 200 + len(STREAM_SEPARATOR) + MAX_KEY_CHARS
#: Stream names whose keys a process keeps formatted: at most this many entries of at most
#: MAX_STREAM_CHARS each, a few megabytes however many streams it meets.
STREAM_CACHE_SIZE = 1024
#: Minutes of finished-task counts kept per queue and shard (the slots of the ring in lib.lua).
COUNT_MINUTES = 60


def validate_queue_name(queue: str) -> str:
    # fullmatch: "$" would also match before a final newline.
    if not isinstance(queue, str) or not _QUEUE_NAME.fullmatch(queue):
        raise ConfigurationError(f"invalid queue name {queue!r}: use 1-200 characters among letters, digits and _.:/@-")
    return queue


def validate_key(key: str) -> str:
    """Return ``key`` if it may name a stream of a queue, else raise ``ConfigurationError``:
    at most MAX_KEY_CHARS characters and MAX_KEY_BYTES bytes of UTF-8, no control character."""
    problem = None
    if len(key) > MAX_KEY_CHARS:
        problem = f"{len(key)} characters"
    elif (refused := _KEY_REFUSED.search(key)) is not None:
        problem = f"the character {refused.group()!r} at {refused.start()}"
    elif len(key) * 4 > MAX_KEY_BYTES and len(key.encode()) > MAX_KEY_BYTES:
        problem = f"{len(key.encode())} bytes of UTF-8"
    if problem is None:
        return key
    shown = repr(key[:40]) + ("..." if len(key) > 40 else "")
    raise ConfigurationError(
        f"invalid stream key {shown}: it has {problem}; a key has at most {MAX_KEY_CHARS} characters and "
        f"{MAX_KEY_BYTES} bytes of UTF-8, and no control characters; nothing was enqueued"
    )


def consumed_queues(queues: Iterable[str] | None) -> list[str] | None:
    """A worker's ``queues=`` argument, validated: None (every registered queue) or names."""
    if queues is None:
        return None
    if isinstance(queues, str):
        raise ConfigurationError(f"queues takes a list of queue names, not the string {queues!r}: write [{queues!r}]")
    return sorted({validate_queue_name(q) for q in queues})


def stream_name(queue: str, key: str | None = None) -> str:
    """The stream a task goes to: the queue itself, or one ordered stream of a keyed queue."""
    return queue if key is None else f"{queue}{STREAM_SEPARATOR}{key}"


def queue_of(stream: str) -> str:
    return stream.split(STREAM_SEPARATOR, 1)[0]


@dataclass(frozen=True)
class StreamKeys:
    stream: str
    shard: int
    pending: str
    later: str
    later_seq: str
    inflight: str
    lease: str
    meta: str
    dead: str
    dead_ids: str
    ready: str
    queues: str
    layout: str
    paused: str
    epoch: str
    dlq_index: str
    counts: str
    #: Stored results: the result of task ``id`` is the key ``results + id``, and its waiters
    #: listen on the sharded channel of the same name (see ``lib.lua``'s ``store_results``).
    results: str
    _dedup_prefix: str

    def result(self, task_id: str) -> str:
        return self.results + task_id

    def dedup(self, key: str) -> str:
        return self._dedup_prefix + key


@dataclass(frozen=True)
class ScheduleKeys:
    """The keys ``tick.lua`` takes: a periodic schedule's record, kept in the shard of the stream
    its ticks' tasks go to (so one script both moves its last tick and enqueues the task), and
    the keys of that stream it enqueues with."""

    record: str
    #: The record as an operator's forget left it, for a while (see ``admin.forget_schedule``).
    forgotten: str
    schedules: str
    pending: str
    ready: str
    queues: str
    layout: str
    later: str
    later_seq: str
    lease: str
    paused: str


class KeySchema:
    def __init__(self, prefix: str = "pyfiq", shards: int = 16, *, sharded_wake: bool = False) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"invalid key prefix {prefix!r}: non-empty, without braces")
        if not 1 <= shards <= 16384:
            raise ConfigurationError(f"shards must be between 1 and 16384, got {shards}")
        self.prefix = prefix
        self.shards = shards
        self.wake_channel = f"{prefix}:wake"
        #: One wake-up channel per shard (sharded Pub/Sub, for Redis Cluster) instead of one.
        self.sharded_wake = sharded_wake
        #: The shard count earlier versions wrote for the prefix; replicas still check it.
        self.layout_key = f"{prefix}:shards"
        self._cached_stream = lru_cache(maxsize=STREAM_CACHE_SIZE)(self._stream)

    def stream(self, stream: str) -> StreamKeys:
        """The keys of ``stream``. Cached only for names a valid queue and key can make: the
        operator tools read whatever names Redis holds (an older version took any key), and
        the cache must stay bounded in bytes, not only in entries."""
        if len(stream) <= MAX_STREAM_CHARS:
            return self._cached_stream(stream)
        return self._stream(stream)

    def shard_of(self, stream: str) -> int:
        # crc32, not hash(): every process must map a stream to the same shard.
        return zlib.crc32(stream.encode()) % self.shards

    def _tag(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}"

    def wake(self, shard: int) -> str:
        """The channel announcing new work in ``shard``. With ``sharded_wake`` it carries the
        shard's hash tag, so on a cluster the scripts ``SPUBLISH`` it from the shard's own node
        and only that node delivers it; otherwise every shard shares ``wake_channel``."""
        return f"{self._tag(shard)}:wake" if self.sharded_wake else self.wake_channel

    @property
    def replicas(self) -> str:
        return f"{self.prefix}:{{replicas}}"

    @property
    def pollers(self) -> str:
        return f"{self.prefix}:{{replicas}}:pollers"

    def rate(self, queue: str) -> str:
        return f"{self.prefix}:{{rl:{queue}}}:rate"

    def queues(self, shard: int) -> str:
        return f"{self._tag(shard)}:queues"

    def ready(self, shard: int, queue: str) -> str:
        return f"{self._tag(shard)}:r:{queue}"

    def paused(self, shard: int) -> str:
        return f"{self._tag(shard)}:paused"

    def layout(self, shard: int) -> str:
        return f"{self._tag(shard)}:layout"

    def epoch(self, shard: int) -> str:
        return f"{self._tag(shard)}:epoch"

    def dlq_index(self, shard: int) -> str:
        return f"{self._tag(shard)}:dlqs"

    def counts(self, shard: int, queue: str) -> str:
        return f"{self._tag(shard)}:counts:{queue}"

    def schedules(self, shard: int) -> str:
        return f"{self._tag(shard)}:scheds"

    def schedule_record(self, shard: int, name: str) -> str:
        return f"{self._tag(shard)}:sched:{name}"

    def schedule_forgotten(self, shard: int, name: str) -> str:
        return f"{self._tag(shard)}:sched:{name}:forgotten"

    def schedule(self, name: str, stream: str) -> ScheduleKeys:
        k = self.stream(stream)
        return ScheduleKeys(
            record=self.schedule_record(k.shard, name),
            forgotten=self.schedule_forgotten(k.shard, name),
            schedules=self.schedules(k.shard),
            pending=k.pending,
            ready=k.ready,
            queues=k.queues,
            layout=k.layout,
            later=k.later,
            later_seq=k.later_seq,
            lease=k.lease,
            paused=k.paused,
        )

    def _stream(self, stream: str) -> StreamKeys:
        shard = self.shard_of(stream)
        base = f"{self._tag(shard)}:q:{stream}:"
        return StreamKeys(
            stream=stream,
            shard=shard,
            pending=base + "pending",
            later=base + "later",
            later_seq=base + "lseq",
            inflight=base + "inflight",
            lease=base + "lease",
            meta=base + "meta",
            dead=base + "dead",
            dead_ids=base + "deadids",
            ready=self.ready(shard, queue_of(stream)),
            queues=self.queues(shard),
            layout=self.layout(shard),
            paused=self.paused(shard),
            epoch=self.epoch(shard),
            dlq_index=self.dlq_index(shard),
            counts=self.counts(shard, queue_of(stream)),
            results=base + "res:",
            _dedup_prefix=base + "dedup:",
        )
