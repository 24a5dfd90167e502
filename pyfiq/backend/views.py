"""The operator's views as typed values: what ``admin.Admin`` reads from Redis for the CLI, the
dashboard and tools of your own (stream and queue status, overviews, pages)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..engine.keys import STREAM_SEPARATOR, queue_of
from ..task import DeadLetter


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
    #: Delayed tasks that have not joined the stream yet.
    scheduled: int = 0

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
    scheduled: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    scheduled: int = 0

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
    #: Whether a live replica consumes the queue (``consumed_by``): None when that is unknown.
    consumed: bool | None = None

    @property
    def trouble(self) -> tuple[int, int, float, int]:
        """Sorts trouble first: blocked streams, dead letters growing, the oldest task, dead letters."""
        return (-self.blocked, -(self.rate.failed > 0), -(self.oldest_age_s or 0.0), -self.dead)


@dataclass(frozen=True)
class QueueHistory:
    """Tasks of a queue that succeeded and failed in each minute of Redis time over the last
    hour, oldest first: the minute ``i`` starts at ``start_ms + i * 60_000``, and the last one
    is the current minute so far."""

    queue: str
    start_ms: int
    succeeded: list[int]
    failed: list[int]

    def minutes(self) -> list[tuple[int, int, int]]:
        """(start ms, succeeded, failed) of each minute, oldest first."""
        starts = (self.start_ms + i * 60_000 for i in range(len(self.succeeded)))
        return list(zip(starts, self.succeeded, self.failed, strict=True))


@dataclass(frozen=True)
class StreamPage:
    """One page of a queue's live streams, and the cursor of the next (None: the last)."""

    rows: list[StreamDetail]
    next_cursor: str | None
    examined: int


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


@dataclass(frozen=True)
class DeadPage:
    """Dead letters of one page, and the offset the next page starts from (None: the last)."""

    letters: list[DeadLetter]
    next_offset: int | None
    total: int


@dataclass(frozen=True)
class ScheduleView:
    """A periodic schedule as Redis keeps it (``tick.lua``): its rule and version as the last
    replica to write them ran them, its last tick and the next, the task its last tick
    enqueued, and counts of ticks fired and skipped (while paused). Times are Redis's clock.
    ``stale``: its next tick is more than a minute past and nobody fired it (no replica runs
    it: its function was removed or renamed, or every worker is down)."""

    name: str
    stream: str
    queue: str
    rule: str
    version: int
    last_tick: dt.datetime | None
    next_tick: dt.datetime | None
    task_id: str | None
    fired_at: dt.datetime | None
    fired_by: str | None
    fired: int
    skipped: int
    paused: bool
    stale: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_streams(replicas: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stream -> the live replica (as ``backend.replicas()`` lists it) holding it now."""
    return {str(stream): r for r in replicas for stream in r.get("held", [])}


def consumed_by(replicas: Iterable[dict[str, Any]], queue: str) -> bool | None:
    """Whether a live replica (as ``backend.replicas()`` lists them) consumes ``queue``: True when
    one lists it among the queues it consumes or holds a stream of it; False when every one
    lists its queues whole and none names it (no replica at all: nobody consumes it); None,
    unknown, when one does not say: a replica older than that field (a rolling upgrade mixes
    versions) or one whose list was cut at the heartbeat's bound. Unknown is never "none"."""
    unknown = False
    for r in replicas:
        held, listed = r.get("held"), r.get("queues")
        if isinstance(held, list) and any(queue_of(str(s)) == queue for s in held):
            return True
        if isinstance(listed, list) and queue in listed:
            return True
        unknown = unknown or not isinstance(listed, list) or bool(r.get("queues_cut"))
    return None if unknown else False
