"""An idle worker beside another queue's due streams, against none."""

from __future__ import annotations

import time
from time import perf_counter
from typing import Any

import redis

from pyfiq import RedisQueueBackend, Settings, ThreadedWorker
from pyfiq.task import TaskRecord, new_task_id

from .harness import RedisServer, Report, Run, command_stats, log, new_prefix, stats_delta, times
from .idle import redis_load


def fill_due_streams(backend: RedisQueueBackend, queue: str, n: int) -> None:
    """``n`` keyed streams of ``queue`` with one task each, all due now, through the enqueue
    script (pipelined: one round trip per stream would take a minute at 60,000)."""
    if n == 0:
        return
    record = TaskRecord("bench.foreign", [0], {})
    backend.enqueue(f"{queue}#0", [(new_task_id(), record)])  # script loaded
    backend.transport.lay_out(*range(backend.keys.shards))  # raw enqueue calls write no layout
    sha = backend.scripts["enqueue"].sha
    for start in range(1, n, 1000):
        pipe = backend.client.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            call = backend.ops.enqueue(f"{queue}#{i}", backend.encode([(new_task_id(), record)]))
            pipe.evalsha(sha, len(call.keys), *call.keys, *call.args)
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception):
                raise reply


def redis_cpu_seconds(client: redis.Redis) -> float:
    cpu: dict[str, Any] = client.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def measure_idle_foreign(server: RedisServer, counts: list[int], warmup: float, window: float) -> dict[str, Any]:
    """One idle worker of queue ``b`` while queue ``a`` holds N due streams nobody consumes: the
    worker's command rate and Redis's CPU should not depend on N."""
    out: dict[str, Any] = {}
    client = server.client()
    try:
        for count in counts:
            server.flush()
            settings = Settings(prefix=new_prefix())
            producer, worker_backend = RedisQueueBackend(server.url, settings), RedisQueueBackend(server.url, settings)
            try:
                log(f"idle-foreign: {count:,} due streams of queue a")
                t0 = perf_counter()
                fill_due_streams(producer, "a", count)
                fill_s = perf_counter() - t0
                log(f"idle-foreign: one ThreadedWorker of queue b, {window:.0f} s window")
                worker = ThreadedWorker(worker_backend, queues=["b"]).start()
                try:
                    time.sleep(warmup)
                    s0, c0, t0 = command_stats(client), redis_cpu_seconds(client), perf_counter()
                    time.sleep(window)
                    s1, c1, t1 = command_stats(client), redis_cpu_seconds(client), perf_counter()
                finally:
                    worker.stop(timeout=10)
                due = sum(int(client.zcard(producer.keys.ready(s, "a"))) for s in range(producer.keys.shards))
            finally:
                producer.close()
                worker_backend.close()
            out[f"streams_{count}"] = {
                "foreign_due_streams": count,
                "still_due_after": due,
                "fill_seconds": fill_s,
                **redis_load(stats_delta(s0, s1), t1 - t0, c1 - c0),
            }
    finally:
        client.close()
        server.flush()
    base = out[f"streams_{counts[0]}"]
    for r in out.values():
        r["ratio_commands_to_first"] = r["commands_per_s"] / base["commands_per_s"]
        r["ratio_cpu_to_first"] = (
            r["redis_cpu_percent"] / base["redis_cpu_percent"] if base["redis_cpu_percent"] else None
        )
    return out


def report_idle_foreign(report: Report, counts: list[int], r: dict[str, Any]) -> None:
    for count in counts:
        x = r[f"streams_{count}"]
        ratio = "baseline" if count == counts[0] else times(x["ratio_commands_to_first"], f"N={counts[0]:,}")
        cpu = f"Redis CPU {x['redis_cpu_percent']:.2f}%"
        if count != counts[0] and x["ratio_cpu_to_first"] is not None:
            cpu += f" ({times(x['ratio_cpu_to_first'], f'N={counts[0]:,}')})"
        stale = "" if x["still_due_after"] == count else f", ONLY {x['still_due_after']:,} STILL DUE"
        report.row(
            "idle-foreign",
            f"1 idle worker of queue b, N={count:,} due streams of queue a",
            f"{x['commands_per_s']:,.1f} cmd/s",
            f"{ratio}; {x['evalsha_per_s']:.1f} EVALSHA/s, {cpu}{stale}",
        )


def section(run: Run) -> None:
    """Idle cost beside another queue's backlog."""
    report, server, quick = run.report, run.server, run.quick
    foreign = [0, 2_000] if quick else [0, 10_000, 60_000]
    f = measure_idle_foreign(server, foreign, 0.3 if quick else 2.0, 1.0 if quick else 5.0)
    report.data["idle_foreign"] = f
    report_idle_foreign(report, foreign, f)
