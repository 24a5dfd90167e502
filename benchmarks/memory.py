"""Redis bytes per pending task and a replica's memory."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pyfiq import RedisQueueBackend, Settings
from pyfiq_harness.servers import poll_until

from .harness import RedisServer, Run, bench_fifo, end, log, new_prefix, noop, read_until, spawn, vm_rss_kib


def measure_memory(server: RedisServer, count: int, logdir: Path) -> dict[str, Any]:
    from pyfiq.ops.scenario_tasks import STEPS

    out: dict[str, Any] = {}
    server.flush()
    backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix()))
    client = server.client()
    fn = bench_fifo(noop, "bench-memory")
    try:
        bench_fifo(noop, "bench-memory-warm")(0)  # scripts loaded, layout key written
        before = int(client.info("memory")["used_memory"])
        fn.enqueue_many([(i,) for i in range(count)], backend=backend)
        after = int(client.info("memory")["used_memory"])
        key = backend.keys.stream("bench-memory").pending
        usage = client.memory_usage(key, samples=0) or 0
        out["redis"] = {
            "tasks": count,
            "used_memory_bytes_per_task": (after - before) / count,
            "memory_usage_bytes_per_task": usage / count,
            "stored_entry_bytes": len(client.lindex(key, 0) or b""),
        }
    finally:
        backend.close()
        server.flush()

    # The replica: RSS idle, then holding a queue with `count` tasks behind a long first task.
    prefix = new_prefix()
    backend = RedisQueueBackend(server.url, Settings(prefix=prefix))
    queue = "scenario-b"
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
    argv += ["--queues", queue, "--concurrency", "1", "--name", "rss", "--log-level", "error"]
    with open(logdir / "rss-replica.log", "wb") as log_out:
        proc = spawn(argv, stdout=log_out, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        if not read_until(proc.stderr, b"ready", 60):
            raise RuntimeError("the replica did not start")
        time.sleep(0.5)
        idle = vm_rss_kib(proc.pid)
        STEPS[queue].send_with_options(args=(0, 120.0), backend=backend)  # holds the queue
        STEPS[queue].enqueue_many([(i, 0.0) for i in range(1, count)], backend=backend)
        if not poll_until(lambda: backend.queue_info(queue)["inflight"] >= 1, 30, interval=0.01):
            raise RuntimeError("the replica did not take the queue")
        time.sleep(0.5)
        out["replica"] = {
            "queued_tasks": backend.queue_info(queue)["pending"],
            "rss_idle_kib": idle,
            "rss_with_queued_kib": vm_rss_kib(proc.pid),
        }
    finally:
        end(proc, kill=True)
        backend.close()
        client.close()
        server.flush()
    return out


def section(run: Run) -> None:
    """Redis bytes per pending task and replica RSS."""
    report, server, quick, workdir = run.report, run.server, run.quick, run.workdir
    count = 1000 if quick else 10000
    log(f"memory: {count} pending tasks")
    m = measure_memory(server, count, workdir)
    report.data["memory"] = m
    r, rep = m["redis"], m["replica"]
    report.row(
        "memory",
        f"Redis bytes per pending task ({count} tasks)",
        f"{r['used_memory_bytes_per_task']:.0f} B",
        f"MEMORY USAGE {r['memory_usage_bytes_per_task']:.0f} B, entry {r['stored_entry_bytes']} B",
    )
    report.row(
        "memory",
        f"replica RSS idle / with {rep['queued_tasks']} queued",
        f"{(rep['rss_idle_kib'] or 0) / 1024:.1f} / {(rep['rss_with_queued_kib'] or 0) / 1024:.1f} MiB",
    )
