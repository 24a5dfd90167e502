"""Read-only views of a deployment for operators (the CLI, the dashboard, and tools of your
own): per stream and per queue status, dead letters across every stream of a keyed queue, and
the fleet's rate from the per-minute counts the scripts keep. Typed results, read from the
shards' ready sets and dead-letter indexes, never from a scan of all keys.

The CLI's whole-deployment listings read every live stream. The views the dashboard refreshes
(``overview``, ``stream_page``, ``dead_letter_page``) are bounded whatever the number of streams:
each reads at most ``OVERVIEW_STREAMS`` streams per queue (those waiting longest and those held
now), pages through the rest with ``ZSCAN``/``SSCAN`` cursors and ``COUNT``, and reads dead
letters in ``ZRANGE`` windows; where a figure could not be read whole it says so (``complete``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..backend.backend import DeadLetter, RedisQueueBackend
from ..engine.keys import COUNT_MINUTES, STREAM_SEPARATOR, queue_of
from ..errors import DecodeError
from ..task import Entry, TaskRecord


@dataclass(frozen=True)
class StreamStatus:
    """One stream: counts, how old its oldest pending task is, and who holds its lease."""

    stream: str
    queue: str
    pending: int
    inflight: int
    dead: int
    paused: bool
    holder: str | None
    fence: int | None
    lease_ms: int | None
    oldest_age_s: float | None
    #: How long the task running now has run (from the holder's heartbeat, or Redis's mark).
    running_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QueueStatus:
    """A queue: its streams' counts summed, the oldest task among them, and whether paused."""

    queue: str
    streams: int
    pending: int
    inflight: int
    dead: int
    paused: bool
    oldest_age_s: float | None
    held: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def known_streams(backend: RedisQueueBackend) -> list[str]:
    """Streams with work, a lease or dead letters."""
    return sorted(set(backend.active_streams()) | set(backend.dead_letter_streams()))


def streams_of(backend: RedisQueueBackend, queue: str, key: str | None = None) -> list[str]:
    """The known streams of ``queue`` (only ``queue#key`` with a key)."""
    if key is not None:
        wanted = f"{queue}#{key}"
        return [s for s in known_streams(backend) if s == wanted]
    return [s for s in known_streams(backend) if queue_of(s) == queue]


def stream_status(backend: RedisQueueBackend, stream: str) -> StreamStatus:
    d = read_streams(backend, [stream])[0]
    return StreamStatus(
        stream=stream,
        queue=d.queue,
        pending=d.pending,
        inflight=d.inflight,
        dead=d.dead,
        paused=d.paused,
        holder=d.holder,
        fence=d.fence,
        lease_ms=d.lease_ms,
        oldest_age_s=d.oldest_age_s,
        running_s=d.running_s,
    )


def queue_statuses(backend: RedisQueueBackend, queue: str | None = None) -> list[QueueStatus]:
    """Every known queue (or one), trouble first: the oldest waiting task leads."""
    by_queue: dict[str, list[StreamStatus]] = {}
    for stream in known_streams(backend):
        if queue is None or queue_of(stream) == queue:
            by_queue.setdefault(queue_of(stream), []).append(stream_status(backend, stream))
    paused = set(backend.paused())
    out = [
        QueueStatus(
            queue=q,
            streams=len(rows),
            pending=sum(r.pending for r in rows),
            inflight=sum(r.inflight for r in rows),
            dead=sum(r.dead for r in rows),
            paused=q in paused or all(r.paused for r in rows),
            oldest_age_s=max((r.oldest_age_s for r in rows if r.oldest_age_s is not None), default=None),
            held=sum(r.holder is not None for r in rows),
        )
        for q, rows in by_queue.items()
    ]
    return sorted(out, key=lambda s: (-(s.oldest_age_s or 0.0), -s.dead, s.queue))


