"""Enqueue-to-start latency on an idle system."""

from __future__ import annotations

import time
from typing import Any

from pyfiq import RedisQueueBackend, Settings, ThreadedWorker

from .harness import TALLY, RedisServer, Run, bench_fifo, log, ms, new_prefix, percentile, stamp


def measure_latency(server: RedisServer, count: int, gap: float) -> dict[str, Any]:
    """Enqueue one task at a time into an idle system; latency = its start - the enqueue call."""
    settings = Settings(prefix=new_prefix())
    worker_backend, producer = RedisQueueBackend(server.url, settings), RedisQueueBackend(server.url, settings)
    queue = "bench-latency"
    fn = bench_fifo(stamp, queue)
    TALLY.reset(count)
    sent: dict[int, float] = {}
    calls: list[float] = []
    worker = ThreadedWorker(worker_backend, queues=[queue], concurrency=1).start()
    try:
        time.sleep(0.5)
        for i in range(count):
            t = time.time()
            fn.send_with_options(args=(i,), backend=producer)
            calls.append(time.time() - t)
            sent[i] = t
            time.sleep(gap)
        TALLY.done.wait(30)
    finally:
        worker.stop(timeout=10)
        worker_backend.close()
        producer.close()
        server.flush()
    lat = sorted(started - sent[i] for i, started, _ in TALLY.stamps)
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
    """Enqueue-to-start latency, one task at a time."""
    report, server, quick = run.report, run.server, run.quick
    count, gap = (30, 0.01) if quick else (300, 0.015)
    log(f"latency: {count} tasks, one at a time")
    lat = measure_latency(server, count, gap)
    report.data["latency"] = lat
    report.row(
        "latency",
        f"enqueue to start, idle system ({lat['tasks']} tasks): p50/p99",
        f"{ms(lat['p50_s'])} / {ms(lat['p99_s'])}",
        f"max {ms(lat['max_s'])}; enqueue call p50 {ms(lat['enqueue_call_p50_s'])}",
    )
