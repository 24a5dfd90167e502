"""One checker per property of a run: loss, order, re-executions, overlaps, takeovers,
hand-offs, Redis restarts, fencing order and stops.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterator

from .facts import Finding, RunFacts, _lapses_without_fault
from .journal import Event, _max, _median
from .profiles import EXPLAINING_FAULTS, REDIS_FAULTS, TAKEOVER_FAULTS
from .replica import STOP_DRILL_TIMEOUT


def census(run: RunFacts) -> Finding:
    """No property, only figures: what was accepted, run and injected, and the throughput."""
    accepted = run.accepted
    starts = [e for e in run.executions.lines if e["event"] == "start"]
    ends = [e for e in run.executions.lines if e["event"] == "end"]
    span = (max(e["t"] for e in ends) - min(e["t"] for e in starts)) if ends and starts else 0.0
    # Tasks the producers and faults enqueued; the schedule's ticks are counted by check_ticks.
    first_count = len({(e["queue"], e["seq"]) for e in starts if "tick" not in e})
    fault_counts = Counter(f["kind"] for f in run.faults)
    if run.stops:
        fault_counts["graceful-stop"] = len(run.stops)
    figures = {
        "accepted": sum(len(v) for v in accepted.seqs.values()) + len(accepted.unsure),
        "accepted_place_unknown": len(accepted.unsure),
        "failed_enqueues": accepted.failed,
        "producers": len(accepted.producers),
        "producer_interleavings": accepted.interleavings,
        "queues": len(accepted.seqs),
        "executions": len(starts),
        "first_executions": first_count,
        "retries_in_place": sum(1 for e in starts if e["attempt"] > 1),
        "faults": dict(fault_counts),
        "lease_ttl": run.lease_ttl,
        "throughput_tasks_per_s": round(first_count / span, 1) if span > 0 else 0.0,
        "span_s": round(span, 1),
        "replica_log_counts": run.log_counts or {},
    }
    return Finding(figures=figures)


def check_lost_tasks(run: RunFacts) -> Finding:
    """Every accepted task ended or was dead-lettered. A task lost in a Redis crash under
    appendfsync=everysec, accepted within the window before the crash, is Redis's documented
    durability limit, not pyfiq's: counted apart, not a breach."""
    durability_lost: list[tuple[str, int]] = []
    pyfiq_lost: list[tuple[str, int]] = []
    for key in run.lost:
        restart = run.restart_before(key)
        if restart is not None and restart["kind"] == "redis-crash" and restart["appendfsync"] == "everysec":
            durability_lost.append(key)
        else:
            pyfiq_lost.append(key)
    finding = Finding()
    if pyfiq_lost:
        finding.breaches.append(f"{len(pyfiq_lost)} accepted tasks lost, e.g. {pyfiq_lost[:5]}")
    finding.figures = {
        "lost": len(pyfiq_lost),
        "lost_to_redis_durability": len(durability_lost),
        "dead_lettered": sum(len(v) for v in run.dead.values()),
    }
    return finding


def check_first_execution_order(run: RunFacts) -> Finding:
    """On each queue, first executions follow the order tasks joined it: Redis's acceptance
    order, a delayed task taking its place at its due time (``facts._join_key``)."""
    finding = Finding(figures={"order_violations": len(run.report.order_violations)})
    for q, firsts in run.report.order_violations.items():
        expected = [s for s in run.accepted.seqs[q] if s in set(firsts)]
        at = next((i for i, (a, b) in enumerate(zip(firsts, expected, strict=False)) if a != b), None)
        finding.breaches.append(f"{q}: first executions broke acceptance order at position {at}")
    return finding


