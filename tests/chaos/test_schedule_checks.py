"""The scenario checker's rules for delayed and periodic tasks (``pyfiq_harness.schedule_checks``
and the join order of ``pyfiq_harness.facts``), fed synthetic journals: a clean one passes, and
each breach is reported.

Times: a machine time of 1000.0 s is Redis ms 1_000_000 while Redis's clock is true; the
``clock`` fault below sets it 3 s back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pyfiq_harness.journal import EXECUTIONS, FAULTS, TICKS
from pyfiq_harness.verdict import verify

Q = "scenario-a"
TICK_QUEUE = "scenario-ticks"


def _write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _accepted(
    seq: int, at_ms: int, counter: int, *, delay_ms: int = 0, true_s: float | None = None, **delayed: Any
) -> dict[str, Any]:
    """An acceptance at Redis ms ``at_ms`` (the TIME readings of its transaction 0.1 and 0.3 ms
    in); the producer sent it and had it back around ``true_s`` (default: ``at_ms`` on a true
    clock). ``delay_ms``: a delayed task, due ``at_ms + delay_ms`` unless ``due`` is given."""
    true_s = at_ms / 1000 if true_s is None else true_s
    line = {"queue": Q, "seq": seq, "task_id": f"t{seq}", "status": "accepted"}
    line |= {"order": [at_ms * 1000 + 300, counter], "order_from": at_ms * 1000 + 100}
    line |= {"sent": true_s - 0.001, "t": true_s + 0.001, "attempts": 1, "producer": "p1"}
    if delay_ms:
        line |= {"delay_ms": delay_ms, "scheduled": "scheduled", "due": at_ms + delay_ms} | delayed
    return line


def _ran(
    seq: int, start: float, enqueued_ms: int, *, queue: str = Q, task_id: str | None = None, **extra: Any
) -> list[dict[str, Any]]:
    """One run on replica-1 from ``start``, 10 ms long; ``enqueued_ms``: the entry's stamp."""
    base = {"queue": queue, "seq": seq, "task_id": task_id or f"t{seq}", "replica": "replica-1", "pid": 10}
    base |= {"fence": 5, "deliveries": 1, "attempt": 1, "enqueued_ms": enqueued_ms, **extra}
    return [{**base, "event": "start", "t": start}, {**base, "event": "end", "t": start + 0.01}]


def _run_dir(
    tmp_path: Path,
    name: str,
    accepted: list[dict[str, Any]],
    executions: list[dict[str, Any]],
    faults: list[dict[str, Any]] | None = None,
    ticks: dict[str, Any] | None = None,
) -> Path:
    run = tmp_path / name
    run.mkdir()
    _write(run / "accepted-p1.jsonl", accepted)
    _write(run / EXECUTIONS, executions)
    if faults:
        _write(run / FAULTS, faults)
    if ticks is not None:
        (run / TICKS).write_text(json.dumps(ticks))
    return run


def _verify(run: Path) -> Any:
    return verify(run, lease_ttl=1.0, poll_interval=0.2)


# -- delayed tasks -----------------------------------------------------------------------------

# #0 at once at 1_000_000; #1 delayed 500 ms at 1_000_010 (due 1_000_510); #2 at once at
# 1_000_200, while #1 waits; #3 at once at 1_000_600, after #1 was due. #1 joins behind #2 and
# ahead of #3, whatever the order they were accepted in.
DELAYED = [
    _accepted(0, 1_000_000, 1),
    _accepted(1, 1_000_010, 2, delay_ms=500),
    _accepted(2, 1_000_200, 3),
    _accepted(3, 1_000_600, 4),
]


def _delayed_runs(order: list[int], starts: list[float]) -> list[dict[str, Any]]:
    stamps = {0: 1_000_000, 1: 1_000_010, 2: 1_000_200, 3: 1_000_600}
    return [line for seq, t in zip(order, starts, strict=True) for line in _ran(seq, t, stamps[seq])]


def test_delayed_tasks_in_join_order_pass(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "clean", DELAYED, _delayed_runs([0, 2, 1, 3], [1000.02, 1000.3, 1000.52, 1000.62]))
    verdict = _verify(run)
    assert verdict.ok, verdict.text()
    assert verdict.stats["delayed"] == verdict.stats["delayed_started"] == 1
    assert verdict.stats["delayed_wait_max"] == pytest.approx(0.01, abs=1e-3)
    assert verdict.stats["order_violations"] == 0


