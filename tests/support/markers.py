"""Marks every test by what it needs, so a run can choose: ``unit`` (no server, no process, no
whole worker), ``worker`` (whole workers with their threads and timers, on ``memory://``),
``redis`` (a real redis-server), ``process`` (starts other OS processes), ``cluster`` (the
session's Redis Cluster), ``browser`` (headless Chromium). The fast subset is ``-m unit``.

Marks come from what a test really uses (its fixtures, its parameters, what its module starts), so
a new test is marked without anyone remembering to: a test that starts a process or a server in a
module that does so is never counted as a unit test."""

from __future__ import annotations

import inspect
import re
from functools import cache
from pathlib import Path

import pytest

KINDS = ("unit", "worker", "redis", "process", "cluster", "browser")

#: Fixtures that start a redis-server (directly or through another fixture).
REDIS_FIXTURES = frozenset(
    {
        "redis_server",
        "own_redis",
        "redis_backend",
        "private_redis",
        "aof_server",
        "volatile_server",
        "acl_server",
        "tls",
        "unix_socket",
        "replicated",
        "sentinels",
        "rbackend",
        "rb",
    }
)
CLUSTER_FIXTURES = frozenset({"redis_cluster", "cluster_backend", "restored"})
BROWSER_FIXTURES = frozenset({"browser", "page"})
#: What a module that starts processes or servers of its own contains.
PROCESS_SOURCE = re.compile(
    r"\b(subprocess|Popen|multiprocessing|os\.fork|RedisServer\(|Node\(|Sentinels\(|run_enqueue_drill|run_time_drill)"
)


#: What a test that runs whole workers (threads, heartbeats, real waits) contains.
WORKER_SOURCE = re.compile(r"\b(ThreadedWorker|AsyncWorker|threaded_worker|async_worker|start_worker|drain)\b")


def _runs_workers(item: pytest.Item) -> bool:
    if "start_worker" in getattr(item, "fixturenames", ()):
        return True
    function = getattr(item, "function", None)
    try:
        return function is not None and bool(WORKER_SOURCE.search(inspect.getsource(function)))
    except (OSError, TypeError):
        return False


@cache
def _starts_processes(path: Path) -> bool:
    return bool(PROCESS_SOURCE.search(path.read_text()))


def kinds_of(item: pytest.Item) -> set[str]:
    names = set(getattr(item, "fixturenames", ()))
    found: set[str] = set()
    if names & BROWSER_FIXTURES:
        found.add("browser")
    if names & CLUSTER_FIXTURES or "cluster" in Path(str(item.fspath)).parts:
        found.add("cluster")
    # A parametrized test's id names its backend (``[redis-threaded]``, ``[memory-asyncio]``).
    params = getattr(getattr(item, "callspec", None), "id", "").lower()
    if names & REDIS_FIXTURES or "redis" in params:
        found.add("redis")
    if _starts_processes(Path(str(item.fspath))):
        found.add("process")
    if not found and _runs_workers(item):
        found.add("worker")
    return found or {"unit"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in kinds_of(item):
            item.add_marker(getattr(pytest.mark, kind))
