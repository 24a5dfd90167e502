"""The verdict: every checker over one run's facts, and the report they make."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .checkers import (
    census,
    check_fencing_order,
    check_first_execution_order,
    check_handoffs,
    check_lost_tasks,
    check_overlaps,
    check_redis_restarts,
    check_reexecutions,
    check_takeovers,
    check_timed_out_stops,
)
from .drill_checks import (
    check_drained,
    check_gil_tasks,
    check_pauses,
    check_replica_exits,
    check_requeues,
    check_skips,
    check_stop_kills,
    check_vandal_entries,
)
from .facts import Finding, RunFacts, Verdict
from .journal import Event
from .schedule_checks import check_delayed_tasks, check_ticks

CHECKERS: tuple[Callable[[RunFacts], Finding], ...] = (
    census,
    check_lost_tasks,
    check_first_execution_order,
    check_reexecutions,
    check_overlaps,
    check_takeovers,
    check_handoffs,
    check_redis_restarts,
    check_fencing_order,
    check_timed_out_stops,
    check_delayed_tasks,
    check_ticks,
    check_skips,
    check_pauses,
    check_requeues,
    check_stop_kills,
    check_vandal_entries,
    check_gil_tasks,
    check_replica_exits,
    check_drained,
)

#: The order of the figures in the verdict's stats (and ``verdict.json``), kept stable across
#: runs so that two verdicts compare line by line; a figure not listed here comes last.
STATS_ORDER = (
    "accepted", "accepted_place_unknown", "failed_enqueues", "producers", "producer_interleavings", "queues",
    "executions", "first_executions", "reexecutions", "reexecutions_by_cause", "reexecutions_unexplained",
    "retries_in_place", "lost", "lost_to_redis_durability", "dead_lettered", "order_violations",
    "overlaps_unexplained", "overlaps_explained_by_fencing", "faults", "faults_mid_task", "interrupted",
    "interrupted_rerun_first", "interrupted_rerun_delivery_raised", "takeover_max", "takeover_median",
    "takeover_by_kind", "takeover_bound", "handoff_max", "handoff_median", "redis_resume_max", "redis_losses",
    "lease_ttl", "stale_starts", "stale_starts_after_a_pause", "async_stop_drills", "stop_kills",
    "stop_kills_on_a_stopped_pollers_shard", "skips", "skip_move_on_max", "skip_overlaps", "pauses",
    "pause_wait_max", "pause_holders_confirmed", "pause_holders_unconfirmed", "starts_while_paused",
    "starts_while_paused_after_a_freeze", "requeues", "requeued_tasks", "requeues_paged",
    "requeue_pending_ran_before_max", "requeue_pending_ran_after", "vandal_entries", "vandal_entries_lost",
    "vandal_entries_misfiled", "vandal_stall_max", "gil_tasks_dead_lettered_as", "delayed", "delayed_started",
    "delayed_place_unknown", "delayed_due_unknown", "delayed_early_starts", "delayed_wait_max", "delayed_wait_median",
    "ticks", "tick_tasks", "ticks_fired_by_redis", "ticks_skipped_by_redis", "ticks_twice",
    "ticks_twice_lost_to_redis_durability", "ticks_missing", "ticks_left_at_end", "tick_early_starts", "tick_lag_max",
    "tick_lag_median", "throughput_tasks_per_s", "span_s", "replica_log_counts",
)  # fmt: skip


def verify(
    run_dir: Path,
    *,
    lease_ttl: float,
    poll_interval: float,
    dead: dict[str, list[int]] | None = None,
    remaining: dict[str, int] | None = None,
    unexpected_exits: Sequence[Event] = (),
    log_counts: dict[str, int] | None = None,
    dead_letters: Sequence[Event] | None = None,
) -> Verdict:
    """Check one run's journals with every checker. ``dead``: sequence numbers found
    dead-lettered per queue; ``remaining``: tasks still pending or in flight per queue when
    the run ended; ``dead_letters``: every dead-letter record of the run's queues (``queue``,
    ``reason``, ``seq`` or None, ``raw`` in hex), which the vandal and GIL checks need."""
    run = RunFacts.read(
        run_dir,
        lease_ttl=lease_ttl,
        poll_interval=poll_interval,
        dead=dead,
        remaining=remaining,
        unexpected_exits=unexpected_exits,
        log_counts=log_counts,
        dead_letters=dead_letters,
    )
    findings = [checker(run) for checker in CHECKERS]
    figures = {key: value for finding in findings for key, value in finding.figures.items()}
    stats = {key: figures.pop(key) for key in STATS_ORDER if key in figures} | figures
    breaches = [breach for finding in findings for breach in finding.breaches]
    return Verdict(ok=not breaches, breaches=breaches, lines=_summary(run, stats), stats=stats)


def _summary(run: RunFacts, stats: dict[str, Any]) -> list[str]:
    """The verdict's report, line by line, from the checkers' figures."""
    s = stats
    lines = [
        f"producers: {s['producers']} processes, {s['accepted']} tasks accepted on {s['queues']} queues "
        f"({s['producer_interleavings']} producer switches in the acceptance order; {s['accepted_place_unknown']} "
        f"accepted on a retry, place unknown; {s['failed_enqueues']} enqueues given up)",
        "faults: "
        + (", ".join(f"{k}={v}" for k, v in sorted(s["faults"].items())) or "none")
        + f" ({s['faults_mid_task']} replica faults hit a task mid-run; {s['interrupted']} running tasks were "
        f"interrupted; {s['interrupted_rerun_first']} of them ran again first, "
        f"{s['interrupted_rerun_delivery_raised']} with a raised delivery count)",
        *run.report.lines(),
        f"lost tasks (every accepted task): {s['lost']}; lost to Redis AOF everysec in a crash: "
        f"{s['lost_to_redis_durability']}; dead-lettered: {s['dead_lettered']}",
        f"re-executions: {s['reexecutions']} ({s['reexecutions_by_cause']}), "
        f"unexplained: {s['reexecutions_unexplained']}",
        f"overlaps: {s['overlaps_unexplained']} unexplained, {s['overlaps_explained_by_fencing']} explained "
        f"by a lapsed lease with a lower fencing token ({run.overlaps.stale_late} of them a stale holder starting "
        "late)",
        f"takeover after kill/stop/cut/blackhole: max {s['takeover_max']}s, median {s['takeover_median']}s "
        f"(lease TTL {run.lease_ttl}s, bound {run.takeover_bound:.2f}s) {s['takeover_by_kind']}",
        f"graceful hand-off: max {s['handoff_max']}s, median {s['handoff_median']}s; "
        f"first task after a Redis restart: max {s['redis_resume_max']}s",
        _redis_restarts_line(s["redis_losses"]),
        f"fencing tokens: {s['stale_starts']} starts under a lower token than one already started on their "
        f"queue ({s['stale_starts_after_a_pause']} more right after a process freeze)",
        f"asyncio stop drills: {s['async_stop_drills']}; stops timed out then a SIGKILL elsewhere: {s['stop_kills']} "
        f"({s['stop_kills_on_a_stopped_pollers_shard']} on a shard the stopped replica polled); GIL-holding tasks "
        "dead-lettered as: "
        + (json.dumps(s["gil_tasks_dead_lettered_as"]) if s["gil_tasks_dead_lettered_as"] else "none"),
        f"operator: {s['skips']} skips of a running head (next task after max {s['skip_move_on_max']}s, "
        f"{s['skip_overlaps']} overlaps after them); {s['pauses']} pauses (returned after max {s['pause_wait_max']}s, "
        f"{s['pause_holders_confirmed']} holders confirmed, {s['pause_holders_unconfirmed']} unconfirmed; "
        f"{s['starts_while_paused']} starts while paused, {s['starts_while_paused_after_a_freeze']} more right after "
        f"a freeze); {s['requeues']} requeues to the front ({s['requeued_tasks']} tasks, {s['requeues_paged']} paged; "
        f"of the tasks pending then, at most {s['requeue_pending_ran_before_max']} ran before them, "
        f"{s['requeue_pending_ran_after']} after)",
        f"vandal entries: {s['vandal_entries']} written, "
        + (
            f"{s['vandal_entries_lost']} lost, {s['vandal_entries_misfiled']} dead-lettered under another reason"
            if run.dead_letters is not None
            else "dead letters not read"
        )
        + f"; slowest queue past them: {s['vandal_stall_max']}s",
        f"delayed tasks: {s['delayed']} accepted, {s['delayed_started']} started, {s['delayed_early_starts']} runs "
        f"before their due time; started after it by max {s['delayed_wait_max']}s, median "
        f"{s['delayed_wait_median']}s ({s['delayed_place_unknown']} placed in no order: a Redis clock set back; "
        f"{s['delayed_due_unknown']} with their due time unread: a retried enqueue)",
        _ticks_line(s),
        f"throughput: {s['throughput_tasks_per_s']} tasks/s over {s['span_s']}s ({s['executions']} executions)",
    ]
    if run.log_counts:
        lines.append("replica logs: " + ", ".join(f"{k}={v}" for k, v in sorted(run.log_counts.items())))
    return lines


def _ticks_line(s: dict[str, Any]) -> str:
    if not s["ticks"]:
        return "periodic schedule: none ran"
    return (
        f"periodic schedule: {s['ticks']} ticks ran ({s['tick_tasks']} tasks; Redis counted "
        f"{s['ticks_fired_by_redis']} fired, {s['ticks_skipped_by_redis']} skipped), {s['ticks_twice']} enqueued twice "
        f"(+{s['ticks_twice_lost_to_redis_durability']} after a crash lost the first), {s['ticks_missing']} missing, "
        f"{s['ticks_left_at_end']} left at the end, {s['tick_early_starts']} runs before their tick; first run after "
        f"the tick by max {s['tick_lag_max']}s, median {s['tick_lag_median']}s"
    )


def _redis_restarts_line(losses: list[Event]) -> str:
    """Per kind of restart and appendfsync policy: how many, and the tasks and acknowledged
    writes they lost."""
    summary: dict[tuple[str, str], tuple[int, int, int]] = {}
    for r in losses:
        n, lost, writes = summary.get((r["kind"], r["appendfsync"]), (0, 0, 0))
        summary[(r["kind"], r["appendfsync"])] = (n + 1, lost + r["lost_tasks"], writes + r["acknowledged_writes_lost"])
    return "Redis restarts: " + (
        "; ".join(
            f"{n}x {kind} (appendfsync={mode}): {lost_n} tasks and {writes} acknowledged writes lost"
            for (kind, mode), (n, lost_n, writes) in sorted(summary.items())
        )
        or "none"
    )