def test_a_delayed_task_whose_due_time_was_not_read_still_counts_as_started(tmp_path: Path) -> None:
    """A retried enqueue's due time is unread (its first reply was lost): its start cannot be
    judged against it, but it did start, and a check that every delayed task started says so."""
    unread = [dict(line) for line in DELAYED]
    del unread[1]["due"]
    run = _run_dir(tmp_path, "unread", unread, _delayed_runs([0, 2, 1, 3], [1000.02, 1000.3, 1000.52, 1000.62]))
    stats = _verify(run).stats
    assert stats["delayed_due_unknown"] == 1
    assert stats["delayed"] == stats["delayed_started"] == 1


@pytest.mark.parametrize(
    ("case", "breach"),
    [
        # #1 was due (1_000_510) before #3 was enqueued (1_000_600): it joined ahead of it.
        ("after-a-later-task", "broke acceptance order"),
        # Acceptance order, as if a delayed task joined at its enqueue.
        ("at-its-enqueue", "before Redis's clock reached their due time"),
        # Half a ms before its due time: exactly what the check is for.
        ("half-a-ms-early", "before Redis's clock reached their due time"),
        ("misdated", "due at another time than their enqueue's plus their delay"),
        ("not-scheduled", "not held as scheduled right after their enqueue"),
    ],
)
def test_delayed_task_breaches(tmp_path: Path, case: str, breach: str) -> None:
    accepted = [dict(e) for e in DELAYED]
    order, starts = [0, 2, 1, 3], [1000.02, 1000.3, 1000.52, 1000.62]
    if case == "after-a-later-task":
        order, starts = [0, 2, 3, 1], [1000.02, 1000.3, 1000.62, 1000.64]
    elif case == "at-its-enqueue":
        order, starts = [0, 1, 2, 3], [1000.02, 1000.03, 1000.3, 1000.62]
    elif case == "half-a-ms-early":
        starts = [1000.02, 1000.3, 1000.5095, 1000.62]
    elif case == "misdated":
        accepted[1]["due"] = 1_000_600  # the enqueue's 1_000_010 + 500 ms is 1_000_510
    elif case == "not-scheduled":
        accepted[1] |= {"scheduled": "pending", "due": None}
    verdict = _verify(_run_dir(tmp_path, case, accepted, _delayed_runs(order, starts)))
    assert not verdict.ok
    assert any(breach in b for b in verdict.breaches), verdict.breaches


def test_a_delayed_task_tied_with_an_enqueue_joins_first(tmp_path: Path) -> None:
    """Due in the very ms of a later enqueue's stamp: the enqueue moves it first (promote)."""
    accepted = [_accepted(0, 1_000_000, 1, delay_ms=300), _accepted(1, 1_000_300, 2)]
    ahead = _ran(0, 1000.31, 1_000_000) + _ran(1, 1000.33, 1_000_300)
    assert _verify(_run_dir(tmp_path, "ahead", accepted, ahead)).ok
    behind = _ran(1, 1000.31, 1_000_300) + _ran(0, 1000.33, 1_000_000)
    verdict = _verify(_run_dir(tmp_path, "behind", accepted, behind))
    assert any("broke acceptance order" in b for b in verdict.breaches), verdict.breaches


CLOCK_BACK = {"kind": "clock", "target": "redis", "appendfsync": "everysec", "t": 999.0, "t_down": 999.1}
CLOCK_BACK |= {"t_end": 999.4, "shift_ms": -3000, "previous_shift_ms": 0}


@pytest.mark.parametrize(("start", "ok"), [(1000.31, True), (999.9, False)])
def test_an_early_start_is_judged_on_redis_clock_when_a_fault_shifted_it(
    tmp_path: Path, start: float, ok: bool
) -> None:
    """Redis's clock 3 s behind: a task enqueued at 999.8 (Redis ms 996_800) for 500 ms is due at
    Redis ms 997_300, reached at 1000.3 on this machine. A start at 999.9 is 0.4 s early, though
    later than 997.3 read as this machine's time."""
    accepted = [_accepted(0, 996_800, 1, delay_ms=500, true_s=999.8)]
    verdict = _verify(_run_dir(tmp_path, str(start), accepted, _ran(0, start, 996_800), [CLOCK_BACK]))
    assert verdict.ok is ok, verdict.text()
    assert verdict.stats["delayed_early_starts"] == (0 if ok else 1)


