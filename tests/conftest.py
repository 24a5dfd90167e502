"""The suite's fixtures: real redis-server processes on free ports, and per-test backends.

The suite never touches a Redis it did not start: every server here runs on a free port
with its own directory and is shut down at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyfiq import RedisQueueBackend
from pyfiq_harness.servers import free_port
from pyfiq_harness.topologies import Cluster
from tests.support.helpers import FAST, drained, unique_prefix, wait_until
from tests.support.servers import RedisServer, require_redis_server

# Names other test modules import from here (the helpers themselves live in tests.support and
# the harness distribution).
pytest_plugins = ["tests.support.markers"]

__all__ = ["FAST", "RedisServer", "drained", "free_port", "unique_prefix", "wait_until"]


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
    require_redis_server()
    cluster = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_backend(redis_cluster: Cluster) -> Iterator[RedisQueueBackend]:
    backend = RedisQueueBackend(redis_cluster.url, cluster=True, prefix=unique_prefix(), **FAST)
    yield backend
    backend.close()


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


os.environ.setdefault("PYFIQ_TEST", "1")