def dead_letters_of(
    backend: RedisQueueBackend, queue: str, key: str | None = None, limit: int = 100
) -> list[DeadLetter]:
    """Dead letters of every stream of ``queue`` (or of ``queue#key``), oldest first."""
    found: list[DeadLetter] = []
    for stream in streams_of(backend, queue, key):
        found += backend.dead_letters(stream, limit)
    found.sort(key=lambda d: (d.header.get("at_ms", 0), d.header.get("seq", 0)))
    return found[:limit]


def find_dead_letter(backend: RedisQueueBackend, queue: str, task_id: str) -> DeadLetter | None:
    """The dead letter of ``task_id`` in any stream of ``queue`` (found by its id index)."""
    for stream in streams_of(backend, queue):
        found = backend.dead_letter(stream, task_id)
        if found is not None:
            return found
    return None


#: A frame: its "File" line, then its indented lines (the source line, and the markers under it
#: that Python 3.11+ adds).
_FRAME = re.compile(r'^  File "([^"]+)", line \d+, in .*\n(?:    .*\n)*', re.M)
#: Frames of the machinery that runs a task: pyfiq, tenacity, and the thread pool pyfiq hands a
#: plain function to.
_MACHINERY = ("/pyfiq/", "/tenacity/", "/concurrent/futures/")


def task_traceback(text: str) -> str:
    """A task's traceback without the frames of the machinery around the task's own."""

    def keep(m: re.Match[str]) -> str:
        path = m.group(1).replace("\\", "/")
        return "" if any(part in path for part in _MACHINERY) else m.group(0)

    return _FRAME.sub(keep, text)


def dead_letter_dict(d: DeadLetter) -> dict[str, Any]:
    """A dead letter as plain data (for ``--json``)."""
    return {
        "stream": d.stream,
        "task_id": d.task_id,
        "reason": d.reason,
        "name": d.record.name if d.record else d.header.get("name"),
        "args": d.record.args if d.record else None,
        "kwargs": d.record.kwargs if d.record else None,
        **{k: v for k, v in d.header.items() if k != "traceback"},
        "traceback": task_traceback(str(d.header.get("traceback", ""))),
    }


def to_json(row: dict[str, Any]) -> str:
    return json.dumps(row, default=str, separators=(",", ":"))


# -- bounded views (the dashboard) ------------------------------------------------------------

#: Streams of one queue an overview reads at most: those waiting longest (lowest claimable-at in
#: the ready sets) plus those held now (from the replica registry, bounded by the fleet's slots).
OVERVIEW_STREAMS = 200
#: Members a page examines at most in the shards' ready sets or dead-letter indexes (in
#: ``SCAN`` steps of ``SCAN_COUNT``); past it the page offers to go on from where it stopped.
SCAN_BUDGET = 5000
SCAN_COUNT = 500
#: Streams read per pipelined round trip (bounds each reply).
BATCH = 500
#: Dead-letter records one page reads at most (a reason filter skips the others).
DEAD_WINDOW = 500


@dataclass(frozen=True)
class TaskSummary:
    """A task as stored: id, name (None when its payload cannot be decoded), when it was
    enqueued, how many consumers were handed it, and when its current hand-out started."""

    id: str
    name: str | None
    enqueued_ms: int
    deliveries: int = 0
    started_ms: int | None = None


@dataclass(frozen=True)
class StreamDetail:
    """One stream as an operator sees it. ``head`` is the next task in line (the first in
    flight, else the first pending); ``running_s`` how long the holder has had that task, when
    Redis recorded its hand-out; ``blocked`` when that is longer than the caller's threshold."""

    stream: str
    queue: str
    pending: int
    inflight: int
    dead: int
    paused: bool
    holder: str | None
    fence: int | None
    lease_ms: int | None
    head: TaskSummary | None
    oldest_age_s: float | None
    running_s: float | None = None
    blocked: bool = False

    @property
    def key(self) -> str | None:
        return self.stream.partition(STREAM_SEPARATOR)[2] if STREAM_SEPARATOR in self.stream else None