def check_reexecutions(run: RunFacts) -> Finding:
    """Each re-execution (a first attempt started again) follows a fault on the replica that
    ran the task before (or on Redis), or a graceful stop during the task's retry back-off."""
    by_cause: Counter[str] = Counter()
    unexplained: list[Event] = []
    count = 0
    for events in run.executions.by_task.values():
        starts = [e for e in events if e["event"] == "start"]
        for prev, rerun in itertools.pairwise(starts):
            if rerun["attempt"] != 1:
                continue
            count += 1
            cause = _rerun_cause(run, events, prev, rerun)
            if cause is None:
                unexplained.append(rerun)
            else:
                by_cause[cause] += 1
    finding = Finding()
    if unexplained:
        finding.breaches.append(
            f"{len(unexplained)} re-executions with no crash or lease loss to explain them, e.g. "
            + "; ".join(f"{e['queue']} #{e['seq']} on {e['replica']} at {e['t']:.3f}" for e in unexplained[:3])
        )
    finding.figures = {
        "reexecutions": count,
        "reexecutions_by_cause": dict(by_cause),
        "reexecutions_unexplained": len(unexplained),
    }
    return finding


def _rerun_cause(run: RunFacts, events: list[Event], prev: Event, rerun: Event) -> str | None:
    """What explains ``rerun``, a task started again after its run ``prev`` (``events``: the
    task's lines): a fault, a graceful stop during its retry back-off, or nothing (None)."""
    prev_last = [e for e in events if e["pid"] == prev["pid"] and e["t"] < rerun["t"]][-1]
    if any(prev["t"] < t < rerun["t"] for t in run.requeued_at.get(rerun["task_id"], ())):
        return "requeue-front"
    # Usually the earlier run was interrupted (a fault on its replica, or on Redis). A re-run
    # under an *older* fence is the other way round: a holder paused or cut off after it was
    # handed the task wakes up and runs it although the new holder already has; fencing keeps
    # it from acknowledging, not from running (docs/guarantees.md: "Fencing protects the queue, not your
    # side effects").
    stale = rerun["fence"] < prev["fence"]
    culprit = rerun if stale else prev
    since = min(prev["t"], rerun["t"])
    candidates = [(f, late) for f in run.causes if (late := _explains(run, f, culprit, since, rerun["t"])) is not None]
    if candidates:
        # The first fault after the interrupted run began, else one already under way.
        later = [c for c in candidates if c[0]["t"] >= prev["t"]]
        f, late = min(later, key=lambda c: c[0]["t"]) if later else max(candidates, key=lambda c: c[0]["t"])
        kind: str = f["kind"]
        return kind + (" (stale holder)" if stale else "") + (" (connection found dead later)" if late else "")
    for s in run.stops:
        if s["pid"] == prev["pid"] and prev_last["event"] == "fail" and s["t"] <= rerun["t"]:
            return "graceful-stop-during-retry"
    return None


def _explains(run: RunFacts, f: Event, culprit: Event, since: float, until: float) -> bool | None:
    """Whether fault ``f`` can explain a lease or acknowledgement lost by ``culprit``'s process
    between ``since`` and ``until``: None if not, True if only as a connection the fault reset
    and the process found dead on its next use, which can be much later (a pooled connection,
    with no retry on connection errors)."""
    if f["kind"] not in EXPLAINING_FAULTS or f["t"] > until:
        return None
    if f["target"] not in (culprit["replica"], "redis"):
        return None
    if run.window(f)[1] >= since:
        return False
    same_process = f.get("pid") == culprit["pid"] if f["target"] != "redis" else None
    if f["kind"] in ("cut", "blackhole") and same_process:
        return True
    if f["kind"] in REDIS_FAULTS and run.executions.first_seen.get(culprit["pid"], float("inf")) < f["t"]:
        return True
    return None


def check_overlaps(run: RunFacts) -> Finding:
    """Executions of one queue overlap only on a lapsed lease: the later run under a higher
    fencing token, or a stale holder starting late right after its process froze; and a lease
    lapses only around a fault on its holder's replica (or on Redis)."""
    overlaps = run.overlaps
    finding = Finding()
    if overlaps.unexplained:
        a, b = overlaps.unexplained[0]
        finding.breaches.append(
            f"{len(overlaps.unexplained)} overlapping executions of one queue not explained by a lapsed "
            f"lease, e.g. {a['queue']} #{a['seq']} on {a['replica']} (fence {a['fence']}) and #{b['seq']} on "
            f"{b['replica']} (fence {b['fence']})"
        )
    lapsed_without_fault = _lapses_without_fault(run.overlap_lines, run.causes, run.lease_ttl, run.poll_interval)
    if lapsed_without_fault:
        finding.breaches.append(f"{lapsed_without_fault} overlaps (lapsed leases) with no fault on that replica")
    finding.figures = {
        "overlaps_unexplained": len(overlaps.unexplained),
        "overlaps_explained_by_fencing": overlaps.by_fence + overlaps.stale_late,
    }
    return finding


