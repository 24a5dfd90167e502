"""Enqueue-to-start latency on an idle system: one enqueue at a time, the worker in another
process (as a web tier and its workers are), each task's start stamped by the worker."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pyfiq import RedisQueueBackend, Settings, ThreadedWorker, fifo

from .harness import (
    CHILD,
    ROOT,
    RedisServer,
    Run,
    end,
    log,
    ms,
    new_prefix,
    percentile,
    quiet_logging,
    read_until,
    spawn,
)

QUEUE = "bench-latency"
TASK = "bench.latency"


def _stamp(i: int) -> None:
    # One line per start, written at once: the parent reads them as they come.
    sys.stdout.write(f"{i} {time.time()!r}\n")
    sys.stdout.flush()


def child_latency(args: argparse.Namespace) -> None:
    """The worker process: runs the latency queue's tasks, printing each start's wall time."""
    quiet_logging()
    fifo(queue=QUEUE, name=TASK)(_stamp)
    worker = ThreadedWorker(RedisQueueBackend(args.url, Settings(prefix=args.prefix)), queues=[QUEUE])
    worker.start()
    print("ready", flush=True)
    threading.Event().wait(args.timeout)


def measure_latency(server: RedisServer, count: int, gap: float, logdir: Path) -> dict[str, Any]:
    """Enqueue one task at a time into an idle system; latency = its start - the enqueue call."""
    prefix = new_prefix()
    producer = RedisQueueBackend(server.url, Settings(prefix=prefix))
    fn = fifo(queue=QUEUE, name=TASK)(_stamp)
    argv = [*CHILD, "--child", "latency", "--url", server.url, "--prefix", prefix, "--timeout", "600"]
    with open(logdir / "latency-worker.log", "wb") as err:
        proc = spawn(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
    starts: dict[int, float] = {}
    sent: dict[int, float] = {}
    calls: list[float] = []
    try:
        assert proc.stdout is not None
        if not read_until(proc.stdout, b"ready", 120):
            raise RuntimeError("the latency worker did not start")
        stdout = proc.stdout

        def read_starts() -> None:
            for line in stdout:
                fields = line.split()
                if len(fields) != 2:
                    continue
                starts[int(fields[0])] = float(fields[1])
                if len(starts) >= count:
                    return

        reader = threading.Thread(target=read_starts, daemon=True)
        reader.start()
        time.sleep(1.0)  # past the worker's first looks after its start
        for i in range(count):
            t = time.time()
            fn.send_with_options(args=(i,), backend=producer)
            calls.append(time.time() - t)
            sent[i] = t
            time.sleep(gap)
        reader.join(30)
    finally:
        end(proc)
        producer.close()
        server.flush()
    lat = sorted(starts[i] - sent[i] for i in starts if i in sent)
    if not lat:
        raise RuntimeError("no task of the latency run started")
    calls.sort()
    return {
        "tasks": len(lat),
        "gap_s": gap,
        "p50_s": percentile(lat, 50),
        "p90_s": percentile(lat, 90),
        "p99_s": percentile(lat, 99),
        "max_s": lat[-1],
        "enqueue_call_p50_s": percentile(calls, 50),
        "enqueue_call_p99_s": percentile(calls, 99),
    }


def section(run: Run) -> None:
    """Enqueue-to-start latency, one task at a time, the worker in another process."""
    report, server, quick = run.report, run.server, run.quick
    count, gap = (30, 0.01) if quick else (300, 0.015)
    log(f"latency: {count} tasks, one at a time, the worker in another process")
    lat = measure_latency(server, count, gap, run.workdir)
    report.data["latency"] = lat
    report.row(
        "latency",
        f"enqueue to start, idle system, worker in another process ({lat['tasks']} tasks): p50/p99",
        f"{ms(lat['p50_s'], 2)} / {ms(lat['p99_s'], 2)}",
        f"max {ms(lat['max_s'])}; enqueue call p50 {ms(lat['enqueue_call_p50_s'], 2)}",
    )
