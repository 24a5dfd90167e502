"""The peers (RQ, Dramatiq, Huey), each draining the same no-op tasks in a child process."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import redis

from .ceiling import evalsha_rate
from .harness import CHILD, ROOT, TALLY, RedisServer, Report, Run, end, log, peer_task, per_s, spawn, times

Drain = Callable[[float], tuple[float, int]]


def peer_rq(url: str, n: int) -> Drain:
    from rq import Queue, SimpleWorker

    conn = redis.Redis.from_url(url)
    queue = Queue("bench", connection=conn)
    for start in range(0, n, 1000):
        queue.enqueue_many([Queue.prepare_data(peer_task, (i,)) for i in range(start, min(n, start + 1000))])

    def drain(timeout: float) -> tuple[float, int]:
        worker = SimpleWorker([queue], connection=conn)
        t0 = perf_counter()
        worker.work(burst=True, logging_level="ERROR", max_jobs=n)
        return perf_counter() - t0, TALLY.count

    return drain


def peer_dramatiq(url: str, n: int) -> Drain:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url)
    dramatiq.set_broker(broker)
    actor = dramatiq.actor(peer_task, actor_name="bench_noop", queue_name="bench", max_retries=0)
    for i in range(n):
        actor.send(i)

    def drain(timeout: float) -> tuple[float, int]:
        worker = dramatiq.Worker(broker, worker_threads=1)  # prefetch: $dramatiq_queue_prefetch
        t0 = perf_counter()
        worker.start()
        TALLY.done.wait(timeout)
        elapsed = perf_counter() - t0
        worker.stop()
        return elapsed, TALLY.count

    return drain


def peer_huey(url: str, n: int) -> Drain:
    from huey import RedisHuey

    huey = RedisHuey("bench", url=url)
    task = huey.task(name="bench_noop")(peer_task)
    for i in range(n):
        task(i)

    def drain(timeout: float) -> tuple[float, int]:
        consumer = huey.create_consumer(workers=1, worker_type="thread", periodic=False, check_worker_health=False)
        t0 = perf_counter()
        consumer.start()
        TALLY.done.wait(timeout)
        elapsed = perf_counter() - t0
        consumer.stop(graceful=True)
        return elapsed, TALLY.count

    return drain


PEER_SETUPS: dict[str, Callable[[str, int], Drain]] = {"rq": peer_rq, "dramatiq": peer_dramatiq, "huey": peer_huey}


def run_peers(report: Report, server: RedisServer, n: int, ceiling_s: float, logdir: Path) -> dict[str, Any]:
    variants = (
        ("rq", "rq", "SimpleWorker, burst", None),
        ("dramatiq", "dramatiq", "1 thread, default prefetch", None),
        ("dramatiq_prefetch_100", "dramatiq", "1 thread, prefetch 100", "100"),
        ("huey", "huey", "RedisHuey, 1 thread worker", None),
    )
    out: dict[str, Any] = {}
    timeout = 60 + n / 100
    for label, package, desc, prefetch in variants:
        if importlib.util.find_spec(package) is None:
            log(f"peer {label}: not installed")
            out[label] = {"skipped": "not installed"}
            report.row("peers", f"{package} ({desc})", "not installed")
            continue
        log(f"peer {label}: {n} tasks")
        server.flush()
        env = {k: v for k, v in os.environ.items() if k != "dramatiq_queue_prefetch"}
        if prefetch is not None:
            env["dramatiq_queue_prefetch"] = prefetch
        argv = [*CHILD, "--child", "peer", "--peer", package, "--url", server.url]
        argv += ["--tasks", str(n), "--timeout", str(timeout), "--ceiling-seconds", str(ceiling_s)]
        with open(logdir / f"peer-{label}.log", "wb") as err:
            proc = spawn(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, env=env)
            try:
                stdout, _ = proc.communicate(timeout=timeout + 120)
                result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                result = {"error": "timeout"}
            except (ValueError, IndexError):
                result = {"error": f"failed (exit {proc.returncode}), see {err.name}"}
            finally:
                end(proc, kill=True)
        server.flush()
        if "tasks_per_s" in result:
            incomplete = "" if result["tasks"] >= n else f" ({result['tasks']}/{n} done)"
            report.row(
                "peers",
                f"{package} ({desc}){incomplete}",
                per_s(result["tasks_per_s"]),
                times(result["ratio_to_ceiling"], "ceiling"),
            )
        else:
            report.row("peers", f"{package} ({desc})", result["error"])
        out[label] = result
    return out


def child_peer(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    drain = PEER_SETUPS[args.peer](args.url, args.tasks)  # enqueues, untimed
    ceiling_before = evalsha_rate(args.url, args.ceiling_seconds)
    TALLY.reset(args.tasks)
    elapsed, count = drain(args.timeout)
    ceiling = (ceiling_before + evalsha_rate(args.url, args.ceiling_seconds)) / 2
    rate = count / elapsed
    result = {"tasks": count, "seconds": elapsed, "tasks_per_s": rate, "ceiling_around": ceiling}
    print(json.dumps({**result, "ratio_to_ceiling": rate / ceiling}), flush=True)


def section(run: Run) -> None:
    """The peers' drains, and pyfiq's best drain over the fastest of them."""
    report, server, n, ceiling_s, workdir = run.report, run.server, run.n, run.ceiling_s, run.workdir
    peers = run_peers(report, server, n, ceiling_s, workdir)
    report.data["peers"] = peers
    done = {k: v for k, v in peers.items() if "tasks_per_s" in v}
    drains = list(report.data.get("drain", {}).values())
    if done and drains:
        fastest = max(done, key=lambda k: done[k]["tasks_per_s"])
        best = max(drains, key=lambda r: r["tasks_per_s"])
        raw = best["tasks_per_s"] / done[fastest]["tasks_per_s"]
        normalized = best["ratio_to_ceiling"] / done[fastest]["ratio_to_ceiling"]
        report.data["peers_summary"] = {
            "fastest_peer": fastest,
            "pyfiq_best_over_fastest": raw,
            "pyfiq_best_over_fastest_by_ceiling_ratio": normalized,
        }
        report.row(
            "peers",
            f"pyfiq best drain (prefetch={best['prefetch']}) / fastest peer ({fastest})",
            f"{raw:.2f}x",
            f"{normalized:.2f}x comparing ceiling ratios",
        )
