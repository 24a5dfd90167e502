"""The operator's reads: per stream and per queue status, dead letters across every stream of a
keyed queue, and the state of chosen streams (``read_streams``). Typed results (``views``),
read from the shards' ready sets and dead-letter indexes, never from a scan of all keys.

These read every stream they are asked about; the CLI's whole-deployment listings use them.
The dashboard's views, bounded whatever the number of streams, are ``pages``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, Protocol

from ..config import Settings
from ..engine.keys import KeySchema, queue_of
from ..engine.protocol import Call, ScriptCalls
from ..errors import DecodeError
from ..task import DeadLetter, Entry, TaskRecord
from .views import (
    QueueStatus,
    ScheduleView,
    StreamDetail,
    StreamStatus,
    TaskSummary,
)


class Operated(Protocol):
    """What the operator's room needs of the backend it serves."""

    @property
    def keys(self) -> KeySchema: ...

    @property
    def ops(self) -> ScriptCalls: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def client(self) -> Any: ...

    def translated(self) -> contextlib.AbstractContextManager[None]: ...

    def operator_call(self, call: Call) -> Any: ...

    def call_many(self, calls: Sequence[Call]) -> list[Any]: ...


# -- bounded views (the dashboard) ------------------------------------------------------------

#: Streams read per pipelined round trip (bounds each reply).
BATCH = 500


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _running(registry: dict[bytes, bytes]) -> dict[tuple[str, str], tuple[str, int]]:
    """(replica, stream) -> (task id, started ms) as each worker's last heartbeat says."""
    out: dict[tuple[str, str], tuple[str, int]] = {}
    for replica, body in registry.items():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            for stream, (task_id, started) in json.loads(body).get("running", {}).items():
                out[(as_text(replica), str(stream))] = (str(task_id), int(started))
    return out