def check_takeovers(run: RunFacts) -> Finding:
    """After each fault that made a replica drop its queues (kill, stop, cut, blackhole), each
    task it was running runs again first on its queue (G3), under a newer lease, within the
    take-over bound (lease TTL + poll interval + TAKEOVER_SLACK)."""
    bound = run.takeover_bound
    finding = Finding()
    takeovers: dict[str, list[float]] = defaultdict(list)
    mid_task = interrupted = rerun_first = raised = 0
    for f in run.faults:
        if f["kind"] not in TAKEOVER_FAULTS:
            continue
        held = run.executions.open_at(f["pid"], f["t"])
        mid_task += bool(held)
        for task_run, nxt in _interrupted(run, f, held):
            interrupted += 1
            q = task_run["queue"]
            if nxt is None:
                finding.breaches.append(f"{q}: nothing ran after the {f['kind']} of {f['target']} at {f['t']:.3f}")
                continue
            # The interrupted task (or the one whose acknowledgement could not reach Redis)
            # runs again first, before anything behind it; with group acknowledgements, after
            # the tasks that had ended on that holder whose acknowledgement had not landed.
            again = _rerun_after_unacknowledged(run, f, task_run)
            if again is not None:
                rerun_first += 1
                raised += again["deliveries"] > task_run["deliveries"]
            else:
                finding.breaches.append(
                    f"{q}: after the {f['kind']} of {f['target']}, #{nxt['seq']} ran before the "
                    f"interrupted #{task_run['seq']}"
                )
            took = nxt["t"] - f["t"]
            takeovers[f["kind"]].append(took)
            # Redis expires leases on its wall clock: one restarted with its clock set back
            # keeps every lease that much longer, which no replica can shorten.
            allowed = bound + _clock_setback(run, f["t"] - run.lease_ttl, f["t"] + bound)
            if took > allowed:
                finding.breaches.append(
                    f"{q}: takeover after {f['kind']} of {f['target']} took {took:.2f}s > {allowed:.2f}s"
                )
    every = [t for ts in takeovers.values() for t in ts]
    finding.figures = {
        "faults_mid_task": mid_task,
        "interrupted": interrupted,
        "interrupted_rerun_first": rerun_first,
        "interrupted_rerun_delivery_raised": raised,
        "takeover_max": _max(every),
        "takeover_median": _median(every),
        "takeover_by_kind": {k: {"n": len(v), "max": _max(v), "median": _median(v)} for k, v in takeovers.items()},
        "takeover_bound": round(bound, 3),
    }
    return finding


def _clock_setback(run: RunFacts, since: float, until: float) -> float:
    """Seconds by which a Redis restart between ``since`` and ``until`` set Redis's clock back."""
    return max(
        (
            max(0, int(g.get("previous_shift_ms", 0)) - int(g.get("shift_ms", 0))) / 1000
            for g in run.faults
            if g["kind"] in ("clock", "redis-restart", "redis-crash") and since <= g["t"] <= until
        ),
        default=0.0,
    )


def _interrupted(run: RunFacts, f: Event, held: list[Event]) -> Iterator[tuple[Event, Event | None]]:
    """The runs of ``held`` that fault ``f`` interrupted, each with the next start on its queue
    under a newer lease (None: nothing ran after)."""
    for task_run in held:
        reruns = [
            e
            for e in run.executions.by_task[task_run["task_id"]]
            if e["event"] == "start" and e["fence"] > task_run["fence"]
        ]
        if not [e for e in reruns if e["t"] > f["t"]]:
            continue  # it finished and was acknowledged before the fault took hold
        # A stale holder's late start under an older lease is not a takeover.
        starts = run.executions.starts_by_queue[task_run["queue"]]
        yield task_run, next((e for e in starts if e["t"] > f["t"] and e["fence"] > task_run["fence"]), None)


