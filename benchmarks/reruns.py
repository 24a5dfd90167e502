"""Tasks run again after a SIGKILL mid-drain, per acknowledgement mode."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Any

from pyfiq import RedisQueueBackend, Settings, ThreadedWorker
from pyfiq.config import AckMode
from pyfiq_harness.servers import poll_until

from .drain import queue_empty
from .harness import RedisServer, Run, end, log, new_prefix, spawn


def rerun_once(server: RedisServer, ack_mode: AckMode, tasks: int, workdir: Path) -> dict[str, Any]:
    """A replica process drains journaled tasks of one queue and is SIGKILLed mid-drain; an
    in-process worker drains the rest. Counts the tasks that started again (the one running at
    the kill, and those whose end had not been acknowledged yet)."""
    from pyfiq.ops.scenario_tasks import JOURNAL_ENV, STEPS, read_journal

    queue, prefix = "scenario-a", new_prefix()
    journal = workdir / f"reruns-{prefix}.jsonl"
    settings = Settings(prefix=prefix, shards=4, lease_ttl=1.0, poll_interval=0.2, ack_mode=ack_mode)
    backend = RedisQueueBackend(server.url, settings)
    STEPS[queue].enqueue_many([(i,) for i in range(tasks)], backend=backend)
    argv = [sys.executable, "-m", "pyfiq", "worker", "pyfiq.ops.scenario_tasks", "--redis", server.url]
    argv += ["--prefix", prefix, "--shards", "4", "--queues", queue, "--concurrency", "1", "--name", "holder"]
    argv += ["--lease-ttl", "1.0", "--poll-interval", "0.2", "--ack-mode", ack_mode, "--log-level", "error"]
    env = {**os.environ, JOURNAL_ENV: str(journal), "PYTHONUNBUFFERED": "1"}
    old_journal = os.environ.get(JOURNAL_ENV)
    other: ThreadedWorker | None = None
    with open(workdir / f"reruns-{prefix}.log", "wb") as out:
        holder = spawn(argv, stdout=out, stderr=out, env=env)
    try:

        def ended() -> int:
            return journal.read_bytes().count(b'"event": "end"') if journal.exists() else 0

        if not poll_until(lambda: ended() >= 200, 60, interval=0.002):
            raise RuntimeError("the holder replica did not run tasks")
        holder.kill()
        holder.wait(10)
        before_kill = ended()
        os.environ[JOURNAL_ENV] = str(journal)
        other = ThreadedWorker(backend, queues=[queue], concurrency=1, replica="other").start()
        if not poll_until(lambda: queue_empty(backend, queue), 60, interval=0.02):
            raise RuntimeError("the queue was not drained after the kill")
        starts: dict[int, int] = {}
        for e in read_journal(journal):
            if e["event"] == "start" and e["attempt"] == 1:
                starts[e["seq"]] = starts.get(e["seq"], 0) + 1
        if sorted(starts) != list(range(tasks)):
            raise RuntimeError("a task never ran")
        return {"reruns": sum(n - 1 for n in starts.values()), "ended_before_kill": before_kill}
    finally:
        if other is not None:
            other.stop(timeout=5)
        if old_journal is None:
            os.environ.pop(JOURNAL_ENV, None)
        else:
            os.environ[JOURNAL_ENV] = old_journal
        end(holder, kill=True)
        backend.close()
        server.flush()


def measure_reruns(server: RedisServer, reps: int, tasks: int, workdir: Path) -> dict[str, Any]:
    """Re-runs after a SIGKILL mid-drain, per acknowledgement mode, over ``reps`` kills."""
    out: dict[str, Any] = {}
    modes: tuple[AckMode, ...] = ("group", "inline")
    for mode in modes:
        samples = [rerun_once(server, mode, tasks, workdir) for _ in range(reps)]
        counts = [s["reruns"] for s in samples]
        out[mode] = {"samples": samples, "median": statistics.median(counts), "max": max(counts)}
    return out


def section(run: Run) -> None:
    """Re-runs after a SIGKILL mid-drain, per acknowledgement mode."""
    report, server, quick, workdir = run.report, run.server, run.quick, run.workdir
    log("re-runs after SIGKILL mid-drain")
    reps = 1 if quick else 7
    r = measure_reruns(server, reps, 2000 if quick else 5000, workdir)
    report.data["reruns"] = r
    for mode, label in (("group", "default (group)"), ("inline", "strict (inline, prefetch 1)")):
        report.row(
            "reruns",
            f"{label}: tasks run again after a SIGKILL mid-drain, median / max of {reps}",
            f"{r[mode]['median']:g} / {r[mode]['max']}",
            "journaled tasks, one worker",
        )
