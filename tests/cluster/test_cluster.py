"""pyfiq on a real Redis Cluster (3 primaries, 3 replicas, started once per session): every
script call stays in one slot and the shards spread over every primary; wake-ups travel on
each shard's sharded channel; a primary SIGKILLed under load is ridden out by producers and
both drivers; the CLI runs a worker process on the cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

import pyfiq
from pyfiq import AsyncWorker, RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.engine.lease import Lease
from pyfiq.errors import EnqueueOutcomeUnknown
from pyfiq.task import Entry
from pyfiq_harness.topologies import Cluster
from tests.support.helpers import FAST, ProducerLoop, unique_prefix, wait_until
from tests.workers.test_worker import AsyncWorkerInThread

ROOT = Path(__file__).parents[2]


def _slots(keys: list[str]) -> set[int]:
    return {key_slot(k.encode()) for k in keys}


def test_every_script_call_touches_one_slot_and_the_shards_spread_over_every_primary(redis_cluster: Cluster) -> None:
    backend = RedisQueueBackend(redis_cluster.url, cluster=True, prefix=unique_prefix(), shards=16)
    ops, keys = backend.ops, backend.keys
    entry = Entry.load(b"0" * 32 + b"|1|0|x")
    for stream in ["billing", "webhooks#c-1", "webhooks#c-2", "a:b/c@d-e", *(f"q#{i}" for i in range(50))]:
        k = keys.stream(stream)
        lease = Lease(stream, k, "1:n", 1, threading.Event(), ttl=1.0)
        calls = [
            ops.enqueue(stream, [("a" * 32, 0, "0", b"x")], ["d1"]),
            ops.acquire(stream, 1),
            ops.renew(lease),
            ops.take(lease, ["a" * 32], 1),
            ops.dead_letter(lease, [], "a" * 32, "{}"),
            ops.release(lease, []),
            ops.lost(lease, entry),
            ops.skip(stream, "{}"),
            ops.requeue(stream, front=False, limit=1),
            ops.delete_pending(stream, "a" * 32),
            ops.dead_letter_pending(stream, "a" * 32, "{}"),
            ops.due(k.shard, 1, ["billing"]),
        ]
        for call in calls:
            # The wake-up channel a script publishes on must be in the same slot as its keys.
            channels = [a for a in call.args if isinstance(a, str) and a.endswith(":wake")]
            assert len(_slots(call.keys + channels)) == 1, (call.script, call.keys, channels)
    owners = {redis_cluster.primary_of(keys.epoch(shard)).port for shard in range(keys.shards)}
    assert len(owners) == 3, "the 16 shards must not funnel through fewer nodes than the cluster has"
    backend.close()


@pytest.fixture(params=["threaded", "asyncio"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_wake_ups_travel_on_each_shards_sharded_channel(redis_cluster: Cluster, driver: str) -> None:
    # A 30 s safety poll: a task that starts within a second was woken, not polled for.
    settings = {**FAST, "poll_interval": 30}
    backend = RedisQueueBackend(redis_cluster.url, cluster=True, prefix=unique_prefix(), **settings)
    pyfiq.configure(backend)
    q, started = f"wake-{driver}", threading.Event()

    @fifo(queue=q, name=f"{q}.ping")
    def ping() -> None:
        started.set()

    if driver == "threaded":
        worker: Any = ThreadedWorker(backend, queues=[q])
    else:
        worker = AsyncWorkerInThread(backend.copy(), queues=[q])
    worker.start()
    try:
        channel = backend.keys.wake(backend.keys.stream(q).shard)
        owner = redis_cluster.primary_of(channel).client()
        wait_until(lambda: dict(owner.pubsub_shardnumsub(channel)).get(channel.encode(), 0) > 0, timeout=10)
        for node in redis_cluster.live():
            c = node.client()
            assert dict(c.pubsub_numsub(f"{backend.keys.prefix}:wake"))[f"{backend.keys.prefix}:wake".encode()] == 0
            c.close()
        time.sleep(0.5)  # past the worker's first look, which every start makes
        sent = time.monotonic()
        ping()
        assert started.wait(5), "the wake-up never arrived"
        assert time.monotonic() - sent < 1.0
    finally:
        worker.stop(5)
        if isinstance(worker, AsyncWorkerInThread):
            worker.close()
        backend.close()


class Producer(ProducerLoop):
    """Enqueues ``(key, n)`` to a keyed queue as fast as Redis accepts, recording each
    acknowledged enqueue with the time Redis's reply arrived."""

    def __init__(self, send: Any, keys: int) -> None:
        self.send, self.keys = send, keys
        self.acked: list[tuple[str, int, float]] = []
        self.errors = []
        self._loop()

    def step(self, n: int) -> None:
        key = f"k{n % self.keys}"
        self.send(key, n)
        self.acked.append((key, n, time.monotonic()))


@pytest.fixture
def restored(redis_cluster: Cluster) -> Iterator[Cluster]:
    """The session cluster, put back together after a test kills one of its nodes: the node is
    restarted (it rejoins as a replica) and the cluster is ready again."""
    yield redis_cluster
    for node in redis_cluster.nodes:
        if not node.alive:
            node.start()
    redis_cluster.wait_ready(60)