def test_a_delayed_task_due_before_a_clock_set_back_is_placed_in_no_order(tmp_path: Path) -> None:
    """#0 was due at 999.5 under the true clock; Redis restarted at 999.6 with its clock 3 s back,
    and #1 was enqueued at 1000.0 (Redis ms 997_000). Whether #0 had joined before the restart no
    journal says: #1 may run first. #0 started after the restart, when Redis's clock read
    997_050 < its due time, which is no early start either: its due time had been reached."""
    back = CLOCK_BACK | {"t": 999.6, "t_down": 999.7, "t_end": 999.9}
    accepted = [_accepted(0, 999_000, 1, delay_ms=500), _accepted(1, 997_000, 2, true_s=1000.0)]
    runs = _ran(1, 1000.02, 997_000) + _ran(0, 1000.05, 999_000)
    verdict = _verify(_run_dir(tmp_path, "back", accepted, runs, [back]))
    assert verdict.ok, verdict.text()
    assert verdict.stats["delayed_place_unknown"] == 1
    assert verdict.stats["delayed_early_starts"] == 0

    # Without the set back, the same runs break the order: #0 was due before #1 came.
    accepted = [_accepted(0, 999_000, 1, delay_ms=500), _accepted(1, 1_000_000, 2)]
    runs = _ran(1, 1000.02, 1_000_000) + _ran(0, 1000.05, 999_000)
    verdict = _verify(_run_dir(tmp_path, "true", accepted, runs))
    assert any("broke acceptance order" in b for b in verdict.breaches), verdict.breaches


# -- the periodic schedule ---------------------------------------------------------------------


