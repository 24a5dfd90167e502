"""Journaled scenario tasks and the check of their journal, shared by the demo, the scenario
runner's replicas (which add the stop drill, in the separate harness distribution) and the
multi-process tests: every execution appends a line to a journal file, and ``check`` proves from
it that nothing was lost, order held, and executions of one queue never overlapped unless a
lapsed (lower-fenced) lease explains it.

Run as a worker module: ``python -m pyfiq worker pyfiq.ops.scenario_tasks``.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.ticks import TICK_HEADER, CatchUp
from ..functions import FifoFunction, fifo
from ..task import current_task

JOURNAL_ENV = "PYFIQ_JOURNAL"
ECHO_ENV = "PYFIQ_ECHO"
QUEUES = ("scenario-a", "scenario-b", "scenario-c", "scenario-d")


def _journal(event: str, seq: int, extra: Mapping[str, Any] | None = None) -> None:
    path = os.environ.get(JOURNAL_ENV)
    if not path and not os.environ.get(ECHO_ENV):
        return
    ctx = current_task()
    line = {
        "event": event,
        "queue": ctx.stream,
        "seq": seq,
        "task_id": ctx.id,
        "replica": ctx.replica,
        "pid": os.getpid(),
        "fence": ctx.fencing_token,
        "deliveries": ctx.deliveries,
        "attempt": ctx.attempt,
        # Redis's clock when the task was enqueued (stamped by the enqueue script): a checker
        # places it among delayed tasks by it, to the ms.
        "enqueued_ms": ctx.enqueued_ms,
        "t": time.time(),
        **(extra or {}),
    }
    if path:
        # One write() of one short line with O_APPEND: concurrent writers never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)
    if os.environ.get(ECHO_ENV) and event != "end":
        print(
            f"  {ctx.replica:<10} {ctx.stream:<12} #{seq:02d} {event:<6} "
            f"delivery {ctx.deliveries} attempt {ctx.attempt} fence ...{str(ctx.fencing_token)[-5:]}",
            flush=True,
        )


def step(
    seq: int,
    hold: float = 0.0,
    fail_attempts: int = 0,
    exit_deliveries: int = 0,
    gil: float = 0.0,
    until: str = "",
    fail_unless: str = "",
) -> int:
    """One journaled unit of ordered work.

    ``hold``: seconds of simulated I/O. ``fail_attempts``: raise on this many first attempts
    (``-1``: always). ``exit_deliveries``: kill the whole process (``os._exit``) on this many
    first deliveries (``-1``: always, a poison task). ``gil``: seconds of one C call that never
    lets go of the GIL (no other thread of the process runs meanwhile, heartbeats included).
    ``until``: a path; the hold then ends early once that file exists (a fault drill decides
    when the replica running the task comes free). ``fail_unless``: a path; every attempt
    fails while that file does not exist (a drill fills the dead letters, then lets the tasks
    it requeues succeed).
    """
    ctx = current_task()
    _journal("start", seq)
    if exit_deliveries == -1 or ctx.deliveries <= exit_deliveries:
        os._exit(17)
    if gil:
        hold_gil(gil)
    if until:
        deadline = time.monotonic() + hold
        while not os.path.exists(until) and time.monotonic() < deadline:
            time.sleep(0.01)
    elif hold:
        time.sleep(hold)
    if fail_attempts == -1 or ctx.attempt <= fail_attempts or (fail_unless and not os.path.exists(fail_unless)):
        _journal("fail", seq)
        raise RuntimeError(f"simulated failure of #{seq} on attempt {ctx.attempt}")
    _journal("end", seq)
    return seq


#: Items per second ``sum(range(n))`` gets through in this process, measured on first use.
_gil_rate: float | None = None


def hold_gil(seconds: float) -> None:
    """Busy the CPU for about ``seconds`` inside one C call that holds the GIL throughout.

    ``sum`` over a ``range`` runs entirely in C and never returns to the interpreter loop, the
    only place CPython hands the GIL to another thread (unlike ``hashlib``, which releases it on
    large buffers). The rate is measured once per process, the best of a few short trials, so
    a busy moment during the measurement does not shorten the hold.
    """
    global _gil_rate
    if _gil_rate is None:
        best = 0.0
        for _ in range(5):
            n = 1_000_000
            started = time.perf_counter()
            sum(range(n))
            best = max(best, n / max(time.perf_counter() - started, 1e-9))
        _gil_rate = best
    sum(range(int(seconds * _gil_rate)))


STEPS: dict[str, FifoFunction[..., int]] = {}
#: The same step without retries: its first failure dead-letters it (the requeue drill's tasks).
FRAGILE: dict[str, FifoFunction[..., int]] = {}

#: Comma-separated scenario queues beyond ``QUEUES`` that a replica process registers at import
#: (the scenario runner sets it for more than four queues).
EXTRA_QUEUES_ENV = "PYFIQ_SCENARIO_QUEUES"


def queue_names(count: int) -> list[str]:
    """The first ``count`` scenario queues: ``QUEUES``, then ``scenario-e``, ``scenario-f``..."""
    names = list(QUEUES[:count])
    i = len(QUEUES)
    while len(names) < count:
        names.append(f"scenario-{chr(ord('a') + i)}" if i < 26 else f"scenario-{i}")
        i += 1
    return names


def step_name(queue: str, *, fragile: bool = False) -> str:
    """The registered name of a scenario queue's step (``fragile``: the one without retries)."""
    return f"pyfiq.scenario.{'fragile' if fragile else 'step'}.{queue}"


