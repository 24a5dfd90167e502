"""The ordered drain of one queue, per acknowledgement setting."""

from __future__ import annotations

from time import perf_counter
from typing import Any

from pyfiq import RedisQueueBackend, Settings, ThreadedWorker
from pyfiq_harness.servers import poll_until

from .ceiling import evalsha_rate
from .harness import (
    TALLY,
    RedisServer,
    Report,
    Run,
    bench_fifo,
    command_stats,
    log,
    new_prefix,
    noop,
    per_s,
    stats_delta,
    times,
)

#: The drain settings compared: what users run, the strict setting, and the fastest ones.
DRAINS: dict[str, dict[str, Any]] = {
    "default": {},
    "strict": {"ack_mode": "inline"},
    "group_100": {"prefetch": 100, "batch_limit": 1000},
    "inline_100": {"ack_mode": "inline", "prefetch": 100, "batch_limit": 1000},
}


def queue_empty(backend: RedisQueueBackend, queue: str) -> bool:
    info = backend.queue_info(queue)
    return not (info["pending"] or info["inflight"])


def measure_drain(
    server: RedisServer, n: int, overrides: dict[str, Any], timeout: float, ceiling_s: float
) -> dict[str, Any]:
    settings = Settings(prefix=new_prefix(), **overrides)
    backend = RedisQueueBackend(server.url, settings)
    queue = "bench-drain"
    fn = bench_fifo(noop, queue)
    client = server.client()
    try:
        fn.enqueue_many(((i,) for i in range(n)), backend=backend)
        ceiling_before = evalsha_rate(server.url, ceiling_s)
        TALLY.reset(n)
        before = command_stats(client)
        t0 = perf_counter()
        worker = ThreadedWorker(backend, queues=[queue], concurrency=1).start()
        try:
            finished = TALLY.done.wait(timeout)
            # The last acknowledgement rides on one more call: the queue is drained when it lands.
            finished = finished and poll_until(lambda: queue_empty(backend, queue), 10, interval=0.001)
            elapsed = perf_counter() - t0
            done = TALLY.count
        finally:
            worker.stop(timeout=10)
        delta = stats_delta(before, command_stats(client))
        ceiling = (ceiling_before + evalsha_rate(server.url, ceiling_s)) / 2
    finally:
        backend.close()
        client.close()
        server.flush()
    calls, usec = delta.get("evalsha", (0, 0))
    return {
        "tasks": done,
        "seconds": elapsed,
        "tasks_per_s": done / elapsed,
        "ceiling_around": ceiling,
        "ratio_to_ceiling": done / elapsed / ceiling,
        "ack_mode": settings.ack_mode,
        "prefetch": settings.effective_prefetch,
        "batch_limit": settings.batch_limit,
        "evalsha_per_task": calls / max(done, 1),
        "redis_script_usec_per_task": usec / max(done, 1),
        "complete": bool(finished),
    }


def run_drains(
    report: Report, label: str, server: RedisServer, n: int, ceiling_s: float, c_client: float | None
) -> dict[str, Any]:
    """Each of ``DRAINS``; ``c_client``: the C client's EVALSHA round trips per second on this
    server (``redis-benchmark -c 1``), the round-trip limit of one connection here."""
    out: dict[str, Any] = {}
    for name, overrides in DRAINS.items():
        log(f"{label}: {n} tasks, {name}")
        r = measure_drain(server, n, overrides, 60 + n / 500, ceiling_s)
        if c_client:
            r["ratio_to_c_client"] = r["tasks_per_s"] / c_client
        out[name] = r
        note = "" if r["complete"] else " (TIMED OUT)"
        limit = f", {times(r['ratio_to_c_client'], 'C client')}" if c_client else ""
        report.row(
            label,
            f"{name}: {r['ack_mode']} prefetch={r['prefetch']} batch_limit={r['batch_limit']}{note}",
            per_s(r["tasks_per_s"]),
            times(r["ratio_to_ceiling"], "ceiling") + limit + f", {r['evalsha_per_task']:.3f} EVALSHA/task",
        )
    return out


def section(run: Run) -> None:
    """Drain rates against the ceiling, per setting (``DRAINS``)."""
    report, server, n, ceiling_s = run.report, run.server, run.n, run.ceiling_s
    c_client = run.report.data["ceiling"].get("redis_benchmark_evalsha_per_s")
    report.data["drain"] = run_drains(report, "drain", server, n, ceiling_s, c_client)
