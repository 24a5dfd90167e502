"""Read-only views of a deployment for operators (the CLI, and tools of your own): per stream
and per queue status, and dead letters across every stream of a keyed queue. Typed results,
bounded reads (the shards' ready sets and dead-letter indexes, never a scan of all keys).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..engine.keys import queue_of
from ..redis.backend import DeadLetter, RedisQueueBackend
from ..task import Entry


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
    info = backend.queue_info(stream)
    head = backend.client.lindex(backend.keys.stream(stream).pending, 0)
    age = None
    if head is not None:
        entry = Entry.load(head)
        if not entry.malformed:
            seconds, micros = backend.client.time()
            age = max(0.0, (seconds * 1000 + micros / 1000 - entry.enqueued_ms) / 1000)
    return StreamStatus(
        stream=stream,
        queue=queue_of(stream),
        pending=info["pending"],
        inflight=info["inflight"],
        dead=info["dead"],
        paused=info["paused"],
        holder=info["holder"],
        fence=info["fence"],
        lease_ms=info["lease_ttl_ms"],
        oldest_age_s=age,
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


_FRAME = re.compile(r'^  File "([^"]+)", line \d+, in .*\n(?:    .*\n)?', re.M)


def task_traceback(text: str) -> str:
    """A task's traceback without the frames of pyfiq and tenacity around the task's own."""

    def keep(m: re.Match[str]) -> str:
        path = m.group(1).replace("\\", "/")
        return "" if "/pyfiq/" in path or "/tenacity/" in path else m.group(0)

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
