"""Redis's own cost per task: what one Redis core spends on each task a fleet runs.

A fleet's Python workers scale out with replicas; the Redis behind them does not, so Redis time
per task bounds a deployment. Two views of it, over the same window:

- commandstats: the µs Redis spent executing pyfiq's commands (a script's time includes the
  commands it calls, which commandstats also lists by name: those are not added twice);
- Redis CPU: the server process's user+system CPU, which adds reading, parsing and replying.

Each phase starts from an empty prefix on this run's server: enqueue_many in batches of 100, a
drain in the default and the strict ack mode, and one ``fn(i)`` call at a time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter
from typing import Any

import redis

from pyfiq import RedisQueueBackend, Settings, ThreadedWorker
from pyfiq_harness.servers import poll_until

from .drain import queue_empty
from .harness import (
    TALLY,
    CommandStats,
    RedisServer,
    Run,
    bench_fifo,
    command_stats,
    log,
    new_prefix,
    noop,
    per_s,
    proc_cpu_seconds,
    stats_delta,
)

#: Producer threads of the concurrent one-call enqueue (a web tier's request threads).
THREADS = 16

#: The documented setting for throughput over re-runs: a take per 100 tasks, a yield per 1,000
#: (a crash re-runs up to 100 finished tasks).
BULK: dict[str, Any] = {"ack_mode": "inline", "prefetch": 100, "batch_limit": 1000}

#: Commands pyfiq sends itself; any other command in the window ran inside its scripts.
SCRIPT_CALLS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall")


class Meter:
    """commandstats and the server's CPU across one phase."""

    def __init__(self, server: RedisServer, client: redis.Redis) -> None:
        assert server.proc is not None
        self.pid, self.client = server.proc.pid, client

    def __enter__(self) -> Meter:
        self.stats0, self.cpu0, self.t0 = command_stats(self.client), proc_cpu_seconds(self.pid), perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = perf_counter() - self.t0
        self.cpu = proc_cpu_seconds(self.pid) - self.cpu0
        self.delta: CommandStats = stats_delta(self.stats0, command_stats(self.client))

    def per_task(self, n: int, direct: tuple[str, ...] = ()) -> dict[str, Any]:
        """Per task: scripts' µs plus the µs of the commands sent outside scripts (``direct``,
        e.g. a PUBLISH), the server's CPU µs, and every command's calls (inner ones included)."""
        usec = sum(u for cmd, (_, u) in self.delta.items() if cmd in SCRIPT_CALLS or cmd in direct)
        return {
            "tasks": n,
            "commandstats_usec_per_task": usec / n,
            "redis_cpu_usec_per_task": 1e6 * self.cpu / n,
            "tasks_per_redis_core": n / max(self.cpu, 1e-9),
            "seconds": self.seconds,
            "calls_per_task": {cmd: c / n for cmd, (c, _) in sorted(self.delta.items())},
            "usec_per_task": {cmd: u / n for cmd, (_, u) in sorted(self.delta.items())},
        }


def drain(server: RedisServer, backend: RedisQueueBackend, queue: str, n: int, client: redis.Redis) -> Meter:
    TALLY.reset(n)
    with Meter(server, client) as meter:
        worker = ThreadedWorker(backend, queues=[queue], concurrency=1).start()
        try:
            if not TALLY.done.wait(600) or not poll_until(lambda: queue_empty(backend, queue), 30, interval=0.001):
                raise RuntimeError(f"the drain of {n} tasks did not finish ({TALLY.count} ran)")
        finally:
            worker.stop(timeout=10)
    return meter


@contextlib.contextmanager
def apart(server: RedisServer) -> Iterator[bool]:
    """Redis on one core, this process on the others (when there are two or more), as Redis
    would run on its own machine: commandstats counts wall time, so a script preempted by the
    workers' threads would be charged their time."""
    assert server.proc is not None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        yield False
        return
    os.sched_setaffinity(server.proc.pid, {cores[0]})
    os.sched_setaffinity(0, set(cores[1:]))
    try:
        yield True
    finally:
        os.sched_setaffinity(0, set(cores))
        os.sched_setaffinity(server.proc.pid, set(cores))


