"""Results: ``@fifo(store_result=True)`` keeps what a task returns, written by the script that
acknowledges it, and ``handle.result()`` waits for it from any process without polling, against a
real redis-server and real workers of both drivers (and ``memory://``)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import pyfiq
from pyfiq import ConfigurationError, RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.errors import ResultUnavailable, TaskExpired, TaskFailed, TaskSkipped
from tests.support.helpers import FAST, drained, unique_prefix, wait_until
from tests.workers.test_worker import AsyncWorkerInThread


def qname() -> str:
    return f"res-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["redis", "memory"])
def backend(request: pytest.FixtureRequest) -> Iterator[RedisQueueBackend]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    else:
        url = f"memory://results-{uuid.uuid4().hex[:8]}"
    b = RedisQueueBackend(url, prefix=unique_prefix(), **FAST)
    pyfiq.configure(b)
    yield b
    b.close()


@pytest.fixture(params=["threaded", "asyncio"])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Started:
    """A worker of either driver, stopped (and its loop closed) by ``stop``."""

    def __init__(self, driver: str, backend: RedisQueueBackend, queue: str, **kw: Any) -> None:
        if driver == "threaded":
            self.worker: Any = ThreadedWorker(backend, queues=[queue], **kw).start()
        else:
            kw.pop("concurrency", None)
            self.worker = AsyncWorkerInThread(backend.copy(), queues=[queue], **kw).start()

    def stop(self, timeout: float) -> None:
        self.worker.stop(timeout)
        if isinstance(self.worker, AsyncWorkerInThread):
            self.worker.close()


start = Started


def test_each_task_returns_its_own_value_through_group_acknowledgements(
    backend: RedisQueueBackend, driver: str
) -> None:
    """Forty tasks run back to back in the default mode, their acknowledgements sent in groups
    with the takes: each result is its own task's, never a neighbour's, and exact (nested
    values through the serializer)."""
    q = qname()

    @fifo(queue=q, name=f"{q}.square", store_result=True)
    def square(i: int) -> dict[str, Any]:
        return {"i": i, "square": i * i, "nested": [i, {"k": str(i)}]}

    handles = [square(i) for i in range(40)]
    worker = start(driver, backend, q)
    try:
        values = [h.result(timeout=20) for h in handles]
    finally:
        worker.stop(5)
    assert values == [{"i": i, "square": i * i, "nested": [i, {"k": str(i)}]} for i in range(40)]
    assert {h.status().state for h in handles} == {"succeeded"}


def test_an_async_task_gives_its_awaited_value_and_aresult_waits_without_blocking(backend: RedisQueueBackend) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.fetch", store_result=True)
    async def fetch(n: int) -> list[int]:
        await asyncio.sleep(0.01)
        return list(range(n))

    async def main() -> tuple[list[int], int]:
        handle = await fetch.aenqueue(3)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        value = await handle.aresult(timeout=20)
        ticker.cancel()
        return value, ticks

    worker = start("asyncio", backend, q)
    try:
        value, ticks = asyncio.run(main())
    finally:
        worker.stop(5)
    assert value == [0, 1, 2]
    assert ticks > 0, "the event loop ran other work while aresult() waited"


def test_a_wait_reads_the_status_on_announcements_not_in_a_poll(
    backend: RedisQueueBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that runs 1.5 s: the waiter reads its status once it has subscribed and again
    when the acknowledging script announces the end, not dozens of times meanwhile."""
    q, reads = qname(), []

    @fifo(queue=q, name=f"{q}.slow", store_result=True)
    def slow() -> str:
        time.sleep(1.5)
        return "done"

    original = backend.task_status
    monkeypatch.setattr(backend, "task_status", lambda *a: reads.append(1) or original(*a))
    handle = slow()
    worker = start("threaded", backend, q)
    try:
        assert handle.result(timeout=20) == "done"
    finally:
        worker.stop(5)
    assert 1 <= len(reads) <= 3, f"{len(reads)} status reads for one wait"


def test_a_timeout_leaves_the_task_alone(backend: RedisQueueBackend) -> None:
    q, gate = qname(), threading.Event()

    @fifo(queue=q, name=f"{q}.held", store_result=True)
    def held() -> int:
        gate.wait(10)
        return 7

    handle = held()
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not end within 0\.3"):
        handle.result(timeout=0.3)
    assert time.monotonic() - began < 3
    assert handle.status().state == "pending"
    worker = start("threaded", backend, q)
    try:
        wait_until(lambda: handle.status().state == "running", timeout=10)
        with pytest.raises(TimeoutError):
            handle.result(timeout=0.2)
        gate.set()
        assert handle.result(timeout=20) == 7
    finally:
        gate.set()
        worker.stop(5)


