"""Durable mode on the real cluster: WAIT goes to the node that owns the call's slot, on the
connection that ran the script, and follows the slot when a manual ``CLUSTER FAILOVER`` moves
it (the first call after it meets MOVED)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pyfiq import NotReplicatedError, RedisQueueBackend
from pyfiq.task import TaskRecord
from pyfiq_harness.topologies import Cluster
from tests.support.helpers import FAST, unique_prefix, wait_until

DURABLE = {**FAST, "min_replicas": 1, "replica_timeout": 0.5}


def _items(backend: RedisQueueBackend, n: int, tag: str) -> Any:
    return backend.encode([(f"{tag}{i:031x}", TaskRecord("c.noop", [i], {})) for i in range(n)])


def _two_streams_on_two_primaries(cluster: Cluster, backend: RedisQueueBackend) -> tuple[str, str]:
    owners: dict[int, str] = {}
    for i in range(100):
        stream = f"d{i}"
        owners.setdefault(cluster.primary_of(backend.keys.stream(stream).pending).port, stream)
        if len(owners) >= 2:
            break
    first, second = list(owners.values())[:2]
    return first, second


@pytest.mark.parametrize("side", ["sync", "asyncio"])
def test_a_durable_enqueue_waits_on_the_replica_of_its_own_slot(redis_cluster: Cluster, side: str) -> None:
    backend = RedisQueueBackend(redis_cluster.url, cluster=True, prefix=unique_prefix(), **DURABLE)
    stalled_stream, other_stream = _two_streams_on_two_primaries(redis_cluster, backend)
    primary = redis_cluster.primary_of(backend.keys.stream(stalled_stream).pending)
    replica = redis_cluster.replica_of(primary)

    async def both() -> list[Any]:
        try:
            out: list[Any] = []
            for stream in (other_stream, stalled_stream):
                t0 = time.monotonic()
                try:
                    out.append(
                        (await backend.enqueuer.aenqueue(stream, _items(backend, 1, "a")), time.monotonic() - t0)
                    )
                except NotReplicatedError as exc:
                    out.append((exc, time.monotonic() - t0))
            return out
        finally:
            await backend.aclose()

    def both_sync() -> list[Any]:
        out: list[Any] = []
        for stream in (other_stream, stalled_stream):
            t0 = time.monotonic()
            try:
                out.append((backend.enqueuer.enqueue(stream, _items(backend, 1, "b")), time.monotonic() - t0))
            except NotReplicatedError as exc:
                out.append((exc, time.monotonic() - t0))
        return out

    backend.check_layout()
    replica.pause()
    try:
        (fine, fine_s), (short, short_s) = both_sync() if side == "sync" else asyncio.run(both())
    finally:
        replica.resume()
    backend.close()
    # The other primary's replica answered at once; the stalled one's shortfall was reported.
    assert isinstance(fine, list) and fine_s < 0.3
    assert isinstance(short, NotReplicatedError) and short.replicas == 0 and 0.45 < short_s < 2.0
    assert "ARE stored" in str(short)


def test_durable_calls_follow_a_manual_cluster_failover(redis_cluster: Cluster) -> None:
    backend = RedisQueueBackend(redis_cluster.url, cluster=True, prefix=unique_prefix(), **DURABLE)
    stream = "moved"
    key = backend.keys.stream(stream).pending
    assert backend.enqueuer.enqueue(stream, _items(backend, 1, "c"))
    old = redis_cluster.primary_of(key)
    new = redis_cluster.replica_of(old)
    c = new.client()
    c.cluster("failover")
    c.close()
    wait_until(lambda: redis_cluster.role(new) == "master" and redis_cluster.role(old) == "slave", timeout=15)
    redis_cluster.wait_ready()
    # The backend's slot map still names the old primary: the call meets MOVED and follows it.
    assert backend.enqueuer.enqueue(stream, _items(backend, 1, "d"))
    assert backend.queue_info(stream)["pending"] == 2
    replica = old.client()
    replica.execute_command("READONLY")  # a cluster replica serves reads only when asked to
    assert replica.llen(key) == 2, "confirmed on the old primary, now the replica"
    replica.close()
    backend.close()
