"""What became of a task: ``handle.status()`` through each state a task passes, from the handle
enqueue returned and from one rebuilt from its id (``fn.handle``, ``pyfiq.handle``), against a
real redis-server and real workers of both drivers."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import pickle
import threading
import time
import uuid
from typing import Any

import pytest
from click.testing import CliRunner

import pyfiq
from pyfiq import AsyncWorker, ConfigurationError, RedisQueueBackend, TaskStatus, ThreadedWorker, fifo
from pyfiq.ops.cli import main
from tests.support.helpers import FAST, drained, unique_prefix, wait_until


def qname() -> str:
    return f"st-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def backend(redis_server: Any) -> Any:
    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)
    pyfiq.configure(b)
    yield b
    b.close()


def test_pending_tasks_tell_their_place_from_any_handle(backend: RedisQueueBackend) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.t")
    def t(i: int) -> None:
        pass

    handles = [t(i) for i in range(3)]
    client, pattern = backend.client, f"{backend.keys.prefix}*"
    before = {k: client.dump(k) for k in client.scan_iter(pattern)}
    for place, h in enumerate(handles):
        for same in (h, t.handle(h.id), pyfiq.handle(h.id, queue=q)):
            status = same.status()
            assert (status.state, status.place, status.stream) == ("pending", place, q), status
    assert asyncio.run(handles[2].astatus()).place == 2
    assert {k: client.dump(k) for k in client.scan_iter(pattern)} == before, "a status read changed Redis"


def test_a_keyed_task_is_found_in_its_stream_and_a_wrong_key_finds_nothing(backend: RedisQueueBackend) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.t", key=lambda customer, i: customer)
    def t(customer: str, i: int) -> None:
        pass

    t("c-1", 0)
    h = t("c-1", 1)
    assert t.handle(h.id, key="c-1").status().place == 1
    lost = t.handle(h.id, key="c-2").status()
    assert lost.state == "unknown" and "never" in lost.detail


def test_a_running_task_names_its_replica_and_the_ones_taken_ahead_say_so(backend: RedisQueueBackend) -> None:
    q, gate, started = qname(), threading.Event(), threading.Event()

    @fifo(queue=q, name=f"{q}.t")
    def t(i: int) -> None:
        if i == 0:
            started.set()
            gate.wait(10)

    handles = [t(i) for i in range(3)]
    worker = ThreadedWorker(backend, queues=[q], concurrency=1, replica="status-replica").start()
    try:
        assert started.wait(5)
        head, ahead = handles[0].status(), handles[1].status()
        assert head.state == "running" and head.deliveries == 1 and head.since is not None, head
        assert head.replica is not None and "status-replica" in head.replica
        assert ahead.state == "taken" and ahead.replica == head.replica, ahead
        time.sleep(2 * backend.settings.effective_heartbeat)  # a heartbeat names the running task
        assert handles[0].status().state == "running"
        gate.set()
        wait_until(lambda: drained(backend, q), timeout=10)
    finally:
        gate.set()
        worker.stop(5)
    done = handles[0].status()
    assert done.state == "unknown" and "finished" in done.detail


def test_dead_lettered_expired_and_skipped_tasks_say_why(backend: RedisQueueBackend) -> None:
    q, gate = qname(), threading.Event()

    @fifo(queue=q, name=f"{q}.fail", max_retries=0, key=lambda kind: kind)
    def fail(kind: str) -> None:
        if kind == "boom":
            raise ValueError("the downstream said no")
        gate.wait(10)

    boom = fail("boom")
    stale = fail.send_with_options(args=("stale",), expires_in=0.05)
    blocked = fail("blocked")
    time.sleep(0.2)  # past the stale task's expiry
    worker = ThreadedWorker(backend, queues=[q], concurrency=2).start()
    try:
        wait_until(lambda: boom.status().state == "dead_lettered", timeout=10)
        wait_until(lambda: stale.status().state == "expired", timeout=10)
        wait_until(lambda: blocked.status().state == "running", timeout=10)
        assert backend.skip(blocked.stream) == blocked.id
        skipped = blocked.status()
    finally:
        gate.set()
        worker.stop(5)
    dead = boom.status()
    assert dead.reason == "exhausted" and dead.error_type is not None and dead.error_type.endswith("ValueError")
    assert dead.error == "the downstream said no" and dead.since is not None
    assert stale.status().reason == "expired"
    assert (skipped.state, skipped.reason) == ("skipped", "operator")


def test_a_task_whose_holder_died_is_pending_again_once_the_lease_lapsed(redis_server: Any) -> None:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)
    q, started = qname(), threading.Event()

    @fifo(queue=q, name=f"{q}.t")
    def t() -> None:
        started.set()
        time.sleep(30)

    h = t.send_with_options(backend=backend)
    worker = ThreadedWorker(backend, queues=[q], concurrency=1).start()
    assert started.wait(5)
    worker.abandon()  # as if the process died: no release, no more heartbeats
    wait_until(lambda: h.status().state == "pending", timeout=backend.settings.lease_ttl + 3)
    status = h.status()
    assert status.place == 0 and status.deliveries == 1 and "handed over again" in status.detail
    backend.close()


def test_the_asyncio_driver_and_astatus_agree(backend: RedisQueueBackend) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.t")
    async def t(i: int) -> None:
        if i == 0:
            await asyncio.sleep(10)

    async def main() -> tuple[TaskStatus, TaskStatus]:
        first, second = await t(0), await t(1)
        async with AsyncWorker(backend, queues=[q], concurrency=1):
            for _ in range(200):
                if (await first.astatus()).state == "running":
                    break
                await asyncio.sleep(0.02)
            return await first.astatus(), await second.astatus()

    running, ahead = asyncio.run(main())
    assert running.state == "running" and running.replica is not None
    assert ahead.state == "taken"


def test_an_id_that_is_not_one_is_refused_and_an_unseen_one_is_unknown(backend: RedisQueueBackend) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.t")
    def t() -> None:
        pass

    with pytest.raises(ConfigurationError, match="not a task id"):
        t.handle("../../etc")
    assert pyfiq.handle(uuid.uuid4().hex, queue=q).status().state == "unknown"


def test_the_cli_shows_a_task(backend: RedisQueueBackend, redis_server: Any) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.t")
    def t() -> None:
        pass

    t()
    h = t()
    base = ["--redis", redis_server.url, "--prefix", backend.keys.prefix]
    shown = CliRunner().invoke(main, [*base, "task", "show", q, h.id, "--shards", "4"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert "state: pending" in lines and "place: 1" in lines and f"task_id: {h.id}" in lines
    as_json = CliRunner().invoke(main, [*base, "task", "show", q, h.id, "--shards", "4", "--json"])
    row = json.loads(as_json.output)
    assert (row["task_id"], row["state"], row["place"]) == (h.id, "pending", 1)
    bad = CliRunner().invoke(main, [*base, "task", "show", q, "nope", "--shards", "4"])
    assert bad.exit_code != 0 and "not a task id" in bad.output


def test_one_spelling_enqueues_from_async_code_whatever_the_task_is(backend: RedisQueueBackend) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.plain")
    def plain(i: int) -> None:
        pass

    @fifo(queue=q, name=f"{q}.coroutine")
    async def coroutine(i: int) -> None:
        pass

    async def main() -> list[Any]:
        return [await plain.aenqueue(0), await coroutine.aenqueue(1), await plain(2), await coroutine(3)]

    handles = asyncio.run(main())
    assert [h.status().place for h in handles] == [0, 1, 2, 3]
    assert backend.queue_info(q)["pending"] == 4, "each call stored exactly once"


def test_a_handle_sent_to_another_process_carries_its_task_not_its_backend(redis_server: Any) -> None:
    q, prefix = qname(), unique_prefix()
    pyfiq.configure(RedisQueueBackend(redis_server.url, prefix=prefix, **FAST))

    @fifo(queue=q, name=f"{q}.t")
    def t(i: int) -> None:
        pass

    own = RedisQueueBackend(redis_server.url, prefix=prefix, **FAST)
    handle = t.send_with_options(args=(1,), backend=own)
    copy = pickle.loads(pickle.dumps(handle))
    assert copy == handle and copy.backend is None
    # The copy asks through the default backend, which sees the same task.
    assert copy.status().state == handle.status().state == "pending"
    own.close()


@pytest.mark.parametrize("driver", ["threaded", "asyncio"])
def test_a_task_between_attempts_is_retrying_and_says_when_the_next_starts(
    backend: RedisQueueBackend, driver: str
) -> None:
    from tests.workers.test_worker import AsyncWorkerInThread

    q, gate, second = qname(), threading.Event(), threading.Event()

    @fifo(queue=q, name=f"{q}.flaky", max_retries=2, retry_wait=2.0)
    def flaky() -> None:
        if not second.is_set():
            second.set()
            raise ConnectionError("the provider hung up")
        gate.wait(10)

    handle = flaky()
    worker: Any = (
        ThreadedWorker(backend, queues=[q]) if driver == "threaded" else AsyncWorkerInThread(backend.copy(), queues=[q])
    ).start()
    try:
        wait_until(lambda: handle.status().state == "retrying", timeout=10, message="the heartbeat says it retries")
        waiting = handle.status()
        assert waiting.attempt == 1 and waiting.next_attempt is not None and waiting.replica is not None
        left = (waiting.next_attempt - dt.datetime.now(dt.timezone.utc)).total_seconds()
        assert 0 < left <= 2.5, left
        assert "attempt 1 failed" in waiting.detail
        wait_until(lambda: handle.status().attempt == 2, timeout=10, message="the second attempt runs")
        assert handle.status().state == "running"
    finally:
        gate.set()
        worker.stop(5)
        if isinstance(worker, AsyncWorkerInThread):
            worker.close()
    wait_until(lambda: drained(backend, q), timeout=10)