def _rerun_after_unacknowledged(run: RunFacts, f: Event, task_run: Event) -> Event | None:
    """The interrupted run's task started again under a newer lease, if every start before it
    on its queue since fault ``f`` is a task that had ended on the same holder before ``f`` (its
    acknowledgement was on its way, as group acknowledgements allow); else None."""
    starts = run.executions.starts_by_queue[task_run["queue"]]
    for e in starts:
        if e["t"] <= f["t"] or e["fence"] <= task_run["fence"]:
            continue
        if e["task_id"] == task_run["task_id"]:
            return e
        ended_here = any(
            x["event"] == "end" and x["pid"] == task_run["pid"] and x["t"] <= f["t"]
            for x in run.executions.by_task[e["task_id"]]
        )
        if not ended_here:
            return None
    return None


def check_handoffs(run: RunFacts) -> Finding:
    """Each graceful stop of a rolling restart exits cleanly and hands its queues over at
    once: the next task of a queue it ran starts on another replica well within a lease TTL
    of the last one it finished."""
    finding = Finding()
    handoffs: list[float] = []
    for s in run.stops:
        if s["rc"] != 0:
            finding.breaches.append(f"graceful stop of {s['replica']} (pid {s['pid']}) ended with {s['rc']}")
        for q in {e["queue"] for e in run.executions.open_at(s["pid"], s["t"])}:
            finish = [t for t in run.executions.ends_by_pid_queue[(s["pid"], q)] if t >= s["t"]]
            if not finish:
                continue
            starts = run.executions.starts_by_queue[q]
            nxt = next((e for e in starts if e["t"] > finish[0] and e["pid"] != s["pid"]), None)
            if nxt is None or run.accepted.available.get((q, nxt["seq"]), float("inf")) > finish[0]:
                continue  # the queue had nothing more to hand over (a delayed task was not due yet)
            handoffs.append(nxt["t"] - finish[0])
    if handoffs and max(handoffs) >= run.lease_ttl:
        finding.breaches.append(f"a graceful hand-off took {max(handoffs):.2f}s, as long as a lease TTL: no hand-off")
    finding.figures = {"handoff_max": _max(handoffs), "handoff_median": _median(handoffs)}
    return finding


def check_redis_restarts(run: RunFacts) -> Finding:
    """A Redis restart loses no task and no acknowledged write when graceful or under
    appendfsync=always; also times the first task after each restart."""
    resumes: list[float] = []
    for f, _ in run.redis_restarts:
        starts = run.executions.starts_by_queue.values()
        nxt = min((e["t"] for es in starts for e in es if e["t"] > f["t_end"]), default=None)
        if nxt is not None:
            resumes.append(nxt - f["t_end"])
    losses = [loss for _, loss in run.redis_restarts]
    finding = Finding(figures={"redis_resume_max": _max(resumes), "redis_losses": losses})
    for r in losses:
        if r["appendfsync"] == "always" and (r["lost_tasks"] or r["acknowledged_writes_lost"]):
            finding.breaches.append(f"Redis {r['kind']} with appendfsync=always lost {r}")
        if r["kind"] in ("redis-restart", "clock") and (r["lost_tasks"] or r["acknowledged_writes_lost"]):
            finding.breaches.append(f"a graceful Redis restart lost {r}")
    return finding