def measure_cost(server: RedisServer, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = server.client()
    with apart(server) as pinned:
        out["redis_on_own_core"] = pinned
        measure_phases(server, n, client, out)
    client.close()
    return out


def measure_phases(server: RedisServer, n: int, client: redis.Redis, out: dict[str, Any]) -> None:
    modes: tuple[tuple[str, dict[str, Any]], ...] = (
        ("default", {}),
        ("strict", {"ack_mode": "inline"}),
        ("bulk", BULK),
    )
    for mode, overrides in modes:
        log(f"cost: enqueue_many of 100 and a {mode} drain, {n} tasks")
        backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix(), **overrides))
        queue = f"bench-cost-{mode}"
        fn = bench_fifo(noop, queue)
        try:
            with Meter(server, client) as enq:
                for start in range(0, n, 100):
                    fn.enqueue_many(((i,) for i in range(start, min(n, start + 100))), backend=backend)
            out[f"enqueue_many_{mode}"] = enq.per_task(n)
            out[f"drain_{mode}"] = drain(server, backend, queue, n, client).per_task(n)
        finally:
            backend.close()
            server.flush()
        both = out[f"enqueue_many_{mode}"], out[f"drain_{mode}"]
        out[f"batched_{mode}"] = {
            key: both[0][key] + both[1][key] for key in ("commandstats_usec_per_task", "redis_cpu_usec_per_task")
        }
    single = max(1, n // 4)
    log(f"cost: one fn(i) call at a time, {single} tasks")
    backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix()))
    fn = bench_fifo(noop, "bench-cost-single")
    try:
        with Meter(server, client) as enq:
            for i in range(single):
                fn.send_with_options(args=(i,), backend=backend)
        out["enqueue_single"] = enq.per_task(single)
    finally:
        backend.close()
        server.flush()
    log(f"cost: one fn(i) call at a time from {THREADS} threads, {single} tasks")
    backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix()))
    try:
        per_thread = max(1, single // THREADS)

        def produce(t: int) -> None:
            for i in range(per_thread):
                fn.send_with_options(args=(t * per_thread + i,), backend=backend)

        with Meter(server, client) as enq, ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(produce, range(THREADS)))
        out["enqueue_threads"] = enq.per_task(per_thread * THREADS)
    finally:
        backend.close()
        server.flush()


def section(run: Run) -> None:
    """Redis µs and Redis CPU per task: batched enqueue, drains, one-call enqueue."""
    n = run.n
    cost = measure_cost(run.server, n)
    run.report.data["cost"] = cost
    rows = (
        ("enqueue_many_default", "enqueue_many of 100"),
        ("drain_default", "drain, default mode"),
        ("drain_strict", "drain, strict mode (ack_mode=inline)"),
        ("drain_bulk", "drain, ack_mode=inline, prefetch=100, batch_limit=1000"),
        ("enqueue_single", "one fn(i) call at a time"),
        ("enqueue_threads", f"one fn(i) call at a time from {THREADS} threads (shared round trips)"),
    )
    for key, label in rows:
        r = cost[key]
        run.report.row(
            "cost",
            f"{label}: Redis time per task",
            f"{r['commandstats_usec_per_task']:.1f} µs",
            f"Redis CPU {r['redis_cpu_usec_per_task']:.1f} µs; {per_s(r['tasks_per_redis_core'])} per Redis core",
        )
    for mode in ("default", "strict", "bulk"):
        b = cost[f"batched_{mode}"]
        run.report.row(
            "cost",
            f"enqueue_many + drain ({mode}): Redis time per task",
            f"{b['commandstats_usec_per_task']:.1f} µs",
            f"Redis CPU {b['redis_cpu_usec_per_task']:.1f} µs; "
            f"{per_s(1e6 / max(b['redis_cpu_usec_per_task'], 1e-3))} per Redis core",
        )