def test_a_primary_sigkilled_under_load_is_ridden_out_by_producers_and_both_drivers(restored: Cluster) -> None:
    backend = RedisQueueBackend(restored.url, cluster=True, prefix=unique_prefix(), **FAST)
    pyfiq.configure(backend)
    q, runs, lock = "failover", [], threading.Lock()

    @fifo(queue=q, name=f"{q}.step", key=lambda key, n: key)
    def step(key: str, n: int) -> None:
        with lock:
            runs.append((key, n))

    threaded = ThreadedWorker(backend, queues=[q], concurrency=4).start()
    aio = AsyncWorkerInThread(backend.copy(), queues=[q], concurrency=4).start()
    victim = restored.primary_of(backend.keys.stream(f"{q}#k0").ready)
    try:
        with Producer(step, keys=6) as producer:
            time.sleep(1.0)
            killed_at = time.monotonic()
            victim.kill()
            wait_until(lambda: _promoted(restored), timeout=20, message="a replica promoted")
            promoted_at = time.monotonic()
            # Producers must go on after the promotion: a count, not a rate (a loaded CI machine
            # sends fewer per second, which says nothing about riding out the failover).
            wait_until(
                lambda: sum(1 for _, _, t in list(producer.acked) if t > promoted_at) > 100,
                timeout=30,
                message="enqueues acknowledged after the promotion",
            )
        acked = list(producer.acked)
        wait_until(lambda: _ran_all(runs, lock, acked, after=promoted_at), timeout=30, message="post-failover tasks")
        time.sleep(1.0)  # anything still to come from before the kill
    finally:
        threaded.stop(5)
        aio.stop(5)
        aio.close()
        backend.close()
    with lock:
        ran = set(runs)
        first = list(dict.fromkeys(runs))
    lost = [(k, n, t) for k, n, t in acked if (k, n) not in ran]
    # Asynchronous replication can lose what the dead primary acknowledged but had not yet sent
    # to its replica: only the last moments before the kill.
    assert all(t > killed_at - 0.1 for _, _, t in lost), f"lost tasks acknowledged well before the kill: {lost[:5]}"
    # The one error allowed is the truthful one: an enqueue whose request the kill caught in
    # flight may or may not have been applied, and is never re-sent blindly.
    unexpected = [e for e in producer.errors if not isinstance(e, EnqueueOutcomeUnknown)]
    assert unexpected == [], "enqueues ride out the failover within enqueue_timeout"
    for key in {k for k, _, _ in acked}:
        order = [n for k, n in first if k == key]
        assert order == sorted(order), f"first executions of {key} out of acceptance order"
    assert sum(1 for _, _, t in acked if t > promoted_at) > 100


def _promoted(cluster: Cluster) -> bool:
    live = cluster.live()
    return sum(1 for n in live if cluster.role(n) == "master") == 3 and all(
        n.client().cluster("info")["cluster_state"] == "ok" for n in live
    )


def _ran_all(runs: list[tuple[str, int]], lock: threading.Lock, acked: list[Any], after: float) -> bool:
    with lock:
        ran = set(runs)
    return all((k, n) in ran for k, n, t in acked if t > after)


def test_the_cli_runs_a_worker_process_on_the_cluster(redis_cluster: Cluster, tmp_path: Path) -> None:
    prefix = unique_prefix()
    (tmp_path / "cluster_tasks.py").write_text(
        "from pyfiq import fifo\n"
        f"@fifo(queue='cli-q', name='cli.write')\n"
        "def write(i):\n"
        f"    open({str(tmp_path / 'out.txt')!r}, 'a').write(f'{{i}}\\n')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    argv = [sys.executable, "-m", "pyfiq", "--cluster", "--redis", redis_cluster.url, "--prefix", prefix]
    proc = subprocess.Popen([*argv, "worker", "cluster_tasks", "--shards", "4"], env=env, cwd=tmp_path)
    try:
        backend = RedisQueueBackend(redis_cluster.url, cluster=True, prefix=prefix, shards=4)
        sys.path.insert(0, str(tmp_path))
        import cluster_tasks  # type: ignore[import-not-found]

        pyfiq.configure(backend)
        for i in range(20):
            cluster_tasks.write(i)
        out = tmp_path / "out.txt"
        wait_until(lambda: out.exists() and len(out.read_text().split()) == 20, timeout=20)
        assert out.read_text().split() == [str(i) for i in range(20)]
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        sys.path.remove(str(tmp_path))
    status = subprocess.run([*argv, "status", "--json"], env=env, capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr


def test_asyncio_worker_context_on_the_cluster_closes_its_clients(redis_cluster: Cluster) -> None:
    import asyncio

    backend = RedisQueueBackend(redis_cluster.url, cluster=True, prefix=unique_prefix(), **FAST)

    async def main() -> None:
        async with AsyncWorker(backend, queues=["nothing"]):
            await asyncio.sleep(0.3)
        await backend.aclose()

    asyncio.run(main())
    assert backend.ping()
    backend.close()