def test_a_dead_letter_raises_what_the_task_raised(backend: RedisQueueBackend, driver: str) -> None:
    q, gate = qname(), threading.Event()

    @fifo(queue=q, name=f"{q}.work", store_result=True, max_retries=0, key=lambda kind: kind)
    def work(kind: str) -> str:
        if kind == "boom":
            raise ValueError("the downstream said no")
        gate.wait(10)
        return kind

    boom = work("boom")
    stale = work.send_with_options(args=("stale",), expires_in=0.05)
    blocked = work("blocked")
    time.sleep(0.2)  # past the stale task's deadline
    worker = start(driver, backend, q, concurrency=3)
    try:
        with pytest.raises(TaskFailed) as failed:
            boom.result(timeout=20)
        with pytest.raises(TaskExpired):
            stale.result(timeout=20)
        wait_until(lambda: blocked.status().state == "running", timeout=10)
        waiting: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _catch(waiting, blocked.result, 20))
        waiter.start()
        time.sleep(0.2)
        assert backend.skip(blocked.stream) == blocked.id
        waiter.join(10)
    finally:
        gate.set()
        worker.stop(5)
    err = failed.value
    assert not isinstance(err, (TaskExpired, TaskSkipped))
    assert (err.reason, err.error, err.task_id) == ("exhausted", "the downstream said no", boom.id)
    assert err.error_type is not None and err.error_type.endswith("ValueError")
    assert err.traceback is not None and "the downstream said no" in err.traceback
    assert len(waiting) == 1 and isinstance(waiting[0], TaskSkipped), waiting


def _catch(into: list[BaseException], fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except BaseException as exc:
        into.append(exc)


def test_a_result_too_large_or_not_serializable_dead_letters_the_task(redis_server: Any) -> None:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), result_max_bytes=1000, **FAST)
    pyfiq.configure(backend)
    q = qname()

    @fifo(queue=q, name=f"{q}.give", store_result=True, key=lambda kind: kind)
    def give(kind: str) -> Any:
        return "x" * 5000 if kind == "big" else {1, 2} if kind == "set" else "fits"

    big, unserializable, fits = give("big"), give("set"), give("fits")
    worker = start("threaded", backend, q)
    try:
        assert fits.result(timeout=20) == "fits"
        for handle, said in ((big, "more than result_max_bytes (1,000)"), (unserializable, "refused it")):
            with pytest.raises(TaskFailed) as info:
                handle.result(timeout=20)
            assert info.value.reason == "result-refused" and said in str(info.value.error), info.value.error
    finally:
        worker.stop(5)
        backend.close()


def test_results_and_their_keys_are_gone_after_result_ttl(redis_server: Any) -> None:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)
    pyfiq.configure(backend)
    q = qname()

    @fifo(queue=q, name=f"{q}.brief", store_result=True, result_ttl=0.5, key=lambda i: f"k{i % 7}")
    def brief(i: int) -> int:
        return i

    handles = [brief(i) for i in range(60)]
    worker = start("threaded", backend, q)
    try:
        assert [h.result(timeout=20) for h in handles] == list(range(60))
        wait_until(lambda: drained(backend, *{h.stream for h in handles}), timeout=10)
    finally:
        worker.stop(5)
    time.sleep(0.7)
    assert list(backend.client.scan_iter(f"{backend.keys.prefix}:*:res:*")) == []
    with pytest.raises(ResultUnavailable, match="result_ttl"):
        handles[0].result(timeout=5)
    assert handles[0].status().state == "unknown"
    backend.close()


def test_a_function_without_store_result_is_refused_at_once(backend: RedisQueueBackend) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.plain")
    def plain() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="store_result=True"):
        plain().result(timeout=30)


def test_a_task_rerun_after_its_worker_died_stores_the_rerun_result(redis_server: Any, tmp_path: Any) -> None:
    """The worker process running the task is killed mid-task (SIGKILL): nothing was stored for
    that run; the task runs again on another worker, whose result ``result()`` returns. A caller
    in a third process waits on a handle rebuilt from the id."""
    prefix, q = unique_prefix(), qname()
    marker = tmp_path / "first-run"
    env = {**os.environ, "RESULT_MARKER": str(marker), "RESULT_QUEUE": q}
    first = _worker_process(redis_server.url, prefix, env)
    backend = RedisQueueBackend(redis_server.url, prefix=prefix, **FAST)
    try:
        handle = fifo(queue=q, name="tests.results.crashy", store_result=True)(_crashy).send_with_options(
            backend=backend
        )
        waiter = subprocess.Popen(
            [sys.executable, "-c", _WAITER, redis_server.url, prefix, q, handle.id],
            stdout=subprocess.PIPE,
            text=True,
        )
        wait_until(marker.exists, timeout=20, message="the first run started")
        first.send_signal(signal.SIGKILL)
        first.wait(5)
        second = _worker_process(redis_server.url, prefix, env)
        try:
            out, _ = waiter.communicate(timeout=30)
        finally:
            second.terminate()
            second.wait(10)
        assert out.strip() == "'second run'", out
        assert handle.result(timeout=5) == "second run"
    finally:
        first.kill()
        backend.close()


