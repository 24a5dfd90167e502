"""What durable mode (``Settings(min_replicas=1)``) costs, as ratios to the same operation
without it, measured in one run on one primary with one replica (private ``redis-server``
processes on free loopback ports, no persistence).

Each measurement alternates plain and durable rounds so that drift on a shared machine hits
both alike; the ratio is of the medians. Measured: one producer enqueuing one task at a time,
``enqueue_many`` of 100, 16 producer threads, and a threaded worker draining a queue of no-op
tasks (default ``ack_mode="group"``, whose background takes also wait for the replica).

    python -m benchmarks.durable            # about a minute (or: python scripts/bench_durable.py)
    python -m benchmarks.durable --quick    # a few seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

import pyfiq
from pyfiq import RedisQueueBackend, Settings, ThreadedWorker, fifo
from pyfiq_harness.servers import free_ports

DONE = threading.Event()
COUNT = [0, 0]  # tasks run, tasks wanted


class Pair:
    """A primary and one replica of it, linked."""

    def __init__(self, directory: Path) -> None:
        self.ports = free_ports(2)
        self.procs: list[subprocess.Popen[bytes]] = []
        for i, port in enumerate(self.ports):
            d = directory / str(port)
            d.mkdir()
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d)]
            argv += ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
            if i:
                argv += ["--replicaof", "127.0.0.1", str(self.ports[0])]
            self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
        replica = redis.Redis(port=self.ports[1])
        deadline = time.monotonic() + 30
        while True:
            try:
                if replica.info("replication").get("master_link_status") == "up":
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the replica never linked to the primary")
            time.sleep(0.05)
        replica.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def flush(self) -> None:
        c = redis.Redis(port=self.ports[0])
        c.flushall()
        c.close()

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(10)


@fifo(queue="bench-durable", name="bench_durable.noop")
def noop(i: int) -> None:
    COUNT[0] += 1
    if COUNT[0] >= COUNT[1]:
        DONE.set()


def rate(fn: Callable[[], object], seconds: float, per_call: int = 1) -> float:
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        fn()
        n += per_call
    return n / elapsed


def threads_rate(seconds: float, threads: int) -> float:
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def produce(slot: int) -> None:
        while time.perf_counter() < stop:
            noop(slot)
            counts[slot] += 1

    t0 = time.perf_counter()
    workers = [threading.Thread(target=produce, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - t0)


def drain_rate(backend: RedisQueueBackend, tasks: int) -> float:
    noop.enqueue_many([(i,) for i in range(tasks)], backend=backend)
    COUNT[:] = [0, tasks]
    DONE.clear()
    t0 = time.perf_counter()
    worker = ThreadedWorker(backend, queues=["bench-durable"]).start()
    try:
        if not DONE.wait(120):
            raise RuntimeError(f"drain timed out after {COUNT[0]} of {tasks} tasks")
        return tasks / (time.perf_counter() - t0)
    finally:
        worker.stop(10)


def one_round(pair: Pair, durable: bool, seconds: float, tasks: int) -> dict[str, float]:
    extra: dict[str, Any] = {"min_replicas": 1, "replica_timeout": 1.0} if durable else {}
    backend = RedisQueueBackend(pair.url, Settings(prefix=f"b{uuid.uuid4().hex[:8]}", **extra))
    pyfiq.configure(backend)
    try:
        noop(0)  # the layout check and the script load are not measured
        counter = itertools.count()
        out = {"single": rate(lambda: noop(next(counter)), seconds)}
        batch = [(i,) for i in range(100)]
        out["enqueue_many_100"] = rate(lambda: noop.enqueue_many(batch), seconds, per_call=100)
        out["threads_16"] = threads_rate(seconds, 16)
        pair.flush()
        out["drain"] = drain_rate(backend, tasks)
        return out
    finally:
        backend.close()
        pair.flush()


def measure(pair: Pair, rounds: int, seconds: float, tasks: int) -> dict[str, Any]:
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(rounds):
        for durable in (False, True):
            runs[durable].append(one_round(pair, durable, seconds, tasks))
    out: dict[str, Any] = {}
    for name in runs[False][0]:
        plain = statistics.median(r[name] for r in runs[False])
        waited = statistics.median(r[name] for r in runs[True])
        out[name] = {"plain_per_s": plain, "durable_per_s": waited, "ratio": waited / plain}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    p.add_argument("--json", default="bench-durable.json", help="where to write the results")
    args = p.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    rounds, seconds, tasks = (1, 0.3, 200) if args.quick else (3, 2.0, 5000)
    with tempfile.TemporaryDirectory() as tmp:
        pair = Pair(Path(tmp))
        try:
            results = {"rounds": rounds, "seconds": seconds, "tasks": tasks, **measure(pair, rounds, seconds, tasks)}
        finally:
            pair.stop()
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"{'operation':<18} {'plain /s':>10} {'durable /s':>11} {'ratio':>7}")
    for name in ("single", "enqueue_many_100", "threads_16", "drain"):
        r = results[name]
        print(f"{name:<18} {r['plain_per_s']:>10,.0f} {r['durable_per_s']:>11,.0f} {r['ratio']:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
