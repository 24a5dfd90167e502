"""What a run left behind, read once: acceptances, executions, overlaps, faults and the
verdict types the checkers fill.
"""

from __future__ import annotations

import itertools
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

from .journal import ACCEPTED_GLOB, EXECUTIONS, FAULTS, Event, read_lines
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


@dataclass
class Acceptances:
    """What Redis accepted, per queue in Redis's own order (exact across producers)."""

    #: Acceptances whose place is known, per queue, in Redis's order.
    exact: dict[str, list[Event]]
    #: The same, as sequence numbers.
    seqs: dict[str, list[int]]
    #: Accepted on a retry (``duplicate``): the task is in, its place is unknown.
    unsure: list[Event]
    #: Enqueues the producers gave up on.
    failed: int
    #: Producer switches in the acceptance order, all queues together.
    interleavings: int
    #: (queue, seq) -> when the producer had the acceptance back.
    at: dict[tuple[str, int], float]
    producers: set[str]

    @classmethod
    def of(cls, lines: list[Event]) -> Acceptances:
        exact: dict[str, list[Event]] = defaultdict(list)
        unsure: list[Event] = []
        failed = 0
        for line in lines:
            if line["status"] == "accepted":
                exact[line["queue"]].append(line)
            elif line["status"] == "duplicate":
                unsure.append(line)
            else:
                failed += 1
        for q_lines in exact.values():
            q_lines.sort(key=lambda e: (e["order"][0], e["order"][1]))
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
        )


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
        return cls(
            lease_ttl=lease_ttl,
            poll_interval=poll_interval,
            accepted=Acceptances.of(accepted_lines),
            executions=Executions.of(journal),
            faults=faults,
            causes=faults + _gil_holds(journal, faults),
            dead=dead or {},
            dead_letters=dead_letters,
            remaining=remaining,
            unexpected_exits=unexpected_exits,
            log_counts=log_counts,
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
        runs, README "Operator actions and work taken ahead")."""
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
