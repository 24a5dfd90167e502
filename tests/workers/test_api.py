"""Bad calls fail at the call, with nothing stored (against a real redis-server)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tenacity import Retrying, stop_after_attempt, wait_fixed

import pyfiq
from pyfiq import AccessDeniedError, AsyncWorker, ConfigurationError, RedisQueueBackend, Registry, ThreadedWorker, fifo
from pyfiq.engine.protocol import RateLimit
from pyfiq.options import FifoOptions


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

        @fifo  # type: ignore[arg-type]
        def forgot() -> None:
            pass


def _option_fields() -> list[tuple[str, Any]]:
    return [(f.name, f.default) for f in dataclasses.fields(FifoOptions) if f.init]


@pytest.mark.parametrize("decorator", [fifo, Registry.fifo, Registry().fifo], ids=["pyfiq.fifo", "Registry", "bound"])
def test_fifos_keywords_are_the_options_fields(decorator: Callable[..., Any]) -> None:
    """The keyword signature users see and ``FifoOptions`` cannot drift apart: same names, same
    order, same defaults."""
    params = [p for p in inspect.signature(decorator).parameters.values() if p.name != "self"]
    assert [(p.name, p.default) for p in params] == _option_fields()


def test_fifo_hands_every_option_to_its_binding() -> None:
    given: dict[str, Any] = {
        "queue": "api-options",
        "name": "tests.api.options",
        "max_retries": 7,
        "retry_wait": 0.5,
        "on_success": print,
        "on_error": repr,
        "on_exhausted": "block",
        "expires_in": 60.0,
        "key": str,
        "allow_none_key": True,
        "rate_limit": 2.5,
        "rate_burst": 3,
        "time_limit": 9.0,
        "time_warning": 4.0,
        "store_result": True,
        "result_ttl": 120.0,
    }
    assert set(given) | {"retry"} == {name for name, _ in _option_fields()}, "a new option needs a value here"
    binding = Registry().fifo(**given)(lambda: None)
    assert {name: getattr(binding.options, name) for name in given} == given
    assert (binding.queue, binding.name, binding.on_exhausted, binding.key) == (
        "api-options",
        given["name"],
        "block",
        str,
    )
    assert binding.rate_limit == binding.options.rate == RateLimit(2.5, 3)
    assert (binding.time_limit, binding.time_warning, binding.expires_in) == (9.0, 4.0, 60.0)
    assert binding.policy is binding.options.policy and not binding.policy.forever
    retrying = Retrying(stop=stop_after_attempt(2), wait=wait_fixed(0))
    tenacious = Registry().fifo("api-options", retry=retrying)(lambda: None)
    assert tenacious.options.retry is retrying and tenacious.policy.stop is retrying.stop


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "@fifo needs a queue name: @fifo(queue='billing')"),
        ({"queue": print}, "got <built-in function print>: write @fifo(queue='billing') (with parentheses)"),
        ({"queue": "bad name"}, "invalid queue name 'bad name': use 1-200 characters"),
        ({"queue": "q", "max_retries": -2}, "max_retries must be an int >= -1, got -2"),
        ({"queue": "q", "retry_wait": -1}, "retry_wait must be >= 0, got -1"),
        ({"queue": "q", "retry": "often"}, "retry= takes a tenacity Retrying object"),
        (
            {"queue": "q", "retry": Retrying(), "retry_wait": 1},
            "give either retry= or max_retries=/retry_wait=, not both",
        ),
        ({"queue": "q", "rate_limit": 0}, "rate_limit must be > 0 and rate_burst >= 1, got 0, 1"),
        ({"queue": "q", "rate_limit": 1, "rate_burst": 0}, "rate_limit must be > 0 and rate_burst >= 1, got 1, 0"),
        ({"queue": "q", "on_exhausted": "ignore"}, "on_exhausted must be 'dead-letter' or 'block', got 'ignore'"),
        ({"queue": "q", "time_limit": -1}, "time_limit must be positive seconds, got -1"),
        ({"queue": "q", "time_warning": "soon"}, "time_warning must be a number of seconds, got 'soon'"),
        ({"queue": "q", "store_result": "yes"}, "store_result must be True or False, got 'yes'"),
        ({"queue": "q", "result_ttl": 0}, "result_ttl must be at least 0.001 seconds, got 0"),
    ],
)
def test_options_are_refused_when_made_with_fifos_messages(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        FifoOptions(**options)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        fifo(**options)


def test_options_are_frozen() -> None:
    options = FifoOptions("q", max_retries=-1)
    assert options.policy.forever and options.rate is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.queue = "other"  # type: ignore[misc]


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
