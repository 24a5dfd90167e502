"""Enqueue rates: one call each, batches, threads and asyncio tasks, against pipelined RPUSH."""

from __future__ import annotations

import asyncio
import itertools
import resource
import threading
import time
from time import perf_counter
from typing import Any

import pyfiq
from pyfiq import RedisQueueBackend, Settings
from pyfiq.functions import FifoFunction

from .ceiling import evalsha_rate
from .harness import (
    RedisServer,
    Run,
    anoop,
    bench_fifo,
    command_stats,
    log,
    loop_rate,
    new_prefix,
    noop,
    per_s,
    stats_delta,
    times,
)


def measure_enqueue(server: RedisServer, seconds: float, ceiling_s: float) -> dict[str, Any]:
    backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix()))
    pyfiq.configure(backend)
    fn = bench_fifo(noop, "bench-enqueue")
    client = server.client()
    try:
        fn(0)  # warm: layout check, script load
        ceiling_before = evalsha_rate(server.url, ceiling_s)
        counter = itertools.count(1)
        single = loop_rate(lambda: fn(next(counter)), seconds, chunk=50)
        payload = client.lindex(backend.keys.stream("bench-enqueue").pending, 0) or b"x" * 100
        server.flush()
        batch = [(i,) for i in range(100)]
        before = command_stats(client)
        many = 100 * loop_rate(lambda: fn.enqueue_many(batch), seconds, chunk=5)
        many_calls, many_usec = stats_delta(before, command_stats(client)).get("evalsha", (0, 0))
        many_redis_usec = many_usec / max(1, 100 * many_calls)
        server.flush()

        def rpush_100() -> None:
            pipe = client.pipeline(transaction=False)
            for _ in range(100):
                pipe.rpush("bench:rpush", payload)
            pipe.execute()

        rpush = 100 * loop_rate(rpush_100, seconds, chunk=5)
        server.flush()
        threads, switches = threaded_enqueue(fn, 16, seconds)
        server.flush()
        tasks = asyncio_enqueue(server.url, 100, seconds)
        ceiling = (ceiling_before + evalsha_rate(server.url, ceiling_s)) / 2
    finally:
        backend.close()
        client.close()
        server.flush()
    return {
        "threads_16": {
            "tasks_per_s": threads,
            "ratio_to_ceiling": threads / ceiling,
            "context_switches_per_enqueue": switches,
        },
        "asyncio_100": {"tasks_per_s": tasks, "ratio_to_ceiling": tasks / ceiling},
        "single": {"tasks_per_s": single, "ratio_to_ceiling": single / ceiling, "ratio_to_rpush": single / rpush},
        "enqueue_many_100": {
            "tasks_per_s": many,
            "ratio_to_ceiling": many / ceiling,
            "ratio_to_rpush": many / rpush,
            "redis_script_usec_per_task": many_redis_usec,
        },
        "rpush_pipeline_100": {"tasks_per_s": rpush, "ratio_to_ceiling": rpush / ceiling},
        "stored_entry_bytes": len(payload),
        "ceiling_around": ceiling,
    }


def threaded_enqueue(fn: FifoFunction[..., None], producers: int, seconds: float) -> tuple[float, float]:
    """Tasks per second stored by ``producers`` threads each calling ``fn(i)`` in a loop (a web
    tier's request threads): their enqueues share round trips. Also the process's context
    switches per enqueue: what handing the interpreter lock between the threads costs."""
    counts = [0] * producers
    stop = threading.Event()

    def produce(p: int) -> None:
        while not stop.is_set():
            fn(counts[p])
            counts[p] += 1

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t0 = perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    switches = after.ru_nvcsw + after.ru_nivcsw - usage.ru_nvcsw - usage.ru_nivcsw
    return sum(counts) / elapsed, switches / max(1, sum(counts))


def asyncio_enqueue(url: str, producers: int, seconds: float) -> float:
    """Tasks per second stored by ``producers`` asyncio tasks each awaiting enqueues in a loop."""
    backend = RedisQueueBackend(url, Settings(prefix=new_prefix()))
    fn = bench_fifo(anoop, "bench-aenqueue")

    async def run() -> float:
        await fn.asend_with_options(args=(0,), backend=backend)  # warm: layout check, script load
        counts = [0] * producers
        end_at = perf_counter() + seconds

        async def produce(p: int) -> None:
            while perf_counter() < end_at:
                await fn.asend_with_options(args=(counts[p],), backend=backend)
                counts[p] += 1

        t0 = perf_counter()
        await asyncio.gather(*(produce(p) for p in range(producers)))
        elapsed = perf_counter() - t0
        await backend.aclose()
        return sum(counts) / elapsed

    try:
        return asyncio.run(run())
    finally:
        backend.close()


def section(run: Run) -> None:
    """Enqueue rates against the ceiling and against pipelined RPUSH."""
    report, server, quick, ceiling_s = run.report, run.server, run.quick, run.ceiling_s
    log("enqueue")
    e = measure_enqueue(server, 0.3 if quick else 2.0, ceiling_s)
    report.data["enqueue"] = e
    rp = e["rpush_pipeline_100"]["tasks_per_s"]
    for key, metric in (("single", "fn(i), one call each"), ("enqueue_many_100", "fn.enqueue_many, 100/call")):
        r = e[key]
        ratio = f"{times(r['ratio_to_ceiling'], 'ceiling')}, {times(r['ratio_to_rpush'], 'rpush')}"
        if "redis_script_usec_per_task" in r:
            ratio += f", Redis {r['redis_script_usec_per_task']:.2f} us/task"
        report.row("enqueue", metric, per_s(r["tasks_per_s"]), ratio)
    producers = (("threads_16", "16 threads calling fn(i)"), ("asyncio_100", "100 asyncio tasks awaiting"))
    for key, metric in producers:
        r = e[key]
        ratio = times(r["ratio_to_ceiling"], "ceiling")
        if "context_switches_per_enqueue" in r:
            ratio += f", {r['context_switches_per_enqueue']:.2f} context switches/enqueue"
        report.row("enqueue", metric, per_s(r["tasks_per_s"]), ratio)
    report.row("enqueue", "baseline: pipelined RPUSH, 100/pipeline", per_s(rp), "baseline")
