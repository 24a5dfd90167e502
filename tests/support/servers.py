"""The test suite's redis-server: the harness's ``RedisProcess`` with what tests add (a restart
that keeps the port, a client, and a clear failure when redis-server is missing)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import redis

from pyfiq_harness.servers import RedisProcess

REDIS_SERVER = shutil.which("redis-server")


def require_redis_server() -> None:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed: run scripts/test.sh, which installs it")


class RedisServer(RedisProcess):
    """A redis-server the tests own (see ``RedisProcess``)."""

    def __init__(self, directory: Path, *, appendfsync: str | None = None, clock_shift_ms: int = 0) -> None:
        require_redis_server()
        super().__init__(directory, appendfsync=appendfsync, clock_shift_ms=clock_shift_ms)

    def restart(self, *, kill: bool = False, downtime: float = 0.0) -> None:
        self.stop(kill=kill)
        time.sleep(downtime)
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)
