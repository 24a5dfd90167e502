"""Pre-fork servers: ``gunicorn --preload -w 2`` imports the Flask app once in its master and
forks the workers from it. Each worker process starts its own pyfiq worker after the fork (the
``post_worker_init`` hook), on connections of its own; the master runs none and holds none.
A SIGTERM to the master stops both within seconds, their leases handed over at the workers'
exit. And that exit is graceful even while tasks flow: the worker stops before the
interpreter closes its thread pools."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pyfiq import RedisQueueBackend, Registry
from pyfiq_harness.servers import free_port, popen
from tests.contrib.apps.steps import read_journal
from tests.support.frameworks import APP_SETTINGS, APPS, app_env, children, per_stream, python, redis_sockets, take_over
from tests.support.helpers import unique_prefix, wait_until
from tests.support.servers import RedisServer


class Gunicorn:
    def __init__(self, proc: subprocess.Popen[bytes], redis: RedisServer, prefix: str, base: str) -> None:
        self.proc, self.redis, self.prefix, self.base = proc, redis, prefix, base
        self.url = redis.url
        self.backend = RedisQueueBackend(self.url, prefix=prefix, **APP_SETTINGS)  # type: ignore[arg-type]

    def replica_pids(self) -> set[int]:
        return {int(r["pid"]) for r in self.backend.admin.replicas()}


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    # A Redis of its own: its CLIENT LIST then holds only this module's connections.
    redis = RedisServer(tmp_path_factory.mktemp("prefork-redis")).start()
    prefix, port = unique_prefix(), free_port()
    argv = [python(), "-m", "gunicorn", "--preload", "-w", "2", "-b", f"127.0.0.1:{port}"]
    argv += ["-c", str(APPS / "gunicorn_conf.py"), "--graceful-timeout", "20", "flask_app:app"]
    env = app_env(redis.url, prefix, APP_WORKER="embedded", APP_STEP_SECONDS="0.03")
    log = (tmp_path_factory.mktemp("gunicorn") / "gunicorn.log").open("wb")
    proc = popen(argv, cwd=APPS, env=env, stdout=log, stderr=subprocess.STDOUT)
    served = Gunicorn(proc, redis, prefix, f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: len(served.replica_pids()) == 2, timeout=30, message="both gunicorn workers' workers")
        yield served
    finally:
        proc.kill()
        proc.wait(10)
        served.backend.close()
        redis.stop()
        log.close()


STREAMS = ["a", "b", "c", "d"]


def test_each_gunicorn_worker_runs_a_worker_of_its_own_on_connections_of_its_own(gunicorn: Gunicorn) -> None:
    master, workers = gunicorn.proc.pid, children(gunicorn.proc.pid)
    assert len(workers) == 2 and gunicorn.replica_pids() == set(workers), "one worker per process, none in the master"

    def post_stream(stream: str) -> None:
        with httpx.Client(base_url=gunicorn.base, timeout=10) as client:
            for seq in range(25):
                assert client.post(f"/steps/{stream}/{seq}").status_code == 200

    threads = [threading.Thread(target=post_stream, args=(s,)) for s in STREAMS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wait_until(lambda: len(read_journal(gunicorn.url, prefix=gunicorn.prefix)) == 100, message="100 steps")
    rows = read_journal(gunicorn.url, gunicorn.prefix)
    assert per_stream(rows) == {s: list(range(25)) for s in STREAMS}
    assert {pid for _, _, pid in rows} == set(workers), "both workers ran steps"

    owners = {pid: redis_sockets(pid, gunicorn.redis.port) for pid in (master, *workers)}
    assert owners[master] == {}, "the master holds no connection to Redis"
    first, second = (owners[w] for w in workers)
    assert first and second and not set(first) & set(second), "no socket is shared between the workers"
    client = gunicorn.redis.client()

    def every_connection_is_one_processes() -> bool:
        ports = [int(c["addr"].rsplit(":", 1)[1]) for c in client.client_list()]
        mine = {*redis_sockets(os.getpid(), gunicorn.redis.port).values()}
        theirs = [set(redis_sockets(pid, gunicorn.redis.port).values()) for pid in (master, *workers)]
        return not theirs[0] and all((p in mine) + sum(p in t for t in theirs) == 1 for p in ports)

    try:  # sampled twice, CLIENT LIST then /proc: a connection made in between is looked at again
        wait_until(every_connection_is_one_processes, timeout=5, message="each Redis connection of one process")
    finally:
        client.close()


def test_a_sigterm_to_the_master_stops_both_workers_and_hands_their_leases_over(gunicorn: Gunicorn) -> None:
    registry = Registry()
    registry.configure(gunicorn.backend)
    step = registry.fifo(queue="jobs", name="apps.step", key=lambda stream, seq: stream)(lambda stream, seq: None)
    for stream in STREAMS:
        step.enqueue_many([(stream, seq) for seq in range(25, 85)])
    wait_until(lambda: len(read_journal(gunicorn.url, gunicorn.prefix)) >= 120, message="the fleet is busy")
    workers = children(gunicorn.proc.pid)
    started = time.monotonic()
    gunicorn.proc.send_signal(signal.SIGTERM)
    assert gunicorn.proc.wait(15) == 0
    stopped = time.monotonic() - started
    hooks = gunicorn.backend.client.lrange(f"{gunicorn.prefix}:hook-stops", 0, -1)
    assert sorted(hooks) == sorted(f"{pid}:1".encode() for pid in workers), "each worker_exit hook stopped its worker"
    assert all(gunicorn.backend.admin.stream_status(f"jobs#{s}").holder is None for s in STREAMS), "leases released"
    took = take_over(gunicorn.url, gunicorn.prefix, expected=340)
    assert took < 1.5, f"the next worker waited {took:.2f}s: a lease was left to lapse (TTL 6 s)"
    assert stopped < 5, f"the master took {stopped:.1f}s to stop"
    assert per_stream(read_journal(gunicorn.url, gunicorn.prefix)) == {s: list(range(85)) for s in STREAMS}


EXITING = """
import atexit, logging, sys, time
from pyfiq import RedisQueueBackend, Registry
from pyfiq.contrib.embedded import EmbeddedWorker

logging.basicConfig(level=logging.INFO)
backend = RedisQueueBackend(sys.argv[1], prefix=sys.argv[2], lease_ttl=6, shards=4)
registry = Registry()
registry.configure(backend)
step = registry.fifo(queue="q", name="exiting.step", key=lambda s, i: s)(lambda s, i: time.sleep(0.001))
for s in "abc":
    step.enqueue_many([(s, i) for i in range(2000)])
EmbeddedWorker(backend, registry=registry, concurrency=3, stop_timeout=5).start()
time.sleep(0.3)
# Exit functions registered later run earlier: this one runs while the interpreter exits, its
# thread pools already closed, and before the standard atexit functions registered above.
atexit.register(time.sleep, 0.3)
sys.exit(0)
"""


def test_an_embedded_worker_stops_cleanly_at_exit_while_tasks_flow(redis_server: Any, tmp_path: Path) -> None:
    script, prefix = tmp_path / "exiting.py", unique_prefix()
    script.write_text(EXITING)
    done = subprocess.run(
        [sys.executable, str(script), redis_server.url, prefix], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pyfiq.worker_stopped" in done.stderr and "clean=True" in done.stderr, done.stderr[-2000:]
    assert "stream_failed" not in done.stderr, "the stop met closed thread pools: acknowledgements were lost"
    backend = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    try:
        assert all(backend.admin.stream_status(f"q#{s}").holder is None for s in "abc"), "leases handed over"
    finally:
        backend.close()
