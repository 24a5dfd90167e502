"""What delayed tasks cost while they wait, and how close to its due time one starts: an idle
fleet's commands per second with 100,000 delayed tasks waiting (due in an hour, over 1,000
streams), with 1,000, and with none, measured alternately in one run; and the lateness of a
delayed task's start against its due time (Redis's clock) on an idle fleet.

With any delayed task waiting in a shard, each poll of that shard reads Redis's clock inside the
poll script: a TIME per poll, whatever the number waiting. 1,000 tasks, one per stream, already
put some in every shard: the baseline that shows the cost does not grow with their number."""

from __future__ import annotations

import random
import threading
import time
from time import perf_counter
from typing import Any

from pyfiq import RedisQueueBackend, Settings, ThreadedWorker
from pyfiq.functions import Registry
from pyfiq.task import TaskRecord, due_spec, new_task_ids
from pyfiq_harness.servers import poll_until

from .harness import RedisServer, Run, command_stats, log, ms, new_prefix, percentile, stats_delta

QUEUE = "bench-delays"
WAITING = 100_000
STREAMS = 1_000
REPLICAS = 3


def fleet(backend: RedisQueueBackend, registry: Registry) -> list[ThreadedWorker]:
    return [
        ThreadedWorker(backend.copy(), registry=registry, queues=[QUEUE], concurrency=4).start()
        for _ in range(REPLICAS)
    ]


def commands_per_s(server: RedisServer, window: float) -> tuple[float, dict[str, float]]:
    """Commands Redis ran per second over ``window`` (those inside scripts included), in all and
    by command."""
    client = server.client()
    try:
        s0, t0 = command_stats(client), perf_counter()
        time.sleep(window)
        s1, t1 = command_stats(client), perf_counter()
    finally:
        client.close()
    delta = stats_delta(s0, s1)
    secs = t1 - t0
    return sum(c for c, _ in delta.values()) / secs, {cmd: c / secs for cmd, (c, _) in sorted(delta.items())}


def park(backend: RedisQueueBackend, count: int) -> float:
    """Enqueue ``count`` tasks due in an hour, spread evenly over ``STREAMS`` streams (so over
    every shard); returns Redis's used memory per task, in bytes."""
    client = backend.client
    before = int(client.info("memory")["used_memory"])
    when = due_spec(3600)
    ids = new_task_ids(count)
    per_stream = max(1, count // STREAMS)
    for stream_no, start in enumerate(range(0, count, per_stream)):
        stream = f"{QUEUE}#k{stream_no % STREAMS}"
        for chunk in range(start, min(start + per_stream, count), 500):
            upto = min(chunk + 500, start + per_stream, count)
            records = [(ids[i], TaskRecord("bench.delays.later", [i], {})) for i in range(chunk, upto)]
            backend.enqueuer.enqueue(stream, backend.encode(records, when=when))
    return (int(client.info("memory")["used_memory"]) - before) / count


#: The idle fleet's cases: no delayed task, one per stream, and ``WAITING`` (100 per stream).
CASES = {"none": 0, "few": STREAMS, "many": WAITING}


def idle_cost(server: RedisServer, window: float, rounds: int, settle: float) -> dict[str, Any]:
    """Commands per second of an idle fleet of ``REPLICAS`` workers on a fresh prefix with no
    delayed task, ``STREAMS`` and ``WAITING`` of them, alternated ``rounds`` times; and per
    command."""
    out: dict[str, Any] = {kind: [] for kind in CASES}
    out["by_command_per_s"] = {}
    per_task = 0.0
    for r in range(rounds):
        for kind, count in CASES.items():
            backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix(), shards=16))
            registry = Registry(backend)
            registry.fifo(QUEUE, name="bench.delays.later")(_later)
            log(f"delays: idle fleet, {count:,} delayed task(s) waiting ({r + 1}/{rounds})")
            if count:
                used = park(backend, count)
                per_task = used if count == WAITING else per_task
            workers = fleet(backend, registry)
            try:
                # Past the start-up, when every replica polls every shard until the replicas
                # share the safety poll (a few heartbeats): the steady state is what counts.
                time.sleep(settle)
                cps, by_command = commands_per_s(server, window)
            finally:
                for w in workers:
                    w.stop(timeout=10)
                backend.close()
                server.flush()
            out[kind].append(cps)
            out["by_command_per_s"][kind] = by_command
    return {**out, "bytes_per_waiting_task": per_task}


def _later(i: int) -> None: ...


def lateness(server: RedisServer, count: int) -> list[float]:
    """Seconds from each delayed task's due time to its start, on an idle fleet: ``count`` tasks,
    each due 0.2-1.0 s after its enqueue, enqueued a few at a time."""
    backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix(), shards=16))
    registry = Registry(backend)
    started: dict[int, float] = {}
    done = threading.Event()

    @registry.fifo(QUEUE, name="bench.delays.due")
    def due(i: int) -> None:
        started[i] = time.time()  # this machine's clock: the same clock as Redis's here
        if len(started) == count:
            done.set()

    workers = fleet(backend, registry)
    rng = random.Random(7)
    due_at: dict[int, float] = {}
    try:
        time.sleep(1.0)
        for i in range(count):
            handle = due.send_with_options(args=(i,), key=f"k{i % 50}", delay=rng.uniform(0.2, 1.0))
            when = handle.status().due
            assert when is not None
            due_at[i] = when.timestamp()
            time.sleep(rng.uniform(0.0, 0.02))
        done.wait(60)
        poll_until(lambda: len(started) == count, 10)
    finally:
        for w in workers:
            w.stop(timeout=10)
        backend.close()
        server.flush()
    return sorted(started[i] - due_at[i] for i in started)


def section(run: Run) -> None:
    report, server, quick = run.report, run.server, run.quick
    # The smoke test only needs every case to run: the quick run measures for a second each.
    window, rounds, settle = (1.0, 1, 1.0) if quick else (10.0, 2, 12.0)
    cost = idle_cost(server, window, rounds, settle)
    none, few, many = (min(cost[kind]) for kind in CASES)
    count = 30 if quick else 300
    log(f"delays: lateness of {count} delayed tasks on an idle fleet")
    late = lateness(server, count)
    p50, p99 = percentile(late, 50), percentile(late, 99)
    report.data["delays"] = {
        **cost,
        "replicas": REPLICAS,
        "waiting_tasks": WAITING,
        "ratio": many / few,
        "lateness_tasks": len(late),
        "lateness_min_s": late[0],
        "lateness_p50_s": p50,
        "lateness_p99_s": p99,
        "lateness_max_s": late[-1],
    }
    report.row(
        "delays",
        f"idle fleet ({REPLICAS} workers): commands/s with {WAITING:,} / {STREAMS:,} / no delayed tasks waiting",
        f"{many:.1f} / {few:.1f} / {none:.1f}",
        f"{many / few:.2f}x the {STREAMS:,}; {cost['bytes_per_waiting_task']:.0f} B of Redis memory per task",
    )
    report.row(
        "delays",
        f"a delayed task's start after its due time, idle fleet ({len(late)} tasks): p50/p99",
        f"{ms(p50, 1)} / {ms(p99, 1)}",
        f"min {ms(late[0], 1)}, max {ms(late[-1], 1)}",
    )
