"""Bad calls fail at the call, with nothing stored (against a real redis-server)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import pyfiq
from pyfiq import AccessDeniedError, AsyncWorker, ConfigurationError, RedisQueueBackend, ThreadedWorker, fifo


def _stored(backend: RedisQueueBackend) -> list[bytes]:
    return list(backend.client.scan_iter(f"{backend.keys.prefix}:*:pending"))


def test_a_call_the_function_cannot_accept_is_refused_before_anything_is_stored(
    redis_backend: RedisQueueBackend,
) -> None:
    pyfiq.configure(redis_backend)

    @fifo(queue="api-arity", name="tests.api.charge")
    def charge(customer: str, cents: int, *, note: str = "") -> None:
        pass

    with pytest.raises(TypeError, match=r"tests\.api\.charge\(customer.*missing.*'cents'; nothing was enqueued"):
        charge("c-1")
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        charge("c-1", 5, colour="red")
    with pytest.raises(TypeError, match="too many positional"):
        charge.send_with_options(args=("c-1", 5, "x"))
    with pytest.raises(TypeError, match="missing"):
        charge.enqueue_many([("c-1", 5), ("c-2",)])  # one bad call: none of the batch is stored
    assert _stored(redis_backend) == []
    charge("c-1", 5, note="ok")
    assert len(_stored(redis_backend)) == 1


def test_a_bare_fifo_is_refused_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match=r"with parentheses"):

        @fifo  # type: ignore[call-overload]
        def forgot() -> None:
            pass


@pytest.mark.parametrize("worker", [ThreadedWorker, AsyncWorker])
def test_queues_given_as_one_string_is_refused(redis_backend: RedisQueueBackend, worker: type) -> None:
    with pytest.raises(ConfigurationError, match=r"write \['billing'\]"):
        worker(redis_backend, queues="billing")


@pytest.fixture
def acl_user(redis_server: Any) -> Iterator[str]:
    """A Redis user that may only touch keys no pyfiq prefix uses."""
    name = f"pyfiq-test-{uuid.uuid4().hex[:6]}"
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", name, "on", ">s3cret-pw", "~elsewhere:*", "+@all")
    yield name
    admin.execute_command("ACL", "DELUSER", name)
    admin.close()


def test_a_wrong_password_fails_at_once_and_is_never_retried(redis_server: Any, acl_user: str) -> None:
    url = f"redis://{acl_user}:not-the-password@127.0.0.1:{redis_server.port}/0"
    backend = RedisQueueBackend(url, enqueue_timeout=10.0, enqueue_attempts=5)

    @fifo(queue="api-denied", name="tests.api.denied")
    def denied() -> None:
        pass

    started = time.monotonic()
    with pytest.raises(AccessDeniedError, match=r"AuthenticationError|WRONGPASS|invalid username-password") as info:
        denied.send_with_options(backend=backend)
    assert time.monotonic() - started < 2, "an authentication error must not be retried"
    assert "not-the-password" not in str(info.value) and str(redis_server.port) in str(info.value)
    with pytest.raises(AccessDeniedError):
        ThreadedWorker(backend, queues=["api-denied"]).start()
    backend.close()


def test_a_missing_permission_fails_at_once_naming_it(redis_server: Any, acl_user: str) -> None:
    backend = RedisQueueBackend(f"redis://{acl_user}:s3cret-pw@127.0.0.1:{redis_server.port}/0", enqueue_timeout=10.0)

    @fifo(queue="api-noperm", name="tests.api.noperm")
    def noperm() -> None:
        pass

    started = time.monotonic()
    with pytest.raises(AccessDeniedError, match=r"NoPermissionError: .*no permissions"):
        noperm.send_with_options(backend=backend)
    assert time.monotonic() - started < 2
    backend.close()


def test_the_readme_quick_start_runs_a_task(redis_server: Any, tmp_path: Any) -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, flags=re.S)
    assert block is not None
    script = tmp_path / "quickstart.py"
    script.write_text(block.group(1).replace('"redis://localhost"', repr(redis_server.url)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "charged c-42 1999 cents"


@pytest.mark.parametrize("driver", ["threaded", "asyncio"])
def test_join_and_run_forever_return_once_the_worker_stops(redis_backend: RedisQueueBackend, driver: str) -> None:
    import asyncio
    import threading

    if driver == "threaded":
        w = ThreadedWorker(redis_backend, queues=["api-forever"])
        t = threading.Thread(target=w.run_forever)
        t.start()
        assert not w.join(0.3)
        w.stop(5)
        t.join(5)
        assert not t.is_alive() and w.join(0)
        return

    async def scenario() -> None:
        aw = AsyncWorker(RedisQueueBackend(redis_backend.url, redis_backend.settings), queues=["api-forever"])
        runner = asyncio.create_task(aw.run_forever())
        assert not await aw.join(0.3)
        await aw.stop(5)
        await asyncio.wait_for(runner, 5)
        assert await aw.join(0)
        await aw.backend.aclose()

    asyncio.run(scenario())


def test_an_enqueue_rides_out_a_redis_restart_within_its_window(own_redis: Any) -> None:
    """enqueue_timeout is the whole window: an enqueue issued while Redis is down for 2 s
    lands once it is back (five quick attempts used to give up within a second)."""
    import threading

    backend = RedisQueueBackend(own_redis.url, prefix=f"ride-{uuid.uuid4().hex[:6]}", enqueue_timeout=8.0)

    @fifo(queue="api-ride", name="tests.api.ride")
    def ride() -> None:
        pass

    ride.send_with_options(backend=backend)  # connected and laid out before the outage
    own_redis.stop()
    outcome: list[Any] = []
    t = threading.Thread(target=lambda: outcome.append(ride.send_with_options(backend=backend)))
    t.start()
    time.sleep(2.0)
    assert t.is_alive(), "the enqueue gave up while Redis was down"
    own_redis.start()
    t.join(10)
    assert outcome and outcome[0].queue == "api-ride"
    assert backend.queue_info("api-ride")["pending"] == 2
    backend.close()


def test_a_worker_process_without_logging_configured_prints_nothing(redis_server: Any) -> None:
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import time
        from pyfiq import RedisQueueBackend, fifo, threaded_worker

        backend = RedisQueueBackend({redis_server.url!r}, prefix="silent-{uuid.uuid4().hex[:6]}", lease_ttl=1.0)
        worker = threaded_worker(backend=backend)

        @fifo(queue="silent", name="silent.fails", max_retries=1, retry_wait=0)
        def fails() -> None:
            raise ValueError("logged at warning and error level, never printed")

        fails()
        while not backend.dead_letters("silent"):
            time.sleep(0.02)
        worker.stop(5)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_log_levels_suit_a_library(redis_backend: RedisQueueBackend, caplog: pytest.LogCaptureFixture) -> None:
    """A retry is info, a success debug (with its duration), a dead letter an error; the
    records carry their fields structured in ``record.pyfiq``."""
    import logging

    pyfiq.configure(redis_backend)

    @fifo(queue="api-levels", name="tests.api.levels", max_retries=1, retry_wait=0)
    def levels(fail: bool) -> None:
        if fail:
            raise ValueError("boom")

    levels(False)
    levels(True)
    with caplog.at_level(logging.DEBUG, logger="pyfiq"), ThreadedWorker(redis_backend, queues=["api-levels"]):
        deadline = time.monotonic() + 10
        while not redis_backend.dead_letters("api-levels") and time.monotonic() < deadline:
            time.sleep(0.02)
    by_event = {getattr(r, "pyfiq", {}).get("event"): r for r in caplog.records if r.name == "pyfiq"}
    assert by_event["pyfiq.task_retry_scheduled"].levelno == logging.INFO
    assert by_event["pyfiq.task_succeeded"].levelno == logging.DEBUG
    assert by_event["pyfiq.task_succeeded"].pyfiq["duration"] >= 0  # type: ignore[attr-defined]
    assert by_event["pyfiq.task_dead_lettered"].levelno == logging.ERROR
    assert "error=ValueError: boom" in by_event["pyfiq.task_dead_lettered"].getMessage()