@dataclass(frozen=True)
class Rate:
    """Tasks per second over the last minute: ``succeeded`` (acknowledged) and ``failed``
    (dead-lettered, whatever the reason), across the fleet."""

    succeeded: float = 0.0
    failed: float = 0.0

    def __add__(self, other: Rate) -> Rate:
        return Rate(self.succeeded + other.succeeded, self.failed + other.failed)


@dataclass(frozen=True)
class QueueOverview:
    """A queue summed over the streams an overview read (``read`` of ``streams`` live ones).
    ``complete`` is false when there were more than it reads: the sums are then lower bounds."""

    queue: str
    streams: int
    read: int
    pending: int
    inflight: int
    dead: int
    paused: bool
    paused_streams: int
    blocked: int
    held: int
    oldest_age_s: float | None
    rate: Rate
    complete: bool

    @property
    def trouble(self) -> tuple[int, int, float, int]:
        """Sorts trouble first: blocked streams, dead letters growing, the oldest task, dead letters."""
        return (-self.blocked, -(self.rate.failed > 0), -(self.oldest_age_s or 0.0), -self.dead)


@dataclass
class _Scan:
    """What an overview found in the shards' indexes, before reading streams."""

    queues: set[str] = field(default_factory=set)
    dead_streams: dict[str, list[str]] = field(default_factory=dict)
    dead_complete: bool = True
    paused: set[str] = field(default_factory=set)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def redis_now_ms(backend: RedisQueueBackend) -> int:
    seconds, micros = backend.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _summary(
    raw: bytes | None, backend: RedisQueueBackend, deliveries: int = 0, started: Any = None
) -> TaskSummary | None:
    if raw is None:
        return None
    entry = Entry.load(raw)
    name = None
    if not entry.malformed:
        with contextlib.suppress(DecodeError):
            name = TaskRecord.decode(entry.payload, backend.settings.serializer).name
    return TaskSummary(entry.id, name, entry.enqueued_ms, deliveries, int(started) if started else None)


def read_streams(
    backend: RedisQueueBackend, streams: Sequence[str], *, blocked_after: float | None = None
) -> list[StreamDetail]:
    """The state of ``streams``, in that order: two pipelined round trips per ``BATCH`` streams
    (counts, lease, pause and list heads; then the head task's delivery and start marks)."""
    out: list[StreamDetail] = []
    for start in range(0, len(streams), BATCH):
        out += _read_batch(backend, streams[start : start + BATCH], blocked_after)
    return out


def _read_batch(backend: RedisQueueBackend, streams: Sequence[str], blocked_after: float | None) -> list[StreamDetail]:
    pipe = backend.client.pipeline(transaction=False)
    pipe.time()
    pipe.hgetall(backend.keys.replicas)
    for stream in streams:
        k = backend.keys.stream(stream)
        pipe.llen(k.pending).llen(k.inflight).zcard(k.dead).get(k.lease).pttl(k.lease)
        pipe.smismember(k.paused, [stream, queue_of(stream)]).lindex(k.inflight, 0).lindex(k.pending, 0)
    with backend.translated():
        replies = pipe.execute()
    seconds, micros = replies[0]
    now = int(seconds) * 1000 + int(micros) // 1000
    heartbeats = _running(replies[1])
    rows = [replies[2 + 8 * i : 10 + 8 * i] for i in range(len(streams))]
    marks: list[Any] = []
    running = [(i, Entry.load(row[6])) for i, row in enumerate(rows) if row[6] is not None]
    if running:
        pipe = backend.client.pipeline(transaction=False)
        for i, entry in running:
            pipe.hmget(backend.keys.stream(streams[i]).meta, [f"d:{entry.id}", f"s:{entry.id}"])
        with backend.translated():
            marks = pipe.execute()
    mark_of = {i: m for (i, _), m in zip(running, marks, strict=True)}
    return [
        _detail(backend, stream, row, mark_of.get(i), now, blocked_after, heartbeats)
        for i, (stream, row) in enumerate(zip(streams, rows, strict=True))
    ]