def check_fencing_order(run: RunFacts) -> Finding:
    """Fencing tokens in start order, per queue: a start under a lower token than one already
    started means work began on a lapsed lease (a reply that came too late, a stop that let
    the lease go) or the token went backwards (a Redis clock set back). Only a process freeze
    excuses it, and only a Redis restart that lost writes (the counter with them) resets the
    comparison: then only Redis's clock keeps the token rising, which is the documented limit."""
    counter_losses = [f["t_down"] for f, r in run.redis_restarts if r["lost_tasks"] or r["acknowledged_writes_lost"]]
    stale_starts: list[tuple[Event, Event]] = []
    after_a_pause = 0
    for q_starts in run.executions.starts_by_queue.values():
        top: Event | None = None
        for e in q_starts:
            if top is not None and any(top["t"] < t <= e["t"] for t in counter_losses):
                top = None
            if top is None or e["fence"] >= top["fence"]:
                top = e
            elif run.paused(e["pid"], e["t"]):
                after_a_pause += 1
            else:
                stale_starts.append((top, e))
    finding = Finding(figures={"stale_starts": len(stale_starts), "stale_starts_after_a_pause": after_a_pause})
    if stale_starts:
        top, e = stale_starts[0]
        finding.breaches.append(
            f"{len(stale_starts)} task starts under a fencing token lower than one already started on their "
            f"queue (a task started on a lapsed lease, or the token went backwards), e.g. {e['queue']} #{e['seq']} "
            f"on {e['replica']} at {e['t']:.3f} (fence {e['fence']}) after #{top['seq']} on {top['replica']} "
            f"at {top['t']:.3f} (fence {top['fence']})"
        )
    return finding


def check_timed_out_stops(run: RunFacts) -> Finding:
    """After a worker's stop timed out in a live process (the ``async-stop`` drill, and the stop
    of a ``stop-kill``), no other replica starts on the queue while the task it left running
    runs; and such a stop never says it was clean while that task still ran."""
    drills = [(f, f) for f in run.faults if f["kind"] == "async-stop"]
    drills += [(f, f["stopped"]) for f in run.faults if f["kind"] == "stop-kill"]
    finding = Finding(figures={"async_stop_drills": sum(f["kind"] == "async-stop" for f, _ in drills)})
    for f, stop in drills:
        replica = stop.get("replica", stop.get("target"))
        for a in run.executions.open_at(stop["pid"], stop["t"]):
            end = run.executions.end_of(a) or stop["t_exit"]
            until = min(end, stop["t_exit"])
            if stop.get("clean") and end > stop["t_stopped"]:
                finding.breaches.append(
                    f"{a['queue']}: the stop of {replica} with a {STOP_DRILL_TIMEOUT}s timeout said it was clean, "
                    f"yet #{a['seq']} ran on for {end - stop['t_stopped']:.2f}s"
                )
            starts = run.executions.starts_by_queue[a["queue"]]
            b = next((e for e in starts if stop["t"] < e["t"] < until and e["pid"] != a["pid"]), {})
            if b and not _lease_lost_to_another_fault(run, f, a, b):
                finding.breaches.append(
                    f"{a['queue']}: #{b['seq']} started on {b['replica']} (fence {b['fence']}) {until - b['t']:.2f}s "
                    f"before #{a['seq']} ended on {replica}, whose worker was stopped with a "
                    f"{STOP_DRILL_TIMEOUT}s timeout while that task ran in a thread of the live process "
                    f"(fence {a['fence']}): the lease was given up under a running task"
                )
    return finding


#: Faults after which a replica's lease may lapse under a running task: an overlap they explain
#: is judged by the overlap checks, not blamed on a stop that timed out meanwhile.
LEASE_LOSING = frozenset(
    {"blackhole", "cut", "stop", "delay", "slow-reply", "kill", "redis-restart", "redis-crash", "clock", "stop-kill"}
)


def _lease_lost_to_another_fault(run: RunFacts, drill: Event, a: Event, b: Event) -> bool:
    return any(
        g is not drill
        and g["kind"] in LEASE_LOSING
        and g.get("pid") in (None, a["pid"])
        and g["t"] <= b["t"]
        and g.get("t_end", g["t"]) >= a["t"] - run.lease_ttl
        for g in run.faults
    )


def _faulted(run: RunFacts, pid: int, since: float, until: float) -> bool:
    """Whether a fault that can cost process ``pid`` a lease (one on that process, or on Redis)
    was under way between ``since`` and ``until``. A stop, even one that timed out, is none."""
    return any(
        g["kind"] in EXPLAINING_FAULTS
        and g["kind"] != "async-stop"
        and (g.get("pid") == pid or g["target"] == "redis")
        and run.window(g)[0] <= until
        and run.window(g)[1] >= since
        for g in run.causes
    )
