"""What storing results costs: the default drain of tasks whose function stores what it returns,
against the same drain without, alternated in one run; and the time from a task's end to the
return of the ``result()`` call waiting for it."""

from __future__ import annotations

import time
from time import perf_counter
from typing import Any

from pyfiq import RedisQueueBackend, Settings, ThreadedWorker, fifo
from pyfiq_harness.servers import poll_until

from .drain import queue_empty
from .harness import TALLY, RedisServer, Run, log, ms, new_prefix, per_s, percentile, times

#: When each latency task ended (its own clock, just before it returned), by argument.
ENDED: dict[int, float] = {}


def plain(i: int) -> None:
    TALLY.hit()


def keeps(i: int) -> dict[str, Any]:
    TALLY.hit()
    return {"i": i, "ok": True}


def ends(i: int) -> int:
    ENDED[i] = time.perf_counter()
    return i


_BOUND: dict[str, Any] = {}


def bound(func: Any, store_result: bool) -> Any:
    """The function's @fifo binding, made on first use (importing this module registers
    nothing, as ``harness.bench_fifo``)."""
    name = func.__name__
    if name not in _BOUND:
        _BOUND[name] = fifo(
            queue=f"bench-results-{name}", name=f"bench.results.{name}", max_retries=0, store_result=store_result
        )(func)
    return _BOUND[name]


def drain_rate(server: RedisServer, fn: Any, n: int) -> float:
    """Tasks per second of the default drain of ``n`` tasks of ``fn``, one worker thread."""
    backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix()))
    try:
        fn.enqueue_many(((i,) for i in range(n)), backend=backend)
        TALLY.reset(n)
        t0 = perf_counter()
        worker = ThreadedWorker(backend, queues=[fn.queue], concurrency=1).start()
        try:
            TALLY.done.wait(60 + n / 500)
            poll_until(lambda: queue_empty(backend, fn.queue), 10, interval=0.001)
            elapsed = perf_counter() - t0
        finally:
            worker.stop(timeout=10)
        return TALLY.count / elapsed
    finally:
        backend.close()
        server.flush()


def result_latency(server: RedisServer, count: int) -> list[float]:
    """Seconds from each task's end to the return of the ``result()`` waiting for it: one task
    at a time, the waiter subscribed before the task runs."""
    settings = Settings(prefix=new_prefix())
    worker_backend, caller = RedisQueueBackend(server.url, settings), RedisQueueBackend(server.url, settings)
    fn = bound(ends, True)
    worker = ThreadedWorker(worker_backend, queues=[fn.queue], concurrency=1).start()
    out: list[float] = []
    try:
        time.sleep(0.3)
        for i in range(count):
            handle = fn.send_with_options(args=(i,), backend=caller)
            assert handle.result(timeout=30) == i
            out.append(time.perf_counter() - ENDED[i])
    finally:
        worker.stop(timeout=10)
        worker_backend.close()
        caller.close()
        server.flush()
    return sorted(out)


def section(run: Run) -> None:
    """Drain with store_result against without (alternated), and result() wake-up latency."""
    report, server, n, quick = run.report, run.server, run.n, run.quick
    rounds = 1 if quick else 3
    rates: dict[str, list[float]] = {"plain": [], "store_result": []}
    for r in range(rounds):
        for name, fn in (("plain", bound(plain, False)), ("store_result", bound(keeps, True))):
            log(f"results: drain {n} tasks, {name} ({r + 1}/{rounds})")
            rates[name].append(drain_rate(server, fn, n))
    plain_rate, kept_rate = max(rates["plain"]), max(rates["store_result"])
    count = 30 if quick else 300
    log(f"results: result() latency, {count} tasks")
    latency = result_latency(server, count)
    p50, p99, ratio = percentile(latency, 50), percentile(latency, 99), kept_rate / plain_rate
    data: dict[str, Any] = {
        "plain_per_s": rates["plain"],
        "store_result_per_s": rates["store_result"],
        "ratio": ratio,
        "latency_tasks": len(latency),
        "latency_p50_s": p50,
        "latency_p99_s": p99,
        "latency_max_s": latency[-1],
    }
    report.data["results"] = data
    report.row(
        "results",
        f"default drain, store_result=True against without (best of {rounds} each, alternated)",
        per_s(kept_rate),
        times(ratio, "the drain without results"),
    )
    report.row(
        "results",
        f"task end to result() return ({len(latency)} tasks): p50/p99",
        f"{ms(p50, 2)} / {ms(p99, 2)}",
        f"max {ms(latency[-1], 2)}",
    )