def _running(registry: dict[bytes, bytes]) -> dict[tuple[str, str], tuple[str, int]]:
    """(replica, stream) -> (task id, started ms) as each worker's last heartbeat says."""
    out: dict[tuple[str, str], tuple[str, int]] = {}
    for replica, body in registry.items():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            for stream, (task_id, started) in json.loads(body).get("running", {}).items():
                out[(_text(replica), str(stream))] = (str(task_id), int(started))
    return out


def _detail(
    backend: RedisQueueBackend,
    stream: str,
    row: list[Any],
    marks: Any,
    now: int,
    blocked_after: float | None,
    running: dict[tuple[str, str], tuple[str, int]],
) -> StreamDetail:
    pending, inflight, dead, lease, ttl, paused, first_inflight, first_pending = row
    token = lease.decode() if lease else None
    fence, _, nonce = (token or "").partition(":")
    deliveries, started = (int(marks[0] or 0), marks[1]) if marks else (0, None)
    # The holder's heartbeat knows when the head started even when Redis does not (a task taken
    # ahead starts without telling it); Redis's mark is when the head was handed over.
    said = running.get((nonce.rpartition("/")[0], stream))
    if said is not None and first_inflight is not None and Entry.load(first_inflight).id == said[0]:
        started = said[1]
    head = _summary(first_inflight, backend, deliveries, started) or _summary(first_pending, backend)
    oldest = None if head is None or head.enqueued_ms == 0 else max(0.0, (now - head.enqueued_ms) / 1000)
    running_s = None
    if first_inflight is not None and token and head is not None and head.started_ms:
        running_s = max(0.0, (now - head.started_ms) / 1000)
    return StreamDetail(
        stream=stream,
        queue=queue_of(stream),
        pending=int(pending),
        inflight=int(inflight),
        dead=int(dead),
        paused=any(paused),
        holder=nonce.rpartition("/")[0] or None,
        fence=int(fence) if token else None,
        lease_ms=int(ttl) if token else None,
        head=head,
        oldest_age_s=oldest,
        running_s=running_s,
        blocked=blocked_after is not None and running_s is not None and running_s > blocked_after,
    )


