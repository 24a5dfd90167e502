"""Keyed streams: order per key, parallel keys, fair yields, a joining replica's share, the
fleet-wide rate limit, idle cost that does not grow with the number of streams, and per-key
order across several processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

import pyfiq
from pyfiq import RedisQueueBackend, ThreadedWorker, current_task, fifo
from pyfiq.ops.scenario_tasks import JOURNAL_ENV, check, read_journal
from tests.support.helpers import FAST, unique_prefix, wait_until
from tests.support.keyed_app import KEYED_QUEUE, keyed_step

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any, str, float, str]] = []
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0

    def run(self, key: str, item: Any, hold: float = 0.0) -> None:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.events.append((key, item, "start", time.monotonic(), current_task().replica))
        if hold:
            time.sleep(hold)
        with self.lock:
            self.running -= 1

    def starts(self, key: str | None = None) -> list[Any]:
        return [i for k, i, _, _, _ in list(self.events) if key is None or k == key]


def qname() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


def stream_count(backend: RedisQueueBackend, queue: str) -> int:
    return sum(1 for s in backend.active_streams() if s.startswith(queue + "#"))


@pytest.fixture
def rb(redis_server) -> RedisQueueBackend:  # type: ignore[no-untyped-def]
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)
    pyfiq.configure(backend)
    return backend


def test_keys_run_in_parallel_and_in_order_per_key(rb: RedisQueueBackend) -> None:
    q, rec = qname(), Recorder()

    @fifo(queue=q, name=f"{q}.work", key=lambda key, seq: key)
    def work(key: str, seq: int) -> None:
        rec.run(key, seq, hold=0.003)

    keys = [f"k{i}" for i in range(20)]
    for seq in range(10):
        for key in keys:
            work(key, seq)
    assert stream_count(rb, q) == 20
    with (
        ThreadedWorker(rb, queues=[q], concurrency=4),
        ThreadedWorker(rb.copy(), queues=[q], concurrency=4),
    ):
        wait_until(lambda: len(rec.starts()) == 200, timeout=30)
    for key in keys:
        assert rec.starts(key) == list(range(10))
    assert rec.max_running > 1, "different keys must run in parallel"
    assert stream_count(rb, q) == 0, "drained streams leave the ready sets"
    assert not [k for k in rb.client.scan_iter(f"{rb.keys.prefix}:*:q:{q}#*")], "and leave no keys"


def test_a_deep_backlog_on_one_key_delays_another_key_by_at_most_one_batch(rb: RedisQueueBackend) -> None:
    q, rec = qname(), Recorder()
    backend = rb.copy(rb.settings.replace(batch_limit=50))

    @fifo(queue=q, name=f"{q}.work", key=lambda key, seq: key)
    def work(key: str, seq: int) -> None:
        rec.run(key, seq)

    work.enqueue_many([("hot", i) for i in range(10_000)], backend=backend)
    with ThreadedWorker(backend, queues=[q], concurrency=1):
        wait_until(lambda: len(rec.starts("hot")) >= 120, timeout=30)
        work("cold", 0)
        before = len(rec.starts("hot"))  # once Redis has accepted the cold task
        wait_until(lambda: rec.starts("cold") == [0], timeout=30)
    order = [key for key, *_ in rec.events]
    overtaken = order.index("cold") - before  # hot tasks that started after cold was enqueued
    # One batch, plus a few starts that race the enqueue's reply; unfair claiming would let
    # whole further batches (or the entire backlog) through.
    assert overtaken <= 50 + 5, f"{overtaken} hot tasks ran before the cold one (batch limit 50)"
    assert rec.starts("hot") == list(range(len(rec.starts("hot"))))


def test_a_joining_replica_takes_a_share_of_the_streams(rb: RedisQueueBackend) -> None:
    q, rec = qname(), Recorder()

    @fifo(queue=q, name=f"{q}.work", key=lambda key, seq: key)
    def work(key: str, seq: int) -> None:
        rec.run(key, seq, hold=0.005)

    work.enqueue_many([(f"k{k}", s) for s in range(30) for k in range(20)])
    first = ThreadedWorker(rb, queues=[q], concurrency=2, replica="first").start()
    try:
        wait_until(lambda: len(rec.starts()) >= 40, timeout=20)
        second = ThreadedWorker(rb.copy(), queues=[q], concurrency=2, replica="second")
        with second:
            wait_until(lambda: len(rec.starts()) == 600, timeout=60)
    finally:
        first.stop()
    by_replica: dict[str, int] = defaultdict(int)
    for *_, replica in rec.events:
        by_replica[replica] += 1
    assert by_replica["second"] >= 600 * 0.15, f"the joining replica ran only {by_replica['second']} of 600"


def test_rate_limit_holds_fleet_wide_and_keeps_order(rb: RedisQueueBackend) -> None:
    q, rec = qname(), Recorder()
    rate = 25.0

    @fifo(queue=q, name=f"{q}.work", key=lambda key, seq: key, rate_limit=rate)
    def work(key: str, seq: int) -> None:
        rec.run(key, seq)

    work.enqueue_many([(f"k{k}", s) for s in range(15) for k in range(4)])
    with (
        ThreadedWorker(rb, queues=[q], concurrency=4),
        ThreadedWorker(rb.copy(), queues=[q], concurrency=4),
    ):
        wait_until(lambda: len(rec.starts()) == 60, timeout=30)
    times = sorted(e[3] for e in rec.events)
    # In any window of one second at most rate (+1 for the window's edge) tasks started.
    worst = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    assert worst <= rate + 1, f"{worst} starts within one second, limit {rate}/s"
    assert times[-1] - times[0] >= (60 - 1) / rate * 0.9
    for k in range(4):
        assert rec.starts(f"k{k}") == list(range(15))


def test_idle_cost_does_not_grow_with_the_number_of_streams(rb: RedisQueueBackend) -> None:
    q, rec = qname(), Recorder()

    @fifo(queue=q, name=f"{q}.work", key=lambda key: key)
    def work(key: str) -> None:
        rec.run(key, None)

    def idle_commands_per_second(seconds: float = 2.0) -> float:
        def total() -> int:
            stats = rb.client.info("commandstats")
            return sum(int(v["calls"]) for v in stats.values())

        before = total()
        time.sleep(seconds)
        return (total() - before - 1) / seconds  # minus the INFO call itself

    with ThreadedWorker(rb, queues=[q], concurrency=8):
        time.sleep(0.5)
        baseline = idle_commands_per_second()
        work.enqueue_many([(f"c{i}",) for i in range(10_000)])
        wait_until(lambda: len(rec.starts()) == 10_000, timeout=120)
        wait_until(lambda: stream_count(rb, q) == 0, timeout=10)
        time.sleep(0.5)
        after = idle_commands_per_second()
    assert after <= baseline * 1.5 + 5, f"idle cost {after:.1f}/s after 10,000 streams vs {baseline:.1f}/s before"
    assert not [k for k in rb.client.scan_iter(f"{rb.keys.prefix}:*:q:{q}#*", count=1000)]


def test_per_key_order_across_processes(redis_server: Any, tmp_path: Path) -> None:
    prefix, journal = unique_prefix(), tmp_path / "journal.jsonl"
    env = {**os.environ, JOURNAL_ENV: str(journal), "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable, "-m", "pyfiq", "worker", "--redis", redis_server.url, "--prefix", prefix,
        "--shards", "4", "--import", "tests.support.keyed_app", "--queues", KEYED_QUEUE,
        "--lease-ttl", "1.5", "--poll-interval", "0.2", "--concurrency", "3", "--log-level", "warning",
    ]  # fmt: skip
    procs = [
        subprocess.Popen([*argv, "--name", f"r{i}"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL) for i in range(3)
    ]
    try:
        backend = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4, lease_ttl=1.5, poll_interval=0.2)
        keys = [f"acct-{i}" for i in range(12)]
        accepted: dict[str, list[int]] = {f"{KEYED_QUEUE}#{k}": [] for k in keys}
        for seq in range(15):
            for k in keys:
                keyed_step.send_with_options(args=(seq, k), kwargs={"hold": 0.002}, backend=backend)
                accepted[f"{KEYED_QUEUE}#{k}"].append(seq)
        wait_until(
            lambda: sum(e["event"] == "end" for e in read_journal(journal)) == 180, timeout=60, message="all ran"
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    entries = read_journal(journal)
    report = check(entries, accepted)
    assert report.ok, report.lines()
    assert report.executions == 180 and report.reexecutions == 0
    assert len({e["pid"] for e in entries}) >= 2, "the keys were spread over several processes"
