"""``pyfiq worker`` as an orchestrator runs it: the lines it logs when it starts and stops (text
and JSON), ``--stop-timeout`` leaving a long task to run again elsewhere and exiting non-zero,
and a second signal exiting at once with one line saying so."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pyfiq import RedisQueueBackend
from pyfiq.functions import Registry
from tests.support.helpers import lines_until, unique_prefix, wait_until

TASKS = """
import pathlib, time
from pyfiq import fifo

@fifo(queue=QUEUE, name="wp.hold")
def hold(marker: str, seconds: float) -> None:
    pathlib.Path(marker).write_text("started")
    time.sleep(seconds)
"""


def start_worker(url: str, prefix: str, queue: str, tmp: Path, *extra: str) -> subprocess.Popen[str]:
    module = f"wp_{uuid.uuid4().hex[:8]}"
    (tmp / f"{module}.py").write_text(f"QUEUE = {queue!r}\n" + TASKS)
    cmd = [sys.executable, "-m", "pyfiq", "worker", module, "--redis", url, "--prefix", prefix, "--lease-ttl", "1.5"]
    env = {**os.environ, "PYTHONPATH": str(tmp)}
    proc = subprocess.Popen([*cmd, *extra], cwd=tmp, stderr=subprocess.PIPE, text=True, env=env)
    return proc


def enqueue_hold(url: str, prefix: str, queue: str, marker: Path, seconds: float) -> None:
    registry = Registry()
    backend = RedisQueueBackend(url, prefix=prefix, lease_ttl=1.5)
    registry.configure(backend)
    registry.fifo(queue=queue, name="wp.hold")(lambda marker, seconds: None)(str(marker), seconds)
    backend.close()


def test_a_worker_says_who_it_is_what_it_waits_for_and_that_it_handed_over(redis_server: Any, tmp_path: Path) -> None:
    queue, prefix = f"wp-{uuid.uuid4().hex[:6]}", unique_prefix()
    url = redis_server.url
    proc = start_worker(url, prefix, queue, tmp_path)
    try:
        started = lines_until(proc, "ready")
        (line,) = [s for s in started if "pyfiq.worker_started" in s]
        assert f"queues={queue}" in line and "concurrency=4" in line and "ack_mode=group" in line
        assert "version=" in line and "replica=" in line and f"redis={url}" in line
        marker = tmp_path / "started"
        enqueue_hold(url, prefix, queue, marker, 1.0)
        wait_until(marker.exists, timeout=10, message="the task runs")
        proc.send_signal(signal.SIGTERM)
        stopping = lines_until(proc, "pyfiq.worker_stopped")
        (said,) = [s for s in stopping if "pyfiq.worker_stopping" in s]
        assert "signal=SIGTERM" in said and f"'stream': '{queue}'" in said and "running_s" in said
        assert "clean=True" in stopping[-1], "its leases were handed over"
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait(5)


@pytest.mark.parametrize("driver", ["threaded", "asyncio"])
def test_past_its_stop_timeout_a_worker_names_the_tasks_it_leaves_and_exits_non_zero_in_json(
    redis_server: Any, tmp_path: Path, driver: str
) -> None:
    queue, prefix = f"wp-{uuid.uuid4().hex[:6]}", unique_prefix()
    extra = ("--stop-timeout", "0.5", "--log-format", "json", "--driver", driver)
    proc = start_worker(redis_server.url, prefix, queue, tmp_path, *extra)
    try:
        started = lines_until(proc, "ready")
        records = [json.loads(s) for s in started if s.startswith("{")]
        (first,) = [r for r in records if r["event"] == "pyfiq.worker_started"]
        assert first["level"] == "info" and first["logger"] == "pyfiq" and first["queues"] == queue
        assert first["timestamp"].endswith("Z")
        marker = tmp_path / "started"
        enqueue_hold(redis_server.url, prefix, queue, marker, 30.0)
        wait_until(marker.exists, timeout=10, message="the long task runs")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        tail = [json.loads(s) for s in lines_until(proc, "pyfiq.worker_stop_timed_out") if s.startswith("{")]
        (left,) = [r for r in tail if r["event"] == "pyfiq.worker_stop_timed_out"]
        assert left["level"] == "warning" and [t["stream"] for t in left["left_running"]] == [queue]
        assert proc.wait(10) == 1 and time.monotonic() - t0 < 8, "it exits non-zero without waiting for the task"
    finally:
        proc.kill()
        proc.wait(5)


@pytest.mark.parametrize("driver", ["threaded", "asyncio"])
def test_a_second_signal_exits_at_once_with_one_line_saying_so(redis_server: Any, tmp_path: Path, driver: str) -> None:
    queue, prefix = f"wp-{uuid.uuid4().hex[:6]}", unique_prefix()
    proc = start_worker(redis_server.url, prefix, queue, tmp_path, "--driver", driver)
    try:
        lines_until(proc, "ready")
        marker = tmp_path / "started"
        enqueue_hold(redis_server.url, prefix, queue, marker, 30.0)
        wait_until(marker.exists, timeout=10, message="the long task runs")
        proc.send_signal(signal.SIGTERM)
        lines_until(proc, "pyfiq.worker_stopping")
        proc.send_signal(signal.SIGINT)
        last = lines_until(proc, "pyfiq.worker_exiting_now")
        assert "signal=SIGINT" in last[-1] and f"'stream': '{queue}'" in last[-1]
        assert proc.wait(5) == 1
    finally:
        proc.kill()
        proc.wait(5)


def test_the_probes_answer_for_the_worker_and_for_redis_apart(tmp_path: Path) -> None:
    """Liveness follows the worker's own health only; readiness also fails once Redis has not
    answered for the bound (a Redis outage is not cured by restarting the worker)."""
    import urllib.error
    import urllib.request

    from pyfiq.ops.health import Health, serve
    from pyfiq_harness.servers import free_port

    state = {"healthy": True, "redis": True}
    health = Health(lambda: state["healthy"], lambda: state["redis"], unreachable_after=0.3)
    port = free_port()
    server = serve(health, "127.0.0.1", port)

    def get(path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        assert get("/healthz") == (200, {"live": True})
        assert get("/readyz")[0] == 200
        state["redis"] = False
        assert get("/readyz")[0] == 200, "a moment without Redis is within the bound"
        time.sleep(0.4)
        status, body = get("/readyz")
        assert status == 503 and body["redis_unreachable_s"] >= 0.3 and body["live"] is True
        assert get("/healthz")[0] == 200, "liveness does not follow Redis"
        state["redis"] = True
        assert get("/readyz")[0] == 200
        state["healthy"] = False
        assert get("/healthz") == (503, {"live": False}) and get("/readyz")[0] == 503
        assert get("/elsewhere")[0] == 404
    finally:
        server.shutdown()


def test_a_worker_process_serves_its_probes(redis_server: Any, tmp_path: Path) -> None:
    import urllib.request

    from pyfiq_harness.servers import free_port

    queue, prefix, port = f"wp-{uuid.uuid4().hex[:6]}", unique_prefix(), free_port()
    proc = start_worker(redis_server.url, prefix, queue, tmp_path, "--health-port", str(port))
    try:
        lines_until(proc, "ready")
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                assert reply.status == 200, path
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait(5)


def test_a_worker_process_whose_worker_died_exits_non_zero_instead_of_idling(own_redis: Any, tmp_path: Path) -> None:
    """Its Redis started refusing it (a rotated password): a thread of the worker dies, the
    worker stops itself, and the process exits 1 so that its supervisor restarts it."""
    import redis as redis_py

    queue, prefix = f"wp-{uuid.uuid4().hex[:6]}", unique_prefix()
    proc = start_worker(own_redis.url, prefix, queue, tmp_path)
    admin = redis_py.Redis.from_url(own_redis.url)
    try:
        lines_until(proc, "ready")
        admin.config_set("requirepass", "rotated")
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal")
        said = lines_until(proc, "pyfiq.worker_process_exiting", timeout=30)
        assert any("pyfiq.worker_thread_died" in line for line in said)
        assert proc.wait(10) == 1
    finally:
        with contextlib.suppress(Exception):
            redis_py.Redis.from_url(own_redis.url, password="rotated").config_set("requirepass", "")
        admin.close()
        proc.kill()
        proc.wait(5)
