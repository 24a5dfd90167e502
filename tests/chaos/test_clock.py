"""The fencing token across Redis restarts with a wrong clock (the clock shim, pyfiq_harness/clock_shift.c).

The claim under test (docs/guarantees.md, G2): the fencing token rises as long as the shard's counter survives;
if the counter is lost (a failover that loses writes, an empty restart) it still rises provided
the new Redis's clock is ahead of the old tokens' time. The second half has a limit, and the
tests pin it down: a lost counter and a clock that lags let the token go backwards.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyfiq import RedisQueueBackend
from pyfiq.task import TaskRecord, new_task_id
from pyfiq_harness.clock import build_clock_shim
from tests.support.helpers import unique_prefix
from tests.support.servers import RedisServer

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the clock shim is an LD_PRELOAD library (Linux)")

LAG_MS = -5000


def redis_clock_offset(server: RedisServer) -> float:
    """Seconds Redis's clock is ahead of this process's (negative: behind)."""
    client = server.client()
    try:
        sec, usec = client.time()
    finally:
        client.close()
    return sec + usec / 1e6 - time.time()


def lease_once(backend: RedisQueueBackend, stream: str) -> int:
    """Enqueue one task, take the stream's lease with it, acknowledge it (the stream drains
    and leaves no key behind but the shard's counter); returns the lease's fencing token."""
    task_id = new_task_id()
    backend.enqueue(stream, [(task_id, TaskRecord("t", [], {}))])
    ops = backend.ops
    sent_at = time.monotonic()
    lease = ops.parse_acquire(stream, backend.call(ops.acquire(stream, 1)), threading.Event(), sent_at)
    assert lease is not None, "the stream was not claimable"
    assert [entry.id for entry, _ in lease.initial] == [task_id]
    assert int(backend.call(ops.take(lease, [task_id], 1))[0]) == 0  # drained
    return lease.fence


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "aof", appendfsync="always").start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def volatile_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "volatile", appendfsync=None).start()
    yield server
    server.stop(kill=True)


def test_the_shim_shifts_redis_wall_clock(tmp_path: Path) -> None:
    build_clock_shim()
    server = RedisServer(tmp_path / "shifted", clock_shift_ms=LAG_MS).start()
    try:
        assert -5.5 < redis_clock_offset(server) < -4.5
        # What an operator would see, through redis-cli.
        out = subprocess.run(
            ["redis-cli", "-p", str(server.port), "TIME"], capture_output=True, text=True, timeout=10, check=True
        )
        sec, usec = (int(v) for v in out.stdout.split())
        assert -5.5 < sec + usec / 1e6 - time.time() < -4.5
        # Key expiry runs on the same clock, relative TTLs are still honoured.
        client = server.client()
        client.set("k", "v", px=60_000)
        assert 59_000 < client.pttl("k") <= 60_000
        client.close()
    finally:
        server.stop(kill=True)
    server.start(clock_shift_ms=0)
    try:
        assert abs(redis_clock_offset(server)) < 0.5
    finally:
        server.stop(kill=True)


def test_token_rises_across_a_restart_with_a_lagging_clock_when_the_counter_survives(
    aof_server: RedisServer,
) -> None:
    backend = RedisQueueBackend(aof_server.url, prefix=unique_prefix(), shards=2)
    try:
        before = lease_once(backend, "clock")
        aof_server.stop()  # graceful: the AOF (appendfsync always) keeps the shard's counter
        aof_server.start(clock_shift_ms=LAG_MS)
        assert redis_clock_offset(aof_server) < -4.5
        after = lease_once(backend, "clock")
        assert after > before, (before, after)
        # A token from the clock would now be 5 s behind: the counter carried it.
        assert after - before < 1_000_000
        again = lease_once(backend, "clock")
        assert again > after
    finally:
        backend.close()


def test_token_with_a_lost_counter_rises_only_if_the_new_clock_is_ahead(volatile_server: RedisServer) -> None:
    backend = RedisQueueBackend(volatile_server.url, prefix=unique_prefix(), shards=2)
    try:
        before = lease_once(backend, "clock")

        # An empty restart (no persistence): the counter is gone, and the clock lags 5 s.
        volatile_server.stop()
        volatile_server.start(clock_shift_ms=LAG_MS)
        assert volatile_server.client().dbsize() == 0
        lagging = lease_once(backend, "clock")
        assert lagging <= before, (
            "documented limit: with the counter lost, a token comes from Redis's clock, which here "
            f"lags the old tokens' time (before {before}, after {lagging})"
        )

        # The same loss on a Redis whose clock is right: the token rises again.
        volatile_server.stop()
        volatile_server.start(clock_shift_ms=0)
        assert volatile_server.client().dbsize() == 0
        backend.close()
        backend = RedisQueueBackend(volatile_server.url, prefix=unique_prefix(), shards=2)
        right = lease_once(backend, "clock")
        assert right > before, (before, right)
    finally:
        backend.close()