def _crashy() -> str:
    marker = os.environ["RESULT_MARKER"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(30)  # killed meanwhile
        return "first run"
    return "second run"


_WORKER = """
import os, sys, time
import pyfiq
from pyfiq import RedisQueueBackend, ThreadedWorker, fifo
from tests.workers.test_results import _crashy
backend = RedisQueueBackend(sys.argv[1], prefix=sys.argv[2], lease_ttl=1.5, poll_interval=0.2, shards=4)
pyfiq.configure(backend)
fifo(queue=os.environ["RESULT_QUEUE"], name="tests.results.crashy", store_result=True)(_crashy)
worker = ThreadedWorker(backend, queues=[os.environ["RESULT_QUEUE"]]).start()
time.sleep(120)
"""

_WAITER = """
import sys
import pyfiq
from pyfiq import RedisQueueBackend
backend = RedisQueueBackend(sys.argv[1], prefix=sys.argv[2], lease_ttl=1.5, poll_interval=0.2, shards=4)
pyfiq.configure(backend)
print(repr(pyfiq.handle(sys.argv[4], queue=sys.argv[3]).result(timeout=60)))
"""


def _worker_process(url: str, prefix: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _WORKER, url, prefix], env=env)


def test_the_cli_shows_a_result_and_a_dead_letters_error(redis_server: Any) -> None:
    import json

    from click.testing import CliRunner

    from pyfiq.ops.cli import main

    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)
    pyfiq.configure(backend)
    q = qname()

    @fifo(queue=q, name=f"{q}.answer", store_result=True, max_retries=0)
    def answer(fail: bool) -> dict[str, int]:
        if fail:
            raise RuntimeError("no answer\x1b]0;owned\x07")
        return {"answer": 42}

    good, bad = answer(False), answer(True)
    worker = start("threaded", backend, q)
    try:
        assert good.result(timeout=20) == {"answer": 42}
        with pytest.raises(TaskFailed):
            bad.result(timeout=20)
    finally:
        worker.stop(5)
    base = ["--redis", redis_server.url, "--prefix", backend.keys.prefix, "task", "show", q]
    shown = CliRunner().invoke(main, [*base, good.id, "--shards", "4"])
    assert shown.exit_code == 0 and "state: succeeded" in shown.output.splitlines(), shown.output
    assert "result: {'answer': 42}" in shown.output.splitlines()
    row = json.loads(CliRunner().invoke(main, [*base, good.id, "--shards", "4", "--json"]).output)
    assert (row["state"], row["result"]) == ("succeeded", "{'answer': 42}")
    failed = CliRunner().invoke(main, [*base, bad.id, "--shards", "4"])
    assert "state: dead_lettered" in failed.output and "\x1b" not in failed.output, failed.output
    row = json.loads(CliRunner().invoke(main, [*base, bad.id, "--shards", "4", "--json"]).output)
    assert "RuntimeError" in row["traceback"]
    backend.close()


def test_a_task_skipped_while_it_runs_has_no_result_whatever_it_returns(
    backend: RedisQueueBackend, driver: str
) -> None:
    """An operator skips the task a holder runs (a heartbeat has named it); it returns a moment
    later. Its holder's let-go carries the acknowledgement and the result, and neither may
    count: a waiter before and a waiter after both hear ``TaskSkipped``, and the status stays
    ``skipped`` (before: the result was stored too, and the late waiter got the value)."""
    q, gate = qname(), threading.Event()

    @fifo(queue=q, name=f"{q}.held", store_result=True)
    def held(i: int) -> str:
        if i == 0:
            gate.wait(10)
        return f"value {i}"

    head, after = held(0), held(1)
    worker = start(driver, backend, q)
    try:
        wait_until(lambda: head.status().state == "running", timeout=10)
        time.sleep(2 * backend.settings.effective_heartbeat)  # a heartbeat names the running task
        early: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _catch(early, head.result, 20))
        waiter.start()
        assert backend.skip(head.stream) == head.id
        gate.set()
        waiter.join(20)
        assert after.result(timeout=20) == "value 1"
        wait_until(lambda: drained(backend, q), timeout=10)
    finally:
        gate.set()
        worker.stop(5)
    assert len(early) == 1 and isinstance(early[0], TaskSkipped), early
    with pytest.raises(TaskSkipped):
        head.result(timeout=5)
    assert head.status().state == "skipped"
    assert not backend.client.exists(backend.keys.stream(q).result(head.id))