def held_streams(replicas: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stream -> the live replica (as ``backend.replicas()`` lists it) holding it now."""
    return {str(stream): r for r in replicas for stream in r.get("held", [])}


def _scan_indexes(backend: RedisQueueBackend, budget: int) -> _Scan:
    """Queue names from the shards' queue indexes, dead-letter indexes (``SSCAN``, at most
    ``budget`` members in all) and pause sets."""
    found = _Scan()
    shards = range(backend.keys.shards)
    pipe = backend.client.pipeline(transaction=False)
    for shard in shards:
        pipe.zrange(backend.keys.queues(shard), 0, -1)
        pipe.sscan(backend.keys.paused(shard), 0, count=SCAN_COUNT)
    with backend.translated():
        replies = pipe.execute()
    for shard in shards:
        found.queues |= {_text(q) for q in replies[2 * shard]}
        found.paused |= {_text(m) for m in replies[2 * shard + 1][1]}
    for stream in _sscan_all(backend, [backend.keys.dlq_index(shard) for shard in shards], budget, found):
        found.dead_streams.setdefault(queue_of(stream), []).append(stream)
    found.queues |= set(found.dead_streams) | {queue_of(p) for p in found.paused}
    return found


def _sscan_all(backend: RedisQueueBackend, keys: Sequence[str], budget: int, found: _Scan) -> list[str]:
    """Members of the sets ``keys``, ``SSCAN`` step by step until ``budget`` members were seen;
    ``found.dead_complete`` turns false when it stopped early."""
    members: list[str] = []
    for key in keys:
        cursor = 0
        while True:
            if len(members) >= budget:
                found.dead_complete = False
                return sorted(set(members))
            with backend.translated():
                cursor, batch = backend.client.sscan(key, cursor, count=SCAN_COUNT)
            members += [_text(m) for m in batch]
            if int(cursor) == 0:
                break
    return sorted(set(members))


def rates(backend: RedisQueueBackend, queues: Sequence[str], now_ms: int) -> dict[str, Rate]:
    """Each queue's tasks per second over the last 60 s of Redis time, from the per-minute
    counts the scripts keep (this minute so far, and the part of the last one still in the
    window): one ``HMGET`` per queue and shard, in one round trip."""
    minute, into = divmod(now_ms, 60_000)
    slots = [(minute % COUNT_MINUTES, minute, 1.0), ((minute - 1) % COUNT_MINUTES, minute - 1, 1 - into / 60_000)]
    pipe = backend.client.pipeline(transaction=False)
    for queue in queues:
        for shard in range(backend.keys.shards):
            pipe.hmget(backend.keys.counts(shard, queue), [f"{kind}{slot}" for slot, _, _ in slots for kind in "msf"])
    with backend.translated():
        replies = iter(pipe.execute())
    out: dict[str, Rate] = {}
    for queue in queues:
        ok = failed = 0.0
        for _ in range(backend.keys.shards):
            values = next(replies)
            for i, (_, stamp, weight) in enumerate(slots):
                m, s, f = values[3 * i : 3 * i + 3]
                if m is not None and int(m) == stamp:
                    ok += int(s or 0) * weight
                    failed += int(f or 0) * weight
        out[queue] = Rate(ok / 60, failed / 60)
    return out


def _lowest(
    backend: RedisQueueBackend, queues: Sequence[str], per_queue: int
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Per queue: how many live streams it has, and those with the lowest claimable-at (the
    ones waiting longest), about ``per_queue`` of them spread over the shards."""
    per_shard = max(1, math.ceil(per_queue / backend.keys.shards))
    pipe = backend.client.pipeline(transaction=False)
    for queue in queues:
        for shard in range(backend.keys.shards):
            ready = backend.keys.ready(shard, queue)
            pipe.zcard(ready).zrange(ready, 0, per_shard - 1, withscores=True)
    with backend.translated():
        replies = iter(pipe.execute())
    counts: dict[str, int] = {}
    lowest: dict[str, list[str]] = {}
    for queue in queues:
        scored: list[tuple[float, str]] = []
        counts[queue] = 0
        for _ in range(backend.keys.shards):
            counts[queue] += int(next(replies))
            scored += [(score, _text(m)) for m, score in next(replies)]
        lowest[queue] = [m for _, m in sorted(scored)[:per_queue]]
    return counts, lowest


def overview(
    backend: RedisQueueBackend,
    *,
    queue: str | None = None,
    blocked_after: float | None = None,
    replicas: Sequence[dict[str, Any]] | None = None,
) -> list[QueueOverview]:
    """Every queue with a live stream, dead letters or a pause (or only ``queue``), trouble
    first. Bounded: per queue ``OVERVIEW_STREAMS`` streams and the held ones are read, the dead
    letters of at most ``SCAN_BUDGET`` streams are counted, whatever exists beyond."""
    found = _scan_indexes(backend, SCAN_BUDGET)
    names = sorted(found.queues if queue is None else {queue})
    fleet = backend.replicas() if replicas is None else replicas
    held = held_streams(fleet)
    counts, lowest = _lowest(backend, names, OVERVIEW_STREAMS)
    now = redis_now_ms(backend)
    rate_of = rates(backend, names, now)
    out = []
    for name in names:
        wanted = list(dict.fromkeys([*lowest[name], *(s for s in held if queue_of(s) == name)]))
        rows = read_streams(backend, wanted, blocked_after=blocked_after)
        out.append(_summarise(backend, name, rows, counts[name], found, rate_of[name]))
    return sorted(out, key=lambda q: (q.trouble, q.queue))


