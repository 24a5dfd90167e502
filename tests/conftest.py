"""Test harness: real redis-server processes on free ports, and per-test backends.

The suite never touches a Redis it did not start: every server here runs on a free port
with its own directory and is shut down at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pyfiq import RedisQueueBackend
from pyfiq.chaos.runner import RedisProcess
from tests.servers import Cluster

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer(RedisProcess):
    """A redis-server the tests own (see ``RedisProcess``), with what tests add: a restart
    that keeps the port, a client, and a clear failure when redis-server is missing."""

    def __init__(self, directory: Path, *, appendfsync: str | None = None, clock_shift_ms: int = 0) -> None:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed: run scripts/test.sh, which installs it")
        super().__init__(directory, appendfsync=appendfsync, clock_shift_ms=clock_shift_ms)

    def restart(self, *, kill: bool = False, downtime: float = 0.0) -> None:
        self.stop(kill=kill)
        time.sleep(downtime)
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test that restarts or kills it (AOF everysec)."""
    server = RedisServer(tmp_path / "redis", appendfsync="everysec").start()
    yield server
    server.stop(kill=True)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Redis Cluster of 3 primaries and 3 replicas, started once for the whole session."""
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed: run scripts/test.sh, which installs it")
    cluster = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_backend(redis_cluster: Cluster) -> Iterator[RedisQueueBackend]:
    backend = RedisQueueBackend(redis_cluster.url, cluster=True, prefix=unique_prefix(), **FAST)
    yield backend
    backend.close()


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


FAST = {"lease_ttl": 1.5, "poll_interval": 0.2, "shards": 4}


@pytest.fixture
def redis_backend(redis_server: RedisServer) -> Iterator[RedisQueueBackend]:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)
    yield backend
    backend.close()


@pytest.fixture(params=["redis", "memory"])
def backend(request: pytest.FixtureRequest) -> Iterator[RedisQueueBackend]:
    """The same behaviour suite against a real redis-server and the embedded memory:// one."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        b = RedisQueueBackend(server.url, prefix=unique_prefix(), **FAST)
    else:
        b = RedisQueueBackend(f"memory://{uuid.uuid4().hex}", prefix=unique_prefix(), **FAST)
    yield b
    b.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for: {message or predicate}")
        time.sleep(interval)


def drained(backend: RedisQueueBackend, *streams: str) -> bool:
    for s in streams:
        info = backend.queue_info(s)
        if info["pending"] or info["inflight"]:
            return False
    return True


os.environ.setdefault("PYFIQ_TEST", "1")
