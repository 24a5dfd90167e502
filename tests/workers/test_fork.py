"""Workers and forks: a pre-fork server (gunicorn --preload, uWSGI) imports the app once and
forks the serving processes from it. Threads do not cross a fork, so each child must start a
worker of its own, and nothing a child does may act for the worker its parent still runs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pyfiq import RedisQueueBackend, Registry, ThreadedWorker
from pyfiq.contrib.embedded import EmbeddedWorker
from pyfiq.errors import ConfigurationError
from tests.conftest import RedisServer
from tests.support.helpers import FAST, unique_prefix, wait_until


@pytest.fixture
def deployment(redis_server: RedisServer) -> Iterator[tuple[RedisQueueBackend, Registry, str]]:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)
    registry = Registry()
    registry.configure(backend)
    yield backend, registry, f"{backend.keys.prefix}:journal"
    backend.close()


def in_child(body: Callable[[], int]) -> int:
    """Run ``body`` in a forked child; its return value is the child's exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 3
        try:
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def journal_task(registry: Registry, url: str, journal: str, release: threading.Event | None = None):  # type: ignore[no-untyped-def]
    """A task that appends ``(stream, seq, pid)`` to the journal list."""

    @registry.fifo(queue="forks", name="forks.step", key=lambda s, i: s)
    def step(stream: str, i: int) -> None:
        if release is not None:
            release.wait(10)
        client = redis.Redis.from_url(url)
        client.rpush(journal, f"{stream}:{i}:{os.getpid()}")
        client.close()

    return step


def entries(url: str, journal: str) -> list[tuple[str, int, int]]:
    client = redis.Redis.from_url(url)
    try:
        return [(s, int(i), int(p)) for s, i, p in (e.decode().split(":") for e in client.lrange(journal, 0, -1))]
    finally:
        client.close()


def test_a_worker_built_before_a_fork_and_started_after_it_is_the_childs_own(
    deployment: tuple[RedisQueueBackend, Registry, str], redis_server: RedisServer
) -> None:
    backend, registry, journal = deployment
    step = journal_task(registry, redis_server.url, journal)
    worker = ThreadedWorker(backend, registry=registry, concurrency=2)
    parents_replica = worker.replica
    for i in range(10):
        step("a", i)

    def child() -> int:
        worker.start()
        try:
            if worker.replica == parents_replica or f":{os.getpid()}:" not in worker.replica:
                return 10
            deadline = time.monotonic() + 10
            while len(entries(redis_server.url, journal)) < 10 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            worker.stop(5)
        return 0

    assert in_child(child) == 0, "the child's worker kept the parent's replica id (10) or failed"
    done = entries(redis_server.url, journal)
    assert [i for _, i, _ in done] == list(range(10)), "the child ran the stream in order, once each"
    assert {p for _, _, p in done} != {os.getpid()}


def test_a_child_can_neither_restart_nor_stop_the_worker_its_parent_runs(
    deployment: tuple[RedisQueueBackend, Registry, str], redis_server: RedisServer
) -> None:
    backend, registry, journal = deployment
    release = threading.Event()
    step = journal_task(registry, redis_server.url, journal, release)
    with ThreadedWorker(backend, registry=registry, concurrency=1) as worker:
        step("a", 0)
        step("a", 1)
        wait_until(lambda: worker.running_tasks(), message="the parent runs task 0")
        held = worker.held_streams

        def child() -> int:
            try:
                worker.start()
                return 11  # started the parent's worker again in a process without its threads
            except ConfigurationError as exc:
                if "before this process forked" not in str(exc):
                    return 12
            # A stop here must not hand over the parent's lease with the parent's token.
            return 0 if worker.stop(1) else 13

        assert in_child(child) == 0
        time.sleep(FAST["lease_ttl"])  # past a TTL: a release from the child would show by now
        assert worker.held_streams == held, "the parent lost its lease to its child's stop"
        release.set()
        wait_until(lambda: len(entries(redis_server.url, journal)) == 2, message="both tasks ran")
    assert entries(redis_server.url, journal) == [("a", 0, os.getpid()), ("a", 1, os.getpid())]


def test_an_embedded_worker_starts_anew_in_each_forked_child(
    deployment: tuple[RedisQueueBackend, Registry, str], redis_server: RedisServer
) -> None:
    backend, registry, journal = deployment
    step = journal_task(registry, redis_server.url, journal)
    embedded = EmbeddedWorker(backend, registry=registry, concurrency=2, stop_timeout=5)
    parents = embedded.start()
    assert embedded.start() is parents, "start() is idempotent within a process"
    try:

        def child() -> int:
            if embedded.worker is not None:
                return 20  # the parent's worker was handed down
            own = embedded.start()
            if own is parents or f":{os.getpid()}:" not in own.replica or not own.healthy:
                return 21
            for i in range(20):
                step("c", i)
            deadline = time.monotonic() + 10
            while len(entries(redis_server.url, journal)) < 20 and time.monotonic() < deadline:
                time.sleep(0.02)
            return 0 if embedded.stop() else 22

        assert in_child(child) == 0
        assert parents.healthy, "the child's stop stopped the parent's worker"
        done = entries(redis_server.url, journal)
        assert [i for _, i, _ in done] == list(range(20)), "order held across the two processes' workers"
    finally:
        assert embedded.stop()
    assert embedded.worker is None


STOPPED_AT_EXIT = """
import atexit, logging, sys, time
from pyfiq import RedisQueueBackend, Registry, ThreadedWorker

logging.basicConfig(level=logging.INFO)
backend = RedisQueueBackend(sys.argv[1], prefix=sys.argv[2], lease_ttl=6, shards=4)
registry = Registry()
registry.configure(backend)
step = registry.fifo(queue="q", name="exiting.step", key=lambda s, i: s)(lambda s, i: time.sleep(0.001))
for s in "abc":
    step.enqueue_many([(s, i) for i in range(2000)])
worker = ThreadedWorker(backend, registry=registry, concurrency=3).start()
time.sleep(0.3)
atexit.register(worker.stop, 5)  # the application's own: runs once thread pools are closed
sys.exit(0)
"""


def test_a_worker_stopped_by_an_atexit_function_still_sends_its_acknowledgements(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """At interpreter exit thread pools take no new work: a stop from an ``atexit`` function
    must still acknowledge what its tasks finished, or they would run again elsewhere."""
    script, prefix = tmp_path / "stopped_at_exit.py", unique_prefix()
    script.write_text(STOPPED_AT_EXIT)
    done = subprocess.run(
        [sys.executable, str(script), redis_server.url, prefix], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stream_failed" not in done.stderr, done.stderr[-2000:]
    assert "pyfiq.worker_stopped" in done.stderr and "clean=True" in done.stderr, done.stderr[-2000:]
    backend = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    try:
        for s in "abc":
            status = backend.admin.stream_status(f"q#{s}")
            assert status.holder is None, "the lease was handed over"
            assert backend.queue_info(f"q#{s}")["inflight"] == 0, "every finished task was acknowledged"
    finally:
        backend.close()