def _summarise(
    backend: RedisQueueBackend, name: str, rows: list[StreamDetail], live: int, found: _Scan, rate: Rate
) -> QueueOverview:
    read = {r.stream for r in rows}
    others = [s for s in found.dead_streams.get(name, []) if s not in read]
    pipe = backend.client.pipeline(transaction=False)
    for stream in others:
        pipe.zcard(backend.keys.stream(stream).dead)
    with backend.translated():
        dead_elsewhere = sum(int(n) for n in pipe.execute()) if others else 0
    ages = [r.oldest_age_s for r in rows if r.oldest_age_s is not None]
    return QueueOverview(
        queue=name,
        streams=live,
        read=len(rows),
        pending=sum(r.pending for r in rows),
        inflight=sum(r.inflight for r in rows),
        dead=sum(r.dead for r in rows) + dead_elsewhere,
        paused=name in found.paused,
        paused_streams=sum(1 for p in found.paused if p != name and queue_of(p) == name),
        blocked=sum(r.blocked for r in rows),
        held=sum(r.holder is not None for r in rows),
        oldest_age_s=max(ages, default=None),
        rate=rate,
        complete=live <= len(rows) and found.dead_complete,
    )


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@dataclass(frozen=True)
class StreamPage:
    """One page of a queue's live streams, and the cursor of the next (None: the last)."""

    rows: list[StreamDetail]
    next_cursor: str | None
    examined: int


def stream_page(
    backend: RedisQueueBackend,
    queue: str,
    *,
    cursor: str = "0:0",
    search: str = "",
    size: int = 50,
    blocked_after: float | None = None,
) -> StreamPage:
    """Live streams of ``queue`` whose name contains ``search``, about ``size`` at a time, by
    ``ZSCAN`` over the shards' ready sets (cursor ``"<shard>:<scan cursor>"``). A page examines
    at most ``SCAN_BUDGET`` members, so a search that matches few of 100,000 streams returns in
    bounded steps, each with the cursor to go on from."""
    shard, _, scan = cursor.partition(":")
    at, pos = int(shard), int(scan or 0)
    match = f"*{_glob_escape(search)}*" if search else None
    count = SCAN_COUNT if match else size
    found: list[str] = []
    examined = 0
    while at < backend.keys.shards and len(found) < size and examined < SCAN_BUDGET:
        with backend.translated():
            pos, members = backend.client.zscan(backend.keys.ready(at, queue), pos, match=match, count=count)
        examined += count
        found += [_text(m) for m, _ in members]
        if int(pos) == 0:
            at += 1
    exact = f"{queue}{STREAM_SEPARATOR}{search}"
    if search and cursor == "0:0":
        # The stream named exactly leads the first page, wherever the scan would meet it.
        if exact not in found:
            with backend.translated():
                if backend.client.zscore(backend.keys.stream(exact).ready, exact) is None:
                    exact = ""
        found = [exact, *(s for s in found if s != exact)] if exact else found
    rows = read_streams(backend, list(dict.fromkeys(found)), blocked_after=blocked_after)
    nxt = f"{at}:{pos}" if at < backend.keys.shards else None
    return StreamPage(rows, nxt, examined)


def waiting_longest(
    backend: RedisQueueBackend, queue: str, n: int = 10, *, blocked_after: float | None = None
) -> list[StreamDetail]:
    """The ``n`` streams of ``queue`` that have waited longest to be claimed (due, not held)."""
    _, lowest = _lowest(backend, [queue], n)
    rows = read_streams(backend, lowest[queue], blocked_after=blocked_after)
    return [r for r in rows if r.holder is None and (r.pending or r.inflight)]


@dataclass(frozen=True)
class DeadStreams:
    """Streams of a queue with dead letters, as far as a bounded scan got: ``shards_scanned`` of
    ``shards`` dead-letter indexes were read whole, and ``complete`` when that is all of them."""

    streams: list[str]
    shards_scanned: int
    shards: int

    @property
    def complete(self) -> bool:
        return self.shards_scanned == self.shards


