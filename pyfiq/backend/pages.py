"""The operator's bounded views, which the dashboard refreshes: ``overview``, ``stream_page``,
``dead_letter_page`` and the fleet's rates, bounded whatever the number of streams. Each reads at
most ``OVERVIEW_STREAMS`` streams per queue (those waiting longest and those held now), pages
through the rest with ``ZSCAN``/``SSCAN`` cursors and ``COUNT``, and reads dead letters in
``ZRANGE`` windows; where a figure could not be read whole it says so (``complete``). Rates come
from the per-minute counts the scripts keep.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine.keys import COUNT_MINUTES, STREAM_SEPARATOR, queue_of
from ..task import DeadLetter
from .reads import Reads, as_text
from .views import (
    DeadPage,
    DeadStreams,
    QueueHistory,
    QueueOverview,
    Rate,
    StreamDetail,
    StreamPage,
    consumed_by,
    held_streams,
)

#: Streams of one queue an overview reads at most: those waiting longest (lowest claimable-at in
#: the ready sets) plus those held now (from the replica registry, bounded by the fleet's slots).
OVERVIEW_STREAMS = 200
#: Members a page examines at most in the shards' ready sets or dead-letter indexes (in
#: ``SCAN`` steps of ``SCAN_COUNT``); past it the page offers to go on from where it stopped.
SCAN_BUDGET = 5000
SCAN_COUNT = 500
#: Dead-letter records one page reads at most (a reason filter skips the others).
DEAD_WINDOW = 500


@dataclass
class _Scan:
    """What an overview found in the shards' indexes, before reading streams."""

    queues: set[str] = field(default_factory=set)
    dead_streams: dict[str, list[str]] = field(default_factory=dict)
    dead_complete: bool = True
    paused: set[str] = field(default_factory=set)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class Pages(Reads):
    """The bounded views of ``admin.Admin`` (see the module)."""

    def _scan_indexes(self, budget: int) -> _Scan:
        """Queue names from the shards' queue indexes, dead-letter indexes (``SSCAN``, at most
        ``budget`` members in all) and pause sets."""
        found = _Scan()
        shards = range(self.keys.shards)
        pipe = self.client.pipeline(transaction=False)
        for shard in shards:
            pipe.zrange(self.keys.queues(shard), 0, -1)
            pipe.sscan(self.keys.paused(shard), 0, count=SCAN_COUNT)
        with self.translated():
            replies = pipe.execute()
        for shard in shards:
            found.queues |= {as_text(q) for q in replies[2 * shard]}
            found.paused |= {as_text(m) for m in replies[2 * shard + 1][1]}
        for stream in self._sscan_all([self.keys.dlq_index(shard) for shard in shards], budget, found):
            found.dead_streams.setdefault(queue_of(stream), []).append(stream)
        found.queues |= set(found.dead_streams) | {queue_of(p) for p in found.paused}
        return found

    def _sscan_all(self, keys: Sequence[str], budget: int, found: _Scan) -> list[str]:
        """Members of the sets ``keys``, ``SSCAN`` step by step until ``budget`` members were seen;
        ``found.dead_complete`` turns false when it stopped early."""
        members: list[str] = []
        for key in keys:
            cursor = 0
            while True:
                if len(members) >= budget:
                    found.dead_complete = False
                    return sorted(set(members))
                with self.translated():
                    cursor, batch = self.client.sscan(key, cursor, count=SCAN_COUNT)
                members += [as_text(m) for m in batch]
                if int(cursor) == 0:
                    break
        return sorted(set(members))

    def rates(self, queues: Sequence[str], now_ms: int) -> dict[str, Rate]:
        """Each queue's tasks per second over the last 60 s of Redis time, from the per-minute
        counts the scripts keep (this minute so far, and the part of the last one still in the
        window): one ``HMGET`` per queue and shard, in one round trip."""
        minute, into = divmod(now_ms, 60_000)
        slots = [(minute % COUNT_MINUTES, minute, 1.0), ((minute - 1) % COUNT_MINUTES, minute - 1, 1 - into / 60_000)]
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            for shard in range(self.keys.shards):
                pipe.hmget(self.keys.counts(shard, queue), [f"{kind}{slot}" for slot, _, _ in slots for kind in "msf"])
        with self.translated():
            replies = iter(pipe.execute())
        out: dict[str, Rate] = {}
        for queue in queues:
            ok = failed = 0.0
            for _ in range(self.keys.shards):
                values = next(replies)
                for i, (_, stamp, weight) in enumerate(slots):
                    m, s, f = values[3 * i : 3 * i + 3]
                    if m is not None and int(m) == stamp:
                        ok += int(s or 0) * weight
                        failed += int(f or 0) * weight
            out[queue] = Rate(ok / 60, failed / 60)
        return out

    def history(self, queue: str, now_ms: int | None = None) -> QueueHistory:
        """What ``queue`` did in each of the last ``COUNT_MINUTES`` minutes of Redis time (see
        ``QueueHistory``), from the per-minute counts the scripts keep: every shard's ring of
        minutes read whole by one ``HMGET`` of its fields, all in one round trip."""
        now_ms = self.redis_now_ms() if now_ms is None else now_ms
        first = now_ms // 60_000 - COUNT_MINUTES + 1
        fields = [f"{kind}{slot}" for kind in "msf" for slot in range(COUNT_MINUTES)]
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.hmget(self.keys.counts(shard, queue), fields)
        with self.translated():
            rings = pipe.execute()
        ok, failed = [0] * COUNT_MINUTES, [0] * COUNT_MINUTES
        for values in rings:
            for slot in range(COUNT_MINUTES):
                # A slot holds the minute it names, or one an hour older, not yet overwritten.
                at = -1 if values[slot] is None else int(values[slot]) - first
                if 0 <= at < COUNT_MINUTES:
                    ok[at] += int(values[COUNT_MINUTES + slot] or 0)
                    failed[at] += int(values[2 * COUNT_MINUTES + slot] or 0)
        return QueueHistory(queue, first * 60_000, ok, failed)

    def _lowest(self, queues: Sequence[str], per_queue: int) -> tuple[dict[str, int], dict[str, list[str]]]:
        """Per queue: how many live streams it has, and those with the lowest claimable-at (the
        ones waiting longest), about ``per_queue`` of them spread over the shards."""
        per_shard = max(1, math.ceil(per_queue / self.keys.shards))
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            for shard in range(self.keys.shards):
                ready = self.keys.ready(shard, queue)
                pipe.zcard(ready).zrange(ready, 0, per_shard - 1, withscores=True)
        with self.translated():
            replies = iter(pipe.execute())
        counts: dict[str, int] = {}
        lowest: dict[str, list[str]] = {}
        for queue in queues:
            scored: list[tuple[float, str]] = []
            counts[queue] = 0
            for _ in range(self.keys.shards):
                counts[queue] += int(next(replies))
                scored += [(score, as_text(m)) for m, score in next(replies)]
            lowest[queue] = [m for _, m in sorted(scored)[:per_queue]]
        return counts, lowest

    def overview(
        self,
        *,
        queue: str | None = None,
        blocked_after: float | None = None,
        replicas: Sequence[dict[str, Any]] | None = None,
    ) -> list[QueueOverview]:
        """Every queue with a live stream, dead letters or a pause (or only ``queue``), trouble
        first. Bounded: per queue ``OVERVIEW_STREAMS`` streams and the held ones are read, the dead
        letters of at most ``SCAN_BUDGET`` streams are counted, whatever exists beyond."""
        found = self._scan_indexes(SCAN_BUDGET)
        names = sorted(found.queues if queue is None else {queue})
        fleet = self.replicas() if replicas is None else replicas
        held = held_streams(fleet)
        counts, lowest = self._lowest(names, OVERVIEW_STREAMS)
        now = self.redis_now_ms()
        rate_of = self.rates(names, now)
        out = []
        for name in names:
            wanted = list(dict.fromkeys([*lowest[name], *(s for s in held if queue_of(s) == name)]))
            rows = self.read_streams(wanted, blocked_after=blocked_after)
            summary = self._summarise(name, rows, counts[name], found, rate_of[name])
            out.append(replace(summary, consumed=consumed_by(fleet, name)))
        return sorted(out, key=lambda q: (q.trouble, q.queue))

    def _summarise(self, name: str, rows: list[StreamDetail], live: int, found: _Scan, rate: Rate) -> QueueOverview:
        read = {r.stream for r in rows}
        others = [s for s in found.dead_streams.get(name, []) if s not in read]
        pipe = self.client.pipeline(transaction=False)
        for stream in others:
            pipe.zcard(self.keys.stream(stream).dead)
        with self.translated():
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

    def stream_page(
        self,
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
        while at < self.keys.shards and len(found) < size and examined < SCAN_BUDGET:
            with self.translated():
                pos, members = self.client.zscan(self.keys.ready(at, queue), pos, match=match, count=count)
            examined += count
            found += [as_text(m) for m, _ in members]
            if int(pos) == 0:
                at += 1
        exact = f"{queue}{STREAM_SEPARATOR}{search}"
        if search and cursor == "0:0":
            # The stream named exactly leads the first page, wherever the scan would meet it.
            if exact not in found:
                with self.translated():
                    if self.client.zscore(self.keys.stream(exact).ready, exact) is None:
                        exact = ""
            found = [exact, *(s for s in found if s != exact)] if exact else found
        rows = self.read_streams(list(dict.fromkeys(found)), blocked_after=blocked_after)
        nxt = f"{at}:{pos}" if at < self.keys.shards else None
        return StreamPage(rows, nxt, examined)

    def waiting_longest(self, queue: str, n: int = 10, *, blocked_after: float | None = None) -> list[StreamDetail]:
        """The ``n`` streams of ``queue`` that have waited longest to be claimed (due, not held)."""
        _, lowest = self._lowest([queue], n)
        rows = self.read_streams(lowest[queue], blocked_after=blocked_after)
        return [r for r in rows if r.holder is None and (r.pending or r.inflight)]

    def dead_streams_of(self, queue: str, *, budget: int | None = None) -> DeadStreams:
        """Streams of ``queue`` with dead letters: ``SSCAN`` of the shards' dead-letter indexes, all
        shards a step at a time in one pipelined round trip, until about ``budget`` members
        (``SCAN_BUDGET`` by default) were examined.

        ``MATCH`` filters after Redis examined the members, so what a step costs is what it examined,
        known from the index's size: a small set (stored compactly) is read whole in one step whatever
        ``COUNT`` asks, a large one about ``COUNT`` members a step. Sharing the budget out by round keeps
        one crowded shard from hiding the streams of every shard after it."""
        budget = SCAN_BUDGET if budget is None else budget
        keys = [self.keys.dlq_index(shard) for shard in range(self.keys.shards)]
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.scard(key)
        with self.translated():
            left = [int(n) for n in pipe.execute()]
        cursors = {shard: 0 for shard, n in enumerate(left) if n}
        done = len(keys) - len(cursors)
        match = f"{_glob_escape(queue)}*"
        found: set[str] = set()
        spent = 0
        while cursors and spent < budget:
            count = max(1, min(SCAN_COUNT, (budget - spent) // len(cursors)))
            pipe = self.client.pipeline(transaction=False)
            for shard, cursor in cursors.items():
                pipe.sscan(keys[shard], cursor, match=match, count=count)
            with self.translated():
                replies = pipe.execute()
            for shard, (nxt, batch) in zip(list(cursors), replies, strict=True):
                found.update(s for s in map(as_text, batch) if queue_of(s) == queue)
                examined = left[shard] if int(nxt) == 0 else max(1, min(count, left[shard]))
                spent += examined
                left[shard] = max(0, left[shard] - examined)
                if int(nxt) == 0:
                    del cursors[shard]
                    done += 1
                else:
                    cursors[shard] = int(nxt)
        return DeadStreams(sorted(found), done, len(keys))

    def dead_letter_page(
        self,
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
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            k = self.keys.stream(stream)
            pipe.zcard(k.dead).zrange(k.dead, offset, offset + window - 1)
        with self.translated():
            replies = pipe.execute()
        letters: list[tuple[int, DeadLetter]] = []
        for i, stream in enumerate(streams):
            parsed = (self.parse_dead_letter(stream, raw) for raw in replies[2 * i + 1])
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
