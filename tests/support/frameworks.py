"""What the framework tests share: the test apps' environment, their journal read back per
stream, a worker of the test's own that takes the apps' streams over, and which process holds
which connection to Redis (from /proc, so an inherited socket shows in two processes)."""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from pyfiq import RedisQueueBackend, Registry, ThreadedWorker
from tests.contrib.apps.steps import NAME, QUEUE, read_journal, run_step
from tests.support.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
APPS = ROOT / "tests" / "contrib" / "apps"
#: The apps' settings (tests/contrib/apps/*.py): a worker of the test's must agree with them.
APP_SETTINGS = {"shards": 4, "lease_ttl": 6.0, "poll_interval": 0.2}


def app_env(url: str, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a server running one of the test apps."""
    path = os.pathsep.join([str(APPS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "APP_REDIS_URL": url, "APP_PREFIX": prefix, "PYTHONPATH": path, **extra}


def python() -> str:
    return sys.executable


def per_stream(rows: list[tuple[str, int, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for stream, seq, _ in rows:
        out[stream].append(seq)
    return dict(out)


def take_over(url: str, prefix: str, expected: int) -> float:
    """Start a worker of the test's own on the apps' streams, wait until the journal holds
    ``expected`` steps, stop it; return the seconds from its start to its first step."""
    registry = Registry()
    backend = RedisQueueBackend(url, prefix=prefix, **APP_SETTINGS)  # type: ignore[arg-type]
    registry.configure(backend)
    registry.fifo(queue=QUEUE, name=NAME, key=lambda stream, seq: stream)(
        lambda stream, seq: run_step(url, prefix, stream, seq, 0.0)
    )
    before = len(read_journal(url, prefix))
    assert before < expected, "nothing was left to take over"
    started = time.monotonic()
    worker = ThreadedWorker(backend, registry=registry, concurrency=4).start()
    try:
        wait_until(lambda: len(read_journal(url, prefix)) > before, timeout=15, message="the first step taken over")
        first = time.monotonic() - started
        wait_until(lambda: len(read_journal(url, prefix)) >= expected, timeout=30, message="every step")
    finally:
        assert worker.stop(10)
        backend.close()
    return first


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces: the fields after its closing parenthesis.
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def redis_sockets(pid: int, port: int) -> dict[int, int]:
    """The TCP connections of process ``pid`` to ``port`` on loopback: socket inode -> local port."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    out = {}
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
        if inode in inodes and int(remote.split(":")[1], 16) == port and state == "01":  # ESTABLISHED
            out[inode] = int(local.split(":")[1], 16)
    return out