def dead_streams_of(backend: RedisQueueBackend, queue: str, *, budget: int | None = None) -> DeadStreams:
    """Streams of ``queue`` with dead letters: ``SSCAN`` of the shards' dead-letter indexes, all
    shards a step at a time in one pipelined round trip, until about ``budget`` members
    (``SCAN_BUDGET`` by default) were examined.

    ``MATCH`` filters after Redis examined the members, so what a step costs is what it examined,
    known from the index's size: a small set (stored compactly) is read whole in one step whatever
    ``COUNT`` asks, a large one about ``COUNT`` members a step. Sharing the budget out by round keeps
    one crowded shard from hiding the streams of every shard after it."""
    budget = SCAN_BUDGET if budget is None else budget
    keys = [backend.keys.dlq_index(shard) for shard in range(backend.keys.shards)]
    pipe = backend.client.pipeline(transaction=False)
    for key in keys:
        pipe.scard(key)
    with backend.translated():
        left = [int(n) for n in pipe.execute()]
    cursors = {shard: 0 for shard, n in enumerate(left) if n}
    done = len(keys) - len(cursors)
    match = f"{_glob_escape(queue)}*"
    found: set[str] = set()
    spent = 0
    while cursors and spent < budget:
        count = max(1, min(SCAN_COUNT, (budget - spent) // len(cursors)))
        pipe = backend.client.pipeline(transaction=False)
        for shard, cursor in cursors.items():
            pipe.sscan(keys[shard], cursor, match=match, count=count)
        with backend.translated():
            replies = pipe.execute()
        for shard, (nxt, batch) in zip(list(cursors), replies, strict=True):
            found.update(s for s in map(_text, batch) if queue_of(s) == queue)
            examined = left[shard] if int(nxt) == 0 else max(1, min(count, left[shard]))
            spent += examined
            left[shard] = max(0, left[shard] - examined)
            if int(nxt) == 0:
                del cursors[shard]
                done += 1
            else:
                cursors[shard] = int(nxt)
    return DeadStreams(sorted(found), done, len(keys))


@dataclass(frozen=True)
class DeadPage:
    """Dead letters of one page, and the offset the next page starts from (None: the last)."""

    letters: list[DeadLetter]
    next_offset: int | None
    total: int


def dead_letter_page(
    backend: RedisQueueBackend,
    streams: Sequence[str],
    *,
    offset: int = 0,
    size: int = 50,
    reason: str | None = None,
) -> DeadPage:
    """Up to ``size`` dead letters of ``streams``, oldest first. One stream pages on by
    ``offset`` (a record's place in it); several show the oldest of each, merged by time. A
    ``reason`` filter reads a window of at most ``DEAD_WINDOW`` records per stream."""
    window = DEAD_WINDOW if reason else size
    pipe = backend.client.pipeline(transaction=False)
    for stream in streams:
        k = backend.keys.stream(stream)
        pipe.zcard(k.dead).zrange(k.dead, offset, offset + window - 1)
    with backend.translated():
        replies = pipe.execute()
    letters: list[tuple[int, DeadLetter]] = []
    for i, stream in enumerate(streams):
        parsed = (backend._parse_dead_letter(stream, raw) for raw in replies[2 * i + 1])
        letters += [(offset + n, d) for n, d in enumerate(parsed) if reason is None or d.reason == reason]
    letters.sort(key=lambda p: (p[1].header.get("at_ms", 0), p[1].header.get("seq", 0)))
    total = sum(int(replies[2 * i]) for i in range(len(streams)))
    shown = letters[:size]
    nxt = None
    if len(streams) == 1:
        # Go on after the last record shown, or past the window when nothing in it matched.
        after = shown[-1][0] + 1 if len(letters) > size else offset + window
        nxt = after if after < total else None
    return DeadPage([d for _, d in shown], nxt, total)
