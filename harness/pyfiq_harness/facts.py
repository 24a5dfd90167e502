"""What a run left behind, read once: acceptances, executions, overlaps, faults and the
verdict types the checkers fill.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from pyfiq.ops.scenario_tasks import (
    Report,
    check,
    read_journal,
)

from .journal import ACCEPTED_GLOB, EXECUTIONS, FAULTS, TICKS, Event, read_lines
from .profiles import EVERYSEC_WINDOW, EXPLAINING_FAULTS, INJECTOR, PAUSE_FAULTS, REDIS_FAULTS, TAKEOVER_SLACK


@dataclass
class Verdict:
    """The outcome of a check: ``ok`` if no breach, the report lines, and the figures (``stats``)."""

    ok: bool
    breaches: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        head = "verdict: PASS" if self.ok else "verdict: FAIL"
        return "\n".join([*self.lines, *(f"BREACH: {b}" for b in self.breaches), head])


def read_accepted(run_dir: Path) -> list[Event]:
    lines: list[Event] = []
    for path in sorted(run_dir.glob(ACCEPTED_GLOB)):
        lines += read_lines(path)
    return lines


def _fault_window(f: Event, ttl: float, poll: float) -> tuple[float, float]:
    """When a fault could have made a replica lose a lease or an acknowledgement."""
    start = float(f["t"])
    end = float(f["t_end"]) if "t_end" in f else start
    return start, end + ttl + poll + TAKEOVER_SLACK


@dataclass(frozen=True)
class RedisClock:
    """Redis's wall clock over a run: each Redis process in turn reads this machine's clock
    shifted by a fixed offset (the ``clock`` fault's shim, ``clock_shift.c``), which only a
    restart changes. It puts a Redis time (a due time, a tick, an enqueue's stamp) on this
    machine's clock, the one replicas journal their starts by, to the microsecond.

    A process's span is counted from when the one before it was certainly down (``t_down``). It
    came up a little later; the earlier bound only makes a due time that a new process's clock
    was already past when it came up count as reached while no Redis was up at all, when
    nothing can be handed out, so no check built on it is wrong, only that much more lenient."""

    #: (machine time from which, shift in ms) per Redis process, in order; the first from -inf.
    spans: tuple[tuple[float, int], ...] = ((-math.inf, 0),)

    @classmethod
    def of(cls, faults: Sequence[Event]) -> RedisClock:
        restarts = sorted(
            (f for f in faults if f["kind"] in REDIS_FAULTS and "t_down" in f), key=lambda f: float(f["t_down"])
        )
        first = int(restarts[0].get("previous_shift_ms", 0)) if restarts else 0
        later = tuple((float(f["t_down"]), int(f.get("shift_ms", 0))) for f in restarts)
        return cls(((-math.inf, first), *later))

    def span_at(self, t: float) -> int:
        """The index of the span (Redis process) under way at machine time ``t``."""
        return max(i for i, (since, _) in enumerate(self.spans) if since <= t)

    def shift_at(self, t: float) -> int:
        return self.spans[self.span_at(t)][1]

    def reached(self, redis_ms: int, after: float = -math.inf) -> tuple[int, int]:
        """When Redis's clock first read ``redis_ms`` or later, from the span under way at
        machine time ``after`` on (a delayed task's enqueue: a clock that read its due time
        before the task existed is no matter), as (machine time in µs, span).

        Redis calls a time due once its clock, in whole ms, reads it: from ``redis_ms`` * 1000
        µs on its own clock, so from that minus its shift on this machine's."""
        first = self.span_at(after)
        for i, (since, shift) in enumerate(self.spans):
            if i < first:
                continue
            at = (redis_ms - shift) * 1000
            if i > 0:
                at = max(at, math.ceil(since * 1e6))
            if i + 1 == len(self.spans) or at < self.spans[i + 1][0] * 1e6:
                return at, i
        raise AssertionError("the last span never ends")

    def latest_tick(self, t: float, every_ms: int) -> int:
        """The last tick of an ``every_ms`` schedule at or before machine time ``t`` by Redis's
        clock then (ticks are aligned to Redis's clock)."""
        now = math.floor(t * 1000) + self.shift_at(t)
        return now - now % every_ms


@dataclass
class Acceptances:
    """What Redis accepted, per queue in the order tasks joined it (exact across producers)."""

    #: Acceptances whose place is known, per queue, in the order they joined it.
    exact: dict[str, list[Event]]
    #: The same, as sequence numbers.
    seqs: dict[str, list[int]]
    #: Accepted on a retry (``duplicate``), or delayed around a Redis clock set back (see
    #: ``_set_back_ambiguous``): the task is in, its place is unknown.
    unsure: list[Event]
    #: Enqueues the producers gave up on.
    failed: int
    #: Producer switches in the acceptance order, all queues together.
    interleavings: int
    #: (queue, seq) -> when the producer had the acceptance back.
    at: dict[tuple[str, int], float]
    producers: set[str]
    #: (queue, seq) -> from when a worker could take the task (machine time): its acceptance,
    #: or for a delayed task the later of that and when Redis's clock reached its due time.
    available: dict[tuple[str, int], float] = field(default_factory=dict)
    #: Every delayed acceptance (``delay_ms``), exact or not, in the producers' order.
    delayed: list[Event] = field(default_factory=list)

    @classmethod
    def of(cls, lines: list[Event], clock: RedisClock | None = None, journal: Sequence[Event] = ()) -> Acceptances:
        """``lines``: the acceptance journals (their Redis times on this machine's clock, see
        ``_unshift_redis_clock``); ``journal``: the execution journal, whose enqueue stamps
        place each task that ran to the ms (see ``_join_key``)."""
        clock = clock or RedisClock()
        enqueued: dict[str, int] = {}
        first_start: dict[str, float] = {}
        for e in sorted(journal, key=lambda e: e["t"]):
            if "enqueued_ms" in e:
                enqueued.setdefault(e["task_id"], int(e["enqueued_ms"]))
            if e["event"] == "start":
                first_start.setdefault(e["task_id"], e["t"])
        exact: dict[str, list[Event]] = defaultdict(list)
        unsure: list[Event] = []
        failed = 0
        for line in lines:
            if line["status"] == "accepted" and not ("delay_ms" in line and line.get("due") is None):
                exact[line["queue"]].append(line)
            elif line["status"] in ("accepted", "duplicate"):
                unsure.append(line)
            else:
                failed += 1
        for q, q_lines in exact.items():
            joins = [(line, *_join_key(line, clock, enqueued)) for line in q_lines]
            ambiguous = _set_back_ambiguous(joins, clock, first_start)
            unsure += [line for line in q_lines if id(line) in ambiguous]
            joins.sort(key=lambda j: j[1])
            exact[q] = [line for line, *_ in joins if id(line) not in ambiguous]
        available = {(e["queue"], e["seq"]): e["t"] for e in lines if "t" in e}
        for e in lines:
            if e.get("due") is not None and "t" in e:
                available[(e["queue"], e["seq"])] = max(e["t"], due_reached(e, clock)[0] / 1e6)
        return cls(
            exact=exact,
            seqs={q: [e["seq"] for e in q_lines] for q, q_lines in exact.items()},
            unsure=unsure,
            failed=failed,
            interleavings=sum(
                a["producer"] != b["producer"] for q_lines in exact.values() for a, b in itertools.pairwise(q_lines)
            ),
            at={(e["queue"], e["seq"]): e["t"] for e in lines if "t" in e},
            producers={e["producer"] for e in lines if e.get("producer") not in (None, INJECTOR)},
            available=available,
            delayed=[e for e in lines if "delay_ms" in e and e["status"] != "failed"],
        )


@dataclass
class Ticks:
    """The periodic schedule the replicas ran: what its tasks journaled, and what the runner
    found at the end (``ticks.json``: Redis's record of the schedule, the tick tasks Redis still
    held, and the window in which the fleet ran it)."""

    #: The schedule's interval in ms (None: no tick ran and the runner wrote nothing of it).
    every_ms: int | None
    #: Start lines of tick tasks, in time order.
    starts: list[Event]
    #: Tick -> the task ids that started for it.
    ran: dict[int, set[str]]
    #: Task ids of tick tasks that ran to an end line.
    ended: set[str]
    #: Tick -> task ids still pending or in flight when every replica had stopped, never run.
    left: dict[int, set[str]]
    #: Tick -> task ids dead-lettered.
    dead: dict[int, set[str]]
    #: Redis's record at the end: ``last`` tick (Redis ms), ``fired`` and ``skipped`` counts;
    #: None if not read.
    record: dict[str, int | None] | None
    #: (fleet ready, queues drained), machine time; None if not known.
    window: tuple[float, float] | None

    @classmethod
    def of(cls, journal: Sequence[Event], facts: dict[str, Any] | None) -> Ticks:
        lines = sorted((e for e in journal if "tick" in e), key=lambda e: e["t"])
        starts = [e for e in lines if e["event"] == "start"]
        ran: dict[int, set[str]] = defaultdict(set)
        for e in starts:
            ran[int(e["tick"])].add(e["task_id"])
        facts = facts or {}
        left: dict[int, set[str]] = defaultdict(set)
        for t in facts.get("left", ()):
            left[int(t["tick"])].add(t["task_id"])
        dead: dict[int, set[str]] = defaultdict(set)
        for t in facts.get("dead", ()):
            dead[int(t["tick"])].add(t["task_id"])
        window = facts.get("window")
        every = facts.get("every_ms") or next((e.get("every_ms") for e in starts if e.get("every_ms")), None)
        return cls(
            every_ms=int(every) if every else None,
            starts=starts,
            ran=ran,
            ended={e["task_id"] for e in lines if e["event"] == "end"},
            left=left,
            dead=dead,
            record=facts.get("record"),
            window=(float(window[0]), float(window[1])) if window else None,
        )

    @property
    def present(self) -> bool:
        return bool(self.starts or self.every_ms)

    def ids(self) -> dict[int, set[str]]:
        """Tick -> every task id known for it: started, left in the stream, dead-lettered."""
        out: dict[int, set[str]] = defaultdict(set)
        for source in (self.ran, self.left, self.dead):
            for tick, ids in source.items():
                out[tick] |= ids
        return out


def due_reached(line: Event, clock: RedisClock) -> tuple[int, int]:
    """When Redis's clock reached the due time of delayed acceptance ``line`` (which has one),
    from its enqueue on: (machine time in µs, span)."""
    return clock.reached(int(line["due"]), after=int(line["order"][0]) / 1e6)


#: Where a task joined its queue: a sort key, the span (Redis process) it joined under, and
#: the Redis ms of its joining by that process's clock.
JoinKey = tuple[tuple[int, ...], int, int]


def _join_key(line: Event, clock: RedisClock, enqueued: dict[str, int]) -> JoinKey:
    """Where an accepted task joined its queue, in the order tasks join it.

    A task enqueued at once joins at its enqueue; a delayed one at its due time, behind every
    task enqueued while Redis's clock read that ms or later (whatever adds to a stream first
    moves the tasks due by then: ``promote`` in lib.lua), ahead of every task enqueued before.
    So a delayed task goes ahead of a task enqueued at once iff its due time is at most that
    task's enqueue stamp, both in Redis ms of one Redis process: compared on this machine's
    clock, (due - shift) * 1000 µs against (stamp - shift) * 1000 µs, ties to the delayed task.
    The stamp is the one the enqueue script wrote into the entry, which the replica journals
    (``enqueued_ms``); a task that never started is placed by the TIME read after its enqueue,
    a ms late at most, which matters to no check (only started tasks are ordered). Delayed
    tasks that fall due together join by due time, then in enqueue order (the acceptance
    counter's): a Redis restarted with its clock set forward finds several due at once.
    """
    order_us, counter = int(line["order"][0]), int(line["order"][1])
    due = line.get("due")
    if due is not None:
        reached_us, span = due_reached(line, clock)
        return (reached_us, 0, int(due), counter), span, int(due)
    shift = int(line.get("redis_clock_shift_ms", 0))
    stamp = enqueued.get(line["task_id"], (order_us + shift * 1000) // 1000)
    return ((stamp - shift) * 1000, 1, order_us, counter), clock.span_at(order_us / 1e6), stamp


def _set_back_ambiguous(
    joins: list[tuple[Event, tuple[int, ...], int, int]], clock: RedisClock, first_start: dict[str, float]
) -> set[int]:
    """The delayed tasks of one queue whose place no journal can tell (``id()`` of their lines).

    A Redis process restarted with its clock set back reads again due times its predecessor's
    clock had passed. A delayed task due under the old process joined at once if something
    added to its stream (or took from it) before the restart, else only when the new clock reads
    its due time again, behind whatever the new process accepted until then: which one, nothing
    journals. So such a task's place is unknown if it had not started by the restart and a task
    of the new process (or a later one) joined its queue at a Redis time before its due time.
    Without a clock set back no such task exists: a later process's clock reads past every due
    time an earlier one reached."""
    out: set[int] = set()
    for line, _, span, due in joins:
        if "delay_ms" not in line or span + 1 == len(clock.spans):
            continue
        started = first_start.get(line["task_id"], math.inf)
        if started < clock.spans[span + 1][0]:
            continue  # it had joined before its Redis process went down
        if any(
            other_span > span and clock.spans[other_span][0] < started and raw < due for _, _, other_span, raw in joins
        ):
            out.add(id(line))
    return out


@dataclass
class Executions:
    """The execution journal, indexed the ways the checkers look it up."""

    lines: list[Event]
    #: Every line of a task, in time order.
    by_task: dict[str, list[Event]]
    #: When each process wrote its first line.
    first_seen: dict[int, float]
    #: Start lines per queue, in time order.
    starts_by_queue: dict[str, list[Event]]
    #: End times per (pid, queue), in time order.
    ends_by_pid_queue: dict[tuple[int, str], list[float]]
    #: When each run, (pid, task id, attempt, start time), ended or failed (see ``end_of``).
    ends: dict[RunKey, float]
    #: (pid, t) -> the runs that process had started and not finished at t.
    open_at: Callable[[int, float], list[Event]]

    @classmethod
    def of(cls, journal: list[Event]) -> Executions:
        by_task: dict[str, list[Event]] = defaultdict(list)
        first_seen: dict[int, float] = {}
        for e in journal:
            by_task[e["task_id"]].append(e)
            first_seen[e["pid"]] = min(first_seen.get(e["pid"], e["t"]), e["t"])
        for events in by_task.values():
            events.sort(key=lambda e: e["t"])
        starts_by_queue: dict[str, list[Event]] = defaultdict(list)
        ends_by_pid_queue: dict[tuple[int, str], list[float]] = defaultdict(list)
        for e in sorted(journal, key=lambda e: e["t"]):
            if e["event"] == "start":
                starts_by_queue[e["queue"]].append(e)
            elif e["event"] == "end":
                ends_by_pid_queue[(e["pid"], e["queue"])].append(e["t"])
        ends = _run_ends(journal)
        return cls(journal, by_task, first_seen, starts_by_queue, ends_by_pid_queue, ends, _open_runs_at(journal))

    def end_of(self, start: Event) -> float | None:
        """When the run that ``start`` began ended or failed; None if its process died first."""
        return self.ends.get(_run_key(start))


#: One run of a task: (pid, task id, attempt, start time). A task can run more than once in
#: one process under one attempt number (taken over by a later lease of that process, requeued
#: from the dead letters), so the start time tells the runs apart.
RunKey = tuple[int, str, int, float]


def _run_key(start: Event) -> RunKey:
    return (start["pid"], start["task_id"], start["attempt"], start["t"])


def _run_ends(journal: Iterable[Event]) -> dict[RunKey, float]:
    """When each run ended or failed: the first end or fail line after its start, in its
    process, of that task and attempt."""
    open_: dict[tuple[int, str, int], Event] = {}
    ends: dict[RunKey, float] = {}
    for e in sorted(journal, key=lambda e: e["t"]):
        key = (e["pid"], e["task_id"], e["attempt"])
        if e["event"] == "start":
            open_[key] = e
        elif key in open_:
            ends[_run_key(open_.pop(key))] = e["t"]
    return ends


class Overlaps(NamedTuple):
    """Overlapping executions of one queue, sorted out (see ``RunFacts.overlaps``)."""

    unexplained: list[tuple[Event, Event]]
    #: Explained by a stale holder starting late, right after its process froze.
    stale_late: int
    #: Explained by a lapsed lease: the later run holds the higher fencing token.
    by_fence: int


@dataclass
class RunFacts:
    """The shared inputs of every checker, built once: one run's journals, the settings they
    are judged by, and what the caller found in Redis and in the fleet at the end."""

    lease_ttl: float
    poll_interval: float
    accepted: Acceptances
    executions: Executions
    faults: list[Event]
    #: What can explain a lost lease: the injected faults, and each run of a GIL-holding task
    #: (its whole process froze meanwhile).
    causes: list[Event]
    #: Sequence numbers found dead-lettered, per queue.
    dead: dict[str, list[int]]
    #: Every dead-letter record (queue, reason, seq or None, raw in hex); None: not read.
    dead_letters: Sequence[Event] | None
    #: Tasks still pending or in flight per queue at the end; None: not known.
    remaining: dict[str, int] | None
    unexpected_exits: Sequence[Event]
    log_counts: dict[str, int] | None
    #: Redis's clock over the run, from its restarts.
    clock: RedisClock = field(default_factory=RedisClock)
    #: The periodic schedule the replicas ran (none if they ran none).
    ticks: Ticks = field(default_factory=lambda: Ticks.of([], None))

    @classmethod
    def read(
        cls,
        run_dir: Path,
        *,
        lease_ttl: float,
        poll_interval: float,
        dead: dict[str, list[int]] | None = None,
        remaining: dict[str, int] | None = None,
        unexpected_exits: Sequence[Event] = (),
        log_counts: dict[str, int] | None = None,
        dead_letters: Sequence[Event] | None = None,
    ) -> RunFacts:
        """Read the journals of ``run_dir`` (see ``verify`` for the other arguments)."""
        accepted_lines = read_accepted(run_dir)
        journal = read_journal(run_dir / EXECUTIONS)
        faults = read_lines(run_dir / FAULTS)
        if dead is None and dead_letters is not None:
            dead = defaultdict(list)
            for d in dead_letters:
                if d.get("seq") is not None:
                    dead[d["queue"]].append(int(d["seq"]))
        _unshift_redis_clock(accepted_lines, faults)
        clock = RedisClock.of(faults)
        ticks_path = run_dir / TICKS
        tick_facts = json.loads(ticks_path.read_text()) if ticks_path.exists() else None
        return cls(
            lease_ttl=lease_ttl,
            poll_interval=poll_interval,
            accepted=Acceptances.of(accepted_lines, clock, journal),
            executions=Executions.of(journal),
            faults=faults,
            causes=faults + _gil_holds(journal, faults),
            dead=dead or {},
            dead_letters=dead_letters,
            remaining=remaining,
            unexpected_exits=unexpected_exits,
            log_counts=log_counts,
            clock=clock,
            ticks=Ticks.of(journal, tick_facts),
        )

    @property
    def takeover_bound(self) -> float:
        """The longest a queue may wait for another replica after its holder went away."""
        return self.lease_ttl + self.poll_interval + TAKEOVER_SLACK

    def window(self, f: Event) -> tuple[float, float]:
        """When fault ``f`` could have made a replica lose a lease or an acknowledgement."""
        return _fault_window(f, self.lease_ttl, self.poll_interval)

    def paused(self, pid: int, t: float) -> bool:
        """Whether process ``pid`` was frozen (SIGSTOP, a task holding the GIL) shortly before ``t``."""
        return any(
            f["kind"] in PAUSE_FAULTS
            and f.get("pid") == pid
            and f["t"] <= t <= float(f["t_end"] if "t_end" in f else f["t"]) + self.takeover_bound
            for f in self.causes
        )

    @cached_property
    def stops(self) -> list[Event]:
        """The graceful stops of the rolling restarts."""
        return [
            dict(s, kind="graceful-stop") for f in self.faults if f["kind"] == "rolling-restart" for s in f["stops"]
        ]

    @cached_property
    def voided(self) -> dict[tuple[int, str], float]:
        """(pid, task id) -> when an operator's skip dead-lettered the task that process was
        running: from then on that execution no longer counts (the stream moves on while it
        runs, docs/guarantees.md "Operator actions and work taken ahead")."""
        return {
            (f["pid"], f["skipped_task_id"]): float(f["t"])
            for f in self.faults
            if f["kind"] == "skip" and f.get("skipped_task_id")
        }

    @cached_property
    def requeued_at(self) -> dict[str, list[float]]:
        """Task id -> when an operator requeued it from the dead letters."""
        out: dict[str, list[float]] = defaultdict(list)
        for f in self.faults:
            if f["kind"] == "requeue-front":
                for task_id in f["task_ids"]:
                    out[task_id].append(float(f["t"]))
        return out

    @cached_property
    def overlap_lines(self) -> list[Event]:
        """The journal as the overlap checks read it: a skipped execution ends at its skip."""
        if not self.voided:
            return self.executions.lines
        lines = []
        for e in self.executions.lines:
            skipped_at = self.voided.get((e["pid"], e["task_id"]))
            if skipped_at is not None and e["event"] != "start" and e["t"] > skipped_at:
                e = {**e, "t": skipped_at}
            lines.append(e)
        return lines

    @cached_property
    def report(self) -> Report:
        """Loss and order (``pyfiq.ops.scenario_tasks.check``) over the tasks whose place is known."""
        exact_keys = {(q, s) for q, seqs in self.accepted.seqs.items() for s in seqs}
        journal = [e for e in self.overlap_lines if (e["queue"], e["seq"]) in exact_keys]
        return check(journal, self.accepted.seqs, self.dead)

    @cached_property
    def lost(self) -> list[tuple[str, int]]:
        """Accepted tasks that neither ended nor were dead-lettered, whatever lost them."""
        ended = {(e["queue"], e["seq"]) for e in self.executions.lines if e["event"] == "end"}
        dead_keys = {(q, s) for q, seqs in self.dead.items() for s in seqs}
        lost = [(q, s) for q, seqs in self.report.lost.items() for s in seqs]
        return lost + [
            (e["queue"], e["seq"]) for e in self.accepted.unsure if (e["queue"], e["seq"]) not in ended | dead_keys
        ]

    @cached_property
    def overlaps(self) -> Overlaps:
        """Overlaps over every execution. ``check()`` takes the earlier-started run as the one
        whose lease lapsed; a stale holder can also *start* late: the later-started run then
        has the lower fence."""
        every = check(self.overlap_lines, {})
        unexplained: list[tuple[Event, Event]] = []
        stale_late = 0
        for a, b in every.overlaps_unexplained:
            # A holder checks its lease right before it starts a task, counting from when it
            # sent the request that granted or renewed it, so only a freeze of the whole
            # process after that check explains a late start; a slow network does not.
            if b["fence"] < a["fence"] and self.paused(b["pid"], b["t"]):
                stale_late += 1
            else:
                unexplained.append((a, b))
        return Overlaps(unexplained, stale_late, every.overlaps_explained)

    def restart_before(self, key: tuple[str, int]) -> Event | None:
        """The Redis restart that could have lost acceptance ``key``: the first one to take Redis
        down (``t_down``) after the producer had the acceptance back, within EVERYSEC_WINDOW.
        The fault's own start is recorded before its signal is sent, so an acceptance can come
        back after it and still be Redis's last write."""
        at = self.accepted.at.get(key)
        if at is None:
            return None
        downs = [(float(f["t_down"] if "t_down" in f else f["t"]), i, f) for i, f in enumerate(self.faults)]
        after = [d for d in downs if d[2]["kind"] in REDIS_FAULTS and d[0] >= at]
        if not after or min(after)[0] - at > EVERYSEC_WINDOW:
            return None
        return min(after)[2]

    @cached_property
    def redis_restarts(self) -> list[tuple[Event, Event]]:
        """Each Redis restart with what it lost: the lost tasks accepted within EVERYSEC_WINDOW
        before it, and acknowledged writes (how far the acceptance counters went back)."""
        out = []
        for f in self.faults:
            if f["kind"] not in REDIS_FAULTS:
                continue
            before = {k for k in self.lost if self.restart_before(k) is f}
            loss = {"kind": f["kind"], "appendfsync": f["appendfsync"], "lost_tasks": len(before)}
            loss["acknowledged_writes_lost"] = _counter_rollback(self.accepted.exact, f)
            out.append((f, loss))
        return out


@dataclass
class Finding:
    """What one checker found: its breaches (none: the property held) and its figures, which
    go to the verdict's stats."""

    breaches: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def _open_runs_at(journal: list[Event]) -> Callable[[int, float], list[Event]]:
    """A function (pid, t) -> the executions that pid had started and not finished at t."""
    by_pid: dict[int, list[Event]] = defaultdict(list)
    for e in sorted(journal, key=lambda e: e["t"]):
        by_pid[e["pid"]].append(e)

    def open_at(pid: int, t: float) -> list[Event]:
        runs: dict[tuple[str, int], Event] = {}
        for e in by_pid.get(pid, []):
            if e["t"] > t:
                break
            key = (e["task_id"], e["attempt"])
            if e["event"] == "start":
                runs[key] = e
            else:
                runs.pop(key, None)
        return list(runs.values())

    return open_at


def _lapses_without_fault(journal: list[Event], faults: list[Event], ttl: float, poll: float) -> int:
    """Fence-explained overlaps whose older execution's replica had no fault around it."""
    runs: dict[str, list[Event]] = defaultdict(list)
    for e in journal:
        if e["event"] == "start":
            runs[e["queue"]].append(e)
    ends = _run_ends(journal)
    count = 0
    for starts_ in runs.values():
        starts_.sort(key=lambda e: e["t"])
        for i, a in enumerate(starts_):
            until = ends.get(_run_key(a))
            if until is None:
                continue  # killed mid-task: nothing of it ran on
            for b in starts_[i + 1 :]:
                if b["t"] >= until:
                    break
                if a["pid"] == b["pid"] or a["fence"] >= b["fence"]:
                    continue
                # A graceful stop, even one that timed out, must not let a lease go under a
                # running task: it explains no overlap.
                if not any(
                    f["target"] in (a["replica"], "redis")
                    and f["kind"] in EXPLAINING_FAULTS
                    and f["kind"] != "async-stop"
                    and _fault_window(f, ttl, poll)[0] <= b["t"]
                    and _fault_window(f, ttl, poll)[1] >= a["t"]
                    for f in faults
                ):
                    count += 1
    return count


def _unshift_redis_clock(accepted_lines: list[Event], faults: list[Event]) -> None:
    """Put each acceptance's Redis time back on the true clock, in place.

    A clock fault restarts Redis with its wall clock shifted, and acceptances stamped with it
    would sort before earlier ones. The shift in force is whichever of the run's shifts puts
    the Redis time inside the producer's own send-to-reply window (the shifts are seconds
    apart, the windows milliseconds wide)."""
    shifts = {0} | {int(f.get("shift_ms", 0)) for f in faults if f["kind"] in REDIS_FAULTS}
    if shifts == {0}:
        return
    for e in accepted_lines:
        if "order" not in e:
            continue
        redis_s = e["order"][0] / 1e6
        high = float(e["t"])
        low = float(e.get("sent") or high)

        def distance(shift_ms: int, redis_s: float = redis_s, low: float = low, high: float = high) -> float:
            at = redis_s - shift_ms / 1000
            return max(low - at, 0.0, at - high)

        shift = min(sorted(shifts), key=distance)
        if shift:
            e["order"] = [int(e["order"][0] - shift * 1000), e["order"][1]]
            if "order_from" in e:
                e["order_from"] = int(e["order_from"] - shift * 1000)
            e["redis_clock_shift_ms"] = shift


def _gil_holds(journal: list[Event], faults: list[Event]) -> list[Event]:
    """One pause per run of a GIL-holding task: its process froze from the run's start to its
    end (or, killed, for the time the task asked for)."""
    asked = {f["task_id"]: float(f["seconds"]) for f in faults if f["kind"] == "gil"}
    holds: list[Event] = []
    if not asked:
        return holds
    ends = _run_ends(journal)
    for e in journal:
        if e["event"] == "start" and e["task_id"] in asked:
            end = ends.get(_run_key(e), e["t"] + asked[e["task_id"]])
            holds.append({"kind": "gil-hold", "target": e["replica"], "pid": e["pid"], "t": e["t"], "t_end": end})
    return holds


def _counter_rollback(exact: dict[str, list[Event]], crash: Event) -> int:
    """Acknowledged writes a Redis restart lost: per queue, how far the acceptance counter went
    back (the counter is INCRed in the same transaction as every accepted enqueue)."""
    lost = 0
    for lines in exact.values():
        # Redis's own clock (read in the acceptance transaction) tells which side of the
        # restart an acceptance fell on.
        before = [e["order"][1] for e in lines if e["order"][0] / 1e6 < crash["t_down"]]
        after = [e["order"][1] for e in lines if e["order"][0] / 1e6 > crash["t_down"]]
        if before and after:
            lost += max(0, max(before) - (min(after) - 1))
    return lost
