"""Take-over after a SIGKILL of the holder, and the hand-off after a graceful stop."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pyfiq import RedisQueueBackend, Settings, ThreadedWorker
from pyfiq_harness.servers import poll_until

from .harness import TALLY, RedisServer, Run, bench_fifo, end, log, ms, new_prefix, spawn, stamp


def measure_takeover_kill(server: RedisServer, reps: int, workdir: Path) -> dict[str, Any]:
    """A replica process holds a queue of 50 ms tasks and is SIGKILLed; an idle in-process
    worker measures how long until it starts the next task, with the default lease TTL and
    poll interval (what users run)."""
    from pyfiq.ops.scenario_tasks import JOURNAL_ENV, STEPS, read_journal

    ttl, poll, queue = Settings.lease_ttl, Settings.poll_interval, "scenario-a"
    samples: list[dict[str, float]] = []
    for rep in range(reps):
        prefix = new_prefix()
        journal = workdir / f"takeover-{prefix}.jsonl"
        settings = Settings(prefix=prefix, shards=4, lease_ttl=ttl, poll_interval=poll)
        backend, other_backend = RedisQueueBackend(server.url, settings), RedisQueueBackend(server.url, settings)
        STEPS[queue].enqueue_many([(i, 0.05) for i in range(80)], backend=backend)
        argv = [
            sys.executable,
            "-m",
            "pyfiq",
            "worker",
            "pyfiq.ops.scenario_tasks",
            "--redis",
            server.url,
            "--prefix",
            prefix,
        ]
        argv += ["--shards", "4", "--queues", queue, "--concurrency", "1", "--name", "holder"]
        argv += ["--lease-ttl", str(ttl), "--poll-interval", str(poll), "--log-level", "error"]
        env = {**os.environ, JOURNAL_ENV: str(journal), "PYTHONUNBUFFERED": "1"}
        other: ThreadedWorker | None = None
        old_journal = os.environ.get(JOURNAL_ENV)
        with open(workdir / f"holder-{rep}.log", "wb") as out:
            holder = spawn(argv, stdout=out, stderr=out, env=env)
        try:

            def starts(replica: str, path: Path = journal) -> list[dict[str, Any]]:
                return [e for e in read_journal(path) if e["event"] == "start" and e["replica"] == replica]

            if not poll_until(lambda: len(starts("holder")) >= 3, 30, interval=0.01):
                raise RuntimeError("the holder replica did not start running tasks")
            os.environ[JOURNAL_ENV] = str(journal)  # the in-process worker journals too
            other = ThreadedWorker(other_backend, queues=[queue], concurrency=1, replica="other").start()
            time.sleep(0.5)  # idle, subscribed, and past its first look
            lease_left = (backend.queue_info(queue)["lease_ttl_ms"] or 0) / 1000
            t_kill = time.time()
            holder.kill()
            holder.wait(10)
            if not poll_until(lambda: bool(starts("other")), ttl * 3 + 5, interval=0.005):
                raise RuntimeError("the queue was not taken over")
            took = starts("other")[0]["t"] - t_kill
            samples.append(
                {"kill_to_start_s": took, "lease_left_at_kill_s": lease_left, "after_expiry_s": took - lease_left}
            )
        finally:
            if other is not None:
                other.stop(timeout=5)
            if old_journal is None:
                os.environ.pop(JOURNAL_ENV, None)
            else:
                os.environ[JOURNAL_ENV] = old_journal
            end(holder, kill=True)
            backend.close()
            other_backend.close()
            server.flush()
    took = [s["kill_to_start_s"] for s in samples]
    return {
        "lease_ttl_s": ttl,
        "poll_interval_s": poll,
        "samples": samples,
        "median_s": statistics.median(took),
        "max_s": max(took),
        "after_expiry_median_s": statistics.median(s["after_expiry_s"] for s in samples),
    }


def measure_handoff(server: RedisServer, reps: int) -> dict[str, Any]:
    """Two in-process workers on one queue of 5 ms tasks: the holder's stop() hands the lease
    over; measured from the stop() call to the next task's start on the other worker."""
    queue = "bench-handoff"
    fn = bench_fifo(stamp, queue)
    samples: list[dict[str, Any]] = []
    for _ in range(reps):
        settings = Settings(prefix=new_prefix(), shards=4, lease_ttl=2.0, poll_interval=0.2, batch_limit=1000)
        a_backend, b_backend = RedisQueueBackend(server.url, settings), RedisQueueBackend(server.url, settings)
        fn.enqueue_many([(i, 0.005) for i in range(500)], backend=a_backend)
        TALLY.reset(10**9)
        a = ThreadedWorker(a_backend, queues=[queue], concurrency=1, replica="A").start()
        b: ThreadedWorker | None = None
        try:
            if not poll_until(lambda: len(TALLY.stamps) >= 5, 20):
                raise RuntimeError("the first worker did not start running tasks")
            b = ThreadedWorker(b_backend, queues=[queue], concurrency=1, replica="B").start()
            time.sleep(0.3)
            t_stop = time.time()
            a.stop(timeout=10)
            t_stopped = time.time()

            def by_b() -> list[tuple[int, float, str]]:
                return [s for s in list(TALLY.stamps) if s[2] == "B"]

            if not poll_until(lambda: bool(by_b()), 10, interval=0.001):
                raise RuntimeError("the queue was not handed over")
            first_b = by_b()[0]
            last_a = max(s[0] for s in TALLY.stamps if s[2] == "A")
            samples.append(
                {
                    "stop_to_start_s": first_b[1] - t_stop,
                    "stop_call_s": t_stopped - t_stop,
                    "in_order": first_b[0] == last_a + 1,
                }
            )
        finally:
            a.stop(timeout=5)
            if b is not None:
                b.stop(timeout=5)
            a_backend.close()
            b_backend.close()
            server.flush()
    took = [s["stop_to_start_s"] for s in samples]
    return {
        "samples": samples,
        "median_s": statistics.median(took),
        "max_s": max(took),
        "under_100ms": max(took) < 0.1,
        "in_order": all(s["in_order"] for s in samples),
    }


def section(run: Run) -> None:
    """Take-over after SIGKILL and hand-off after a graceful stop."""
    report, server, quick, workdir = run.report, run.server, run.quick, run.workdir
    log("take-over after SIGKILL of the holder")
    k = measure_takeover_kill(server, 1 if quick else 3, workdir)
    log("hand-off after a graceful stop")
    h = measure_handoff(server, 2 if quick else 5)
    report.data["takeover"] = {"sigkill": k, "graceful": h}
    report.row(
        "takeover",
        f"SIGKILL, lease TTL {k['lease_ttl_s']:.0f} s, poll {k['poll_interval_s']} s: median/max",
        f"{ms(k['median_s'])} / {ms(k['max_s'])}",
        f"{ms(k['after_expiry_median_s'])} after lease expiry",
    )
    report.row(
        "takeover",
        "graceful stop(): stop call to next start, median/max",
        f"{ms(h['median_s'])} / {ms(h['max_s'])}",
        ("< 100 ms target met" if h["under_100ms"] else "OVER 100 ms target")
        + ("" if h["in_order"] else ", ORDER BROKEN"),
    )