def _tick_runs(ticks: list[int], *, lag: float = 0.01, ids: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """Each tick's task run ``lag`` seconds after its tick, in the order given."""
    ids = ids or {}
    return [
        line
        for tick in ticks
        for line in _ran(
            tick, tick / 1000 + lag, tick, queue=TICK_QUEUE, task_id=ids.get(tick, f"tick-{tick}"), tick=tick
        )
    ]


TICK_RANGE = list(range(1_001_000, 1_006_000, 1000))


def _tick_facts(**changes: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {"every_ms": 1000, "window": [1000.5, 1005.5], "left": [], "dead": []}
    facts["record"] = {"last": TICK_RANGE[-1], "fired": len(TICK_RANGE), "skipped": 0}
    return facts | changes


def _tick_run(tmp_path: Path, name: str, runs: list[dict[str, Any]], faults: Any = None, **facts: Any) -> Path:
    # One ordinary task too, so the run has an acceptance to judge.
    return _run_dir(
        tmp_path, name, [_accepted(0, 999_000, 1)], _ran(0, 999.01, 999_000) + runs, faults, _tick_facts(**facts)
    )


def test_ticks_each_once_and_all_run_pass(tmp_path: Path) -> None:
    verdict = _verify(_tick_run(tmp_path, "clean", _tick_runs(TICK_RANGE)))
    assert verdict.ok, verdict.text()
    stats = verdict.stats
    assert stats["ticks"] == stats["tick_tasks"] == stats["ticks_fired_by_redis"] == 5
    assert stats["ticks_missing"] == stats["ticks_twice"] == stats["tick_early_starts"] == 0
    assert stats["first_executions"] == 1, "tick tasks are not counted with the producers' tasks"


@pytest.mark.parametrize(
    ("case", "breach"),
    [
        ("twice", "tick 1003000 was enqueued twice"),
        ("missing", "never enqueued or never ran"),
        ("redis-count", "Redis counted 6 tick tasks enqueued, the journal and the stream hold 5"),
        ("early", "started before Redis's clock reached their tick"),
        ("fired-early", "enqueued before Redis's clock reached the tick"),
        ("out-of-order", "ticks ran out of order"),
        ("unaligned", "not aligned to the 1000 ms interval"),
        ("stopped-early", "stopped before the run's end"),
        ("started-late", "did not start with the fleet"),
        ("left-waiting", "still waiting in the stream at the end"),
    ],
)
def test_tick_breaches(tmp_path: Path, case: str, breach: str) -> None:
    ticks, runs, facts = list(TICK_RANGE), None, {}
    if case == "twice":  # a second task for tick 1_003_000, with no crash to lose the first
        runs = _tick_runs(ticks) + _tick_runs([1_003_000], lag=0.5, ids={1_003_000: "again"})
        facts = {"record": {"last": TICK_RANGE[-1], "fired": 6, "skipped": 0}}
    elif case == "missing":
        ticks.remove(1_003_000)
        facts = {"record": {"last": TICK_RANGE[-1], "fired": 4, "skipped": 0}}
    elif case == "redis-count":
        facts = {"record": {"last": TICK_RANGE[-1], "fired": 6, "skipped": 0}}
    elif case == "early":  # a ms before its tick
        runs = _tick_runs(ticks[:2]) + _tick_runs([ticks[2]], lag=-0.001) + _tick_runs(ticks[3:])
    elif case == "fired-early":  # stamped a ms before its tick (started on time)
        runs = _tick_runs(ticks)
        for line in runs:
            if line["tick"] == ticks[2]:
                line["enqueued_ms"] = ticks[2] - 1
    elif case == "out-of-order":
        ticks[1], ticks[2] = ticks[2], ticks[1]
        runs = _tick_runs(ticks[:1]) + _tick_runs(ticks[1:2], lag=1.02) + _tick_runs(ticks[2:3], lag=1.03)
        runs += _tick_runs(ticks[3:])
    elif case == "unaligned":
        runs = _tick_runs([*ticks, 1_003_500])
        facts = {"record": {"last": TICK_RANGE[-1], "fired": 6, "skipped": 0}}
    elif case == "stopped-early":
        facts = {"window": [1000.5, 1012.0]}
    elif case == "started-late":
        facts = {"window": [994.0, 1005.5]}
    elif case == "left-waiting":  # tick 1_000_000 enqueued and never run, 5.5 s before the drain
        facts = {"left": [{"task_id": "stuck", "tick": 1_000_000}], "record": {"last": TICK_RANGE[-1], "fired": 6}}
    verdict = _verify(_tick_run(tmp_path, case, runs if runs is not None else _tick_runs(ticks), **facts))
    assert not verdict.ok
    assert any(breach in b for b in verdict.breaches), verdict.breaches


def test_a_tick_enqueued_again_after_a_crash_lost_its_first_task_is_redis_durability(tmp_path: Path) -> None:
    """Tick 1_003_000 ran as one task, then Redis crashed under appendfsync=everysec and lost
    that enqueue, the schedule's move past the tick with it: the replicas fired it again."""
    crash = {"kind": "redis-crash", "target": "redis", "appendfsync": "everysec", "t": 1003.4, "t_down": 1003.5}
    crash |= {"t_end": 1003.8, "shift_ms": 0, "previous_shift_ms": 0}
    runs = _tick_runs(TICK_RANGE) + _tick_runs([1_003_000], lag=0.9, ids={1_003_000: "again"})
    verdict = _verify(_tick_run(tmp_path, "crash", runs, [crash]))
    assert verdict.ok, verdict.text()
    assert verdict.stats["ticks_twice_lost_to_redis_durability"] == 1

    # Under appendfsync=always nothing acknowledged is lost: the same is a breach.
    verdict = _verify(_tick_run(tmp_path, "always", runs, [crash | {"appendfsync": "always"}]))
    assert any("tick 1003000 was enqueued twice" in b for b in verdict.breaches), verdict.breaches


def test_delayed_tasks_due_at_once_after_a_clock_set_forward_join_by_due_time(tmp_path: Path) -> None:
    """Redis's clock 3 s behind from 999.1, true again from 1001.1: #0 (due Redis ms 998_900) and
    #1 (due 998_600), enqueued in that order meanwhile, were not due yet when Redis went down,
    and both were when it came back. They join by due time: #1 first."""
    forward = CLOCK_BACK | {"t": 1001.0, "t_down": 1001.1, "t_end": 1001.4, "shift_ms": 0, "previous_shift_ms": -3000}
    accepted = [
        _accepted(0, 997_000, 1, delay_ms=1900, true_s=1000.0),
        _accepted(1, 997_100, 2, delay_ms=1500, true_s=1000.1),
    ]
    by_due = _ran(1, 1001.5, 997_100) + _ran(0, 1001.52, 997_000)
    verdict = _verify(_run_dir(tmp_path, "by-due", accepted, by_due, [CLOCK_BACK, forward]))
    assert verdict.ok, verdict.text()
    by_enqueue = _ran(0, 1001.5, 997_000) + _ran(1, 1001.52, 997_100)
    verdict = _verify(_run_dir(tmp_path, "by-enqueue", accepted, by_enqueue, [CLOCK_BACK, forward]))
    assert any("broke acceptance order" in b for b in verdict.breaches), verdict.breaches
