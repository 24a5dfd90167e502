"""The enqueue drill (``python -m pyfiq_harness enqueue-drill``): producers sharing round trips
while a caller is cancelled or interrupted, the process forks, or durable mode's replica stalls,
each round in a process of its own against a real redis-server, every call's outcome held to what
Redis stored. Run against the code before "one caller, one outcome", it reported tasks stored
twice, ``duplicate=True`` for a caller's own task and a forked child that never returned; the
judge's own rules are tested on journals written by hand in ``test_enqueue_judge.py``."""

from __future__ import annotations

import os
from pathlib import Path

from pyfiq_harness.enqueue_drill import FAULTS, run_enqueue_drill


def test_every_producer_fault_keeps_one_caller_one_outcome(tmp_path: Path) -> None:
    seed = int(os.environ.get("PYFIQ_DRILL_SEED", "7"))
    verdicts = run_enqueue_drill(tmp_path, seed=seed)
    assert [v.fault for v in verdicts] == list(FAULTS)
    assert all(v.ok for v in verdicts), "\n".join(v.text() for v in verdicts)
    by_fault = {v.fault: v.outcomes for v in verdicts}
    # Each fault really happened: calls were cut short, and durable mode said what it could not
    # confirm; the forked children (three calls each) all answered.
    assert by_fault["cancel"]["cancelled"] > 0
    assert by_fault["interrupt"]["interrupted"] > 0
    assert by_fault["fork"]["handle"] == 4 * 60 + 6 * 3
    assert by_fault["replica-stall"]["not-replicated"] + by_fault["replica-stall"]["unknown"] > 0