class Reads:
    """The reads of ``admin.Admin``, over the backend it serves (see the module)."""

    def __init__(self, host: Operated) -> None:
        self._host = host
        self.keys = host.keys
        self.settings = host.settings

    @property
    def client(self) -> Any:
        return self._host.client

    def translated(self) -> contextlib.AbstractContextManager[None]:
        return self._host.translated()

    # -- per stream, and the indexes of streams --------------------------------------------

    def queue_info(self, stream: str) -> dict[str, Any]:
        """Counts and lease of one stream: ``pending`` (delayed tasks already due included: they
        have joined the stream, moved into its list or not), ``inflight``, ``dead``,
        ``scheduled`` (delayed tasks not due yet), ``lease`` (the token), ``holder`` (the replica
        id in it), ``fence``, ``lease_ttl_ms``, ``paused``."""
        k = self.keys.stream(stream)
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(k.pending).llen(k.inflight).zcard(k.dead).get(k.lease).pttl(k.lease)
        pipe.smismember(k.paused, [stream, queue_of(stream)]).zcard(k.later)
        pending, inflight, dead, lease, ttl, paused, scheduled = pipe.execute()
        if scheduled:
            due = int(self.client.zcount(k.later, "-inf", self.redis_now_ms()))
            pending, scheduled = pending + due, scheduled - due
        token = lease.decode() if lease else None
        fence, _, nonce = (token or "").partition(":")
        return {
            "stream": stream,
            "pending": pending,
            "inflight": inflight,
            "dead": dead,
            "scheduled": scheduled,
            "lease": token,
            "holder": nonce.rpartition("/")[0] or None,
            "fence": int(fence) if token else None,
            "lease_ttl_ms": ttl if lease else None,
            "paused": any(paused),
        }

    def replicas(self, include_silent: bool = False) -> list[dict[str, Any]]:
        """Workers of this prefix as their heartbeats describe them (id, host, pid, driver,
        concurrency, held streams), with ``silent_s``: seconds since the last heartbeat. Only
        live ones (heard within three heartbeats) unless ``include_silent``."""
        with self.translated():
            raw = self.client.hgetall(self.keys.replicas)
            seconds, micros = self.client.time()
        now_ms = seconds * 1000 + micros // 1000
        out = []
        for replica, body in raw.items():
            # A record is anyone's write to one hash field: one that is not what a heartbeat
            # writes is left out, never the failure of every page that lists replicas.
            try:
                info: Any = json.loads(body)
                if not isinstance(info, dict):
                    continue
                seen_ms, beat_ms = int(info.get("seen_ms", 0)), int(info.get("heartbeat_ms", 2000))
                if isinstance(info.get("held", []), list):
                    info["held"] = [str(s) for s in info.get("held", [])]
            except (ValueError, TypeError, RecursionError):
                continue
            silent = max(0.0, (now_ms - seen_ms) / 1000)
            if include_silent or silent * 1000 <= 3 * beat_ms:
                out.append({"replica": replica.decode(errors="replace"), **info, "silent_s": round(silent, 3)})
        return sorted(out, key=lambda r: str(r["replica"]))

    def paused(self) -> list[str]:
        """Paused queues and streams."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.smembers(self.keys.paused(shard))
        with self.translated():
            return sorted({m.decode() for members in pipe.execute() for m in members})

    def active_streams(self) -> list[str]:
        """Streams with work or a lease (the ready sets); idle streams are not tracked."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.zrange(self.keys.queues(shard), 0, -1)
        queues = [(shard, q.decode()) for shard, members in enumerate(pipe.execute()) for q in members]
        pipe = self.client.pipeline(transaction=False)
        for shard, queue in queues:
            pipe.zrange(self.keys.ready(shard, queue), 0, -1)
        return sorted(m.decode() for members in pipe.execute() for m in members)

    def dead_letter_streams(self) -> list[str]:
        """Streams holding dead letters (the shards' dead-letter indexes)."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.smembers(self.keys.dlq_index(shard))
        return sorted(m.decode() for members in pipe.execute() for m in members)

    def dead_letters(self, stream: str, limit: int = 100, offset: int = 0) -> list[DeadLetter]:
        """Dead letters of a stream, oldest first, one bounded page at a time."""
        raw_items = self.client.zrange(self.keys.stream(stream).dead, offset, offset + limit - 1)
        return [self.parse_dead_letter(stream, raw) for raw in raw_items]

    def dead_letter(self, stream: str, task_id: str) -> DeadLetter | None:
        """The dead letter of ``task_id`` in ``stream``, found through the id index."""
        k = self.keys.stream(stream)
        seq = self.client.hget(k.dead_ids, task_id)
        rows = self.client.zrangebyscore(k.dead, seq, seq) if seq is not None else []
        return self.parse_dead_letter(stream, rows[0]) if rows else None

    def parse_dead_letter(self, stream: str, raw: bytes) -> DeadLetter:
        """A stored dead-letter record, read as far as it can be (``DeadLetter.load``)."""
        return DeadLetter.load(stream, raw, self.settings.serializer)

    def known_streams(self) -> list[str]:
        """Streams with work, a lease or dead letters."""
        return sorted(set(self.active_streams()) | set(self.dead_letter_streams()))

    def streams_of(self, queue: str, key: str | None = None) -> list[str]:
        """The known streams of ``queue`` (only ``queue#key`` with a key)."""
        if key is not None:
            wanted = f"{queue}#{key}"
            return [s for s in self.known_streams() if s == wanted]
        return [s for s in self.known_streams() if queue_of(s) == queue]

    def stream_status(self, stream: str) -> StreamStatus:
        d = self.read_streams([stream])[0]
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
            scheduled=d.scheduled,
        )

    def queue_statuses(self, queue: str | None = None) -> list[QueueStatus]:
        """Every known queue (or one), trouble first: the oldest waiting task leads."""
        by_queue: dict[str, list[StreamStatus]] = {}
        for stream in self.known_streams():
            if queue is None or queue_of(stream) == queue:
                by_queue.setdefault(queue_of(stream), []).append(self.stream_status(stream))
        paused = set(self.paused())
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
                scheduled=sum(r.scheduled for r in rows),
            )
            for q, rows in by_queue.items()
        ]
        return sorted(out, key=lambda s: (-(s.oldest_age_s or 0.0), -s.dead, s.queue))

    def dead_letters_of(self, queue: str, key: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters of every stream of ``queue`` (or of ``queue#key``), oldest first."""
        found: list[DeadLetter] = []
        for stream in self.streams_of(queue, key):
            found += self.dead_letters(stream, limit)
        found.sort(key=lambda d: (d.header.get("at_ms", 0), d.header.get("seq", 0)))
        return found[:limit]

    def find_dead_letter(self, queue: str, task_id: str) -> DeadLetter | None:
        """The dead letter of ``task_id`` in any stream of ``queue`` (found by its id index)."""
        for stream in self.streams_of(queue):
            found = self.dead_letter(stream, task_id)
            if found is not None:
                return found
        return None

    def schedules(self) -> list[ScheduleView]:
        """Every periodic schedule of this prefix (the shards' indexes), by name."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.smembers(self.keys.schedules(shard))
        with self.translated():
            found = sorted((as_text(n), shard) for shard, names in enumerate(pipe.execute()) for n in names)
            pipe = self.client.pipeline(transaction=False)
            for name, shard in found:
                pipe.hgetall(self.keys.schedule_record(shard, name))
                pipe.smembers(self.keys.paused(shard))
            replies = pipe.execute()
            now = self.redis_now_ms()  # not pipelined: a cluster's pipeline refuses TIME
        out = []
        for i, (name, _) in enumerate(found):
            record = {as_text(k): as_text(v) for k, v in replies[2 * i].items()}
            if record:
                out.append(_schedule_view(name, record, {as_text(m) for m in replies[1 + 2 * i]}, now))
        return out

    def redis_now_ms(self) -> int:
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def _summary(self, raw: bytes | None, deliveries: int = 0, started: Any = None) -> TaskSummary | None:
        if raw is None:
            return None
        entry = Entry.load(raw)
        name = None
        if not entry.malformed:
            with contextlib.suppress(DecodeError):
                name = TaskRecord.decode(entry.payload, self.settings.serializer).name
        return TaskSummary(entry.id, name, entry.enqueued_ms, deliveries, int(started) if started else None)

    def read_streams(self, streams: Sequence[str], *, blocked_after: float | None = None) -> list[StreamDetail]:
        """The state of ``streams``, in that order: two pipelined round trips per ``BATCH`` streams
        (counts, lease, pause and list heads; then the head task's delivery and start marks)."""
        out: list[StreamDetail] = []
        for start in range(0, len(streams), BATCH):
            out += self._read_batch(streams[start : start + BATCH], blocked_after)
        return out

    def _read_batch(self, streams: Sequence[str], blocked_after: float | None) -> list[StreamDetail]:
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(self.keys.replicas)
        for stream in streams:
            k = self.keys.stream(stream)
            pipe.llen(k.pending).llen(k.inflight).zcard(k.dead).get(k.lease).pttl(k.lease)
            pipe.smismember(k.paused, [stream, queue_of(stream)]).lindex(k.inflight, 0).lindex(k.pending, 0)
            pipe.zcard(k.later)
        with self.translated():
            replies = pipe.execute()
        seconds, micros = replies[0]
        now = int(seconds) * 1000 + int(micros) // 1000
        heartbeats = _running(replies[1])
        rows = [replies[2 + 9 * i : 11 + 9 * i] for i in range(len(streams))]
        marks: list[Any] = []
        running = [(i, Entry.load(row[6])) for i, row in enumerate(rows) if row[6] is not None]
        # Delayed tasks already due have joined their stream (whether or not anything has moved
        # them into its list yet): they count as pending.
        delayed = [i for i, row in enumerate(rows) if row[8]]
        if running or delayed:
            pipe = self.client.pipeline(transaction=False)
            for i, entry in running:
                pipe.hmget(self.keys.stream(streams[i]).meta, [f"d:{entry.id}", f"s:{entry.id}"])
            for i in delayed:
                pipe.zcount(self.keys.stream(streams[i]).later, "-inf", now)
            with self.translated():
                marks = pipe.execute()
            for i, due in zip(delayed, marks[len(running) :], strict=True):
                rows[i] = [int(rows[i][0]) + int(due), *rows[i][1:8], int(rows[i][8]) - int(due)]
        mark_of = {i: m for (i, _), m in zip(running, marks, strict=False)}
        return [
            self._detail(stream, row, mark_of.get(i), now, blocked_after, heartbeats)
            for i, (stream, row) in enumerate(zip(streams, rows, strict=True))
        ]

    def _detail(
        self,
        stream: str,
        row: list[Any],
        marks: Any,
        now: int,
        blocked_after: float | None,
        running: dict[tuple[str, str], tuple[str, int]],
    ) -> StreamDetail:
        pending, inflight, dead, lease, ttl, paused, first_inflight, first_pending, scheduled = row
        token = lease.decode() if lease else None
        fence, _, nonce = (token or "").partition(":")
        deliveries, started = (int(marks[0] or 0), marks[1]) if marks else (0, None)
        # The holder's heartbeat knows when the head started even when Redis does not (a task taken
        # ahead starts without telling it); Redis's mark is when the head was handed over.
        said = running.get((nonce.rpartition("/")[0], stream))
        if said is not None and first_inflight is not None and Entry.load(first_inflight).id == said[0]:
            started = said[1]
        head = self._summary(first_inflight, deliveries, started) or self._summary(first_pending)
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
            scheduled=int(scheduled),
        )


def _schedule_view(name: str, record: dict[str, str], paused: set[str], now: int) -> ScheduleView:
    def number(field: str) -> int:
        value = record.get(field, "")
        return int(value) if value.isdigit() else 0

    def when(field: str) -> dt.datetime | None:
        ms = number(field)
        return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc) if ms else None

    stream = record.get("stream", "")
    return ScheduleView(
        name=name,
        stream=stream,
        queue=queue_of(stream),
        rule=record.get("rule", ""),
        version=number("version"),
        last_tick=when("last"),
        next_tick=when("next"),
        task_id=record.get("task"),
        fired_at=when("at"),
        fired_by=record.get("by"),
        fired=number("fired"),
        skipped=number("skipped"),
        paused=stream in paused or queue_of(stream) in paused,
        stale=0 < number("next") < now - STALE_AFTER_MS,
    )


#: A schedule whose next tick is this far past without being fired has no replica running it.
STALE_AFTER_MS = 60_000