def step_for(queue: str) -> FifoFunction[..., int]:
    """The journaled step of a scenario queue, registered in this process on first use (with
    its fragile twin, so that every replica can run both)."""
    if queue not in STEPS:
        STEPS[queue] = fifo(queue=queue, name=step_name(queue), max_retries=2, retry_wait=0.05)(step)
        FRAGILE[queue] = fifo(queue=queue, name=step_name(queue, fragile=True), max_retries=0)(step)
    return STEPS[queue]


for _queue in (*QUEUES, *filter(None, os.environ.get(EXTRA_QUEUES_ENV, "").split(","))):
    step_for(_queue.strip())

#: Set (to the seconds between ticks) by the scenario runner: a replica process then also runs
#: the periodic schedule ``TICK_SCHEDULE`` on ``TICK_QUEUE``, if it consumes that queue.
TICKS_ENV = "PYFIQ_SCENARIO_TICKS"
TICK_QUEUE = "scenario-ticks"
TICK_SCHEDULE = "scenario-ticks"
#: Ticks that passed while no replica could fire them (Redis down, a back-off after a failed
#: call) are each still owed: a checker then expects every tick, with no outage to excuse one.
TICK_CATCH_UP: CatchUp = "all"


def tick(hold: float = 0.0) -> None:
    """One tick of the scenario's periodic schedule, journaled like a step, with its tick (Redis
    ms, the ``pyfiq-tick`` header) as both ``seq`` and ``tick``: a checker holds each tick to
    one task id, and each task id to its tick."""
    tick_ms = int(current_task().headers[TICK_HEADER])
    every_ms = round(float(os.environ.get(TICKS_ENV) or 0) * 1000)
    _journal("start", tick_ms, {"tick": tick_ms, "every_ms": every_ms})
    if hold:
        time.sleep(hold)
    _journal("end", tick_ms, {"tick": tick_ms, "every_ms": every_ms})


if os.environ.get(TICKS_ENV):
    fifo.periodic(
        TICK_QUEUE,
        every=float(os.environ[TICKS_ENV]),
        schedule=TICK_SCHEDULE,
        catch_up=TICK_CATCH_UP,
        kwargs={"hold": 0.02},
        name="pyfiq.scenario.tick",
    )(tick)


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@dataclass
class Report:
    lost: dict[str, list[int]] = field(default_factory=dict)
    order_violations: dict[str, list[int]] = field(default_factory=dict)
    overlaps_unexplained: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    overlaps_explained: int = 0
    reexecutions: int = 0
    executions: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.order_violations or self.overlaps_unexplained)

    def lines(self) -> list[str]:
        return [
            f"executions: {self.executions} (re-executions after a crash or lease loss: {self.reexecutions})",
            f"lost tasks: {sum(len(v) for v in self.lost.values())}",
            f"queues whose first executions broke acceptance order: {len(self.order_violations)}",
            f"overlapping executions of one queue: {len(self.overlaps_unexplained)} unexplained, "
            f"{self.overlaps_explained} explained by a lapsed lease with a lower fencing token",
        ]


def check(
    journal: Iterable[Mapping[str, Any]],
    accepted: Mapping[str, list[int]],
    dead: Mapping[str, Iterable[int]] | None = None,
) -> Report:
    """Check a journal against the sequence numbers accepted per stream, in acceptance order.

    ``dead``: sequence numbers that ended in the dead-letter list (they need not succeed).
    """
    report = Report()
    starts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    ended: dict[str, set[int]] = defaultdict(set)
    for e in journal:
        if e["event"] == "start":
            starts[e["queue"]].append(dict(e))
        elif e["event"] == "end":
            ended[e["queue"]].add(e["seq"])
    for stream, seqs in accepted.items():
        gone = set(dead.get(stream, ())) if dead else set()
        missing = [s for s in seqs if s not in ended[stream] and s not in gone]
        if missing:
            report.lost[stream] = missing
        first: list[int] = []
        seen: set[int] = set()
        for e in sorted(starts[stream], key=lambda e: e["t"]):
            report.executions += 1
            if e["seq"] in seen:
                if e["attempt"] == 1:  # a retry in place is not a re-execution
                    report.reexecutions += 1
            else:
                seen.add(e["seq"])
                first.append(e["seq"])
        expected = [s for s in seqs if s in seen]
        if first != expected:
            report.order_violations[stream] = first
    report.overlaps_unexplained, report.overlaps_explained = _overlaps(journal)
    return report


def _overlaps(
    journal: Iterable[Mapping[str, Any]],
) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], int]:
    # An execution runs from its start to its end/fail line, or (killed) to the next start in
    # the same process, or forever; intervals of one stream must not overlap.
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    open_: dict[tuple[int, str], dict[str, Any]] = {}
    for e in sorted(journal, key=lambda e: e["t"]):
        key = (e["pid"], e["task_id"])
        if e["event"] == "start":
            run = {**e, "until": float("inf")}
            runs[e["queue"]].append(run)
            open_[key] = run
        elif key in open_:
            open_.pop(key)["until"] = e["t"]
    unexplained: list[tuple[dict[str, Any], dict[str, Any]]] = []
    explained = 0
    for stream_runs in runs.values():
        stream_runs.sort(key=lambda r: r["t"])
        for i, a in enumerate(stream_runs):
            for b in stream_runs[i + 1 :]:
                if b["t"] >= a["until"]:
                    break
                if a["pid"] != b["pid"] and a["until"] == float("inf"):
                    continue  # a's process died mid-task: nothing of it ran on
                if a["fence"] < b["fence"]:
                    explained += 1
                else:
                    unexplained.append((a, b))
    return unexplained, explained
