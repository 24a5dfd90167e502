"""Registries: two applications in one process, each with its own ``@fifo`` functions, backend
and workers, do not see each other's tasks; the default registry serves ``@pyfiq.fifo``."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import pyfiq
from pyfiq import AsyncWorker, NotConfiguredError, RedisQueueBackend, Registry, ThreadedWorker, async_worker, fifo
from pyfiq.functions import default_registry
from pyfiq.testing import drain, memory_backend
from tests.support.helpers import FAST, drained, unique_prefix, wait_until


@pytest.fixture(params=["memory", "redis"])
def shared(request: pytest.FixtureRequest) -> Iterator[RedisQueueBackend]:
    """One backend both registries enqueue to: the embedded one, or a real redis-server."""
    if request.param == "redis":
        yield request.getfixturevalue("redis_backend")
        return
    backend = RedisQueueBackend(f"memory://{uuid.uuid4().hex}", prefix=unique_prefix(), **FAST)
    yield backend
    backend.close()


def qname() -> str:
    return f"reg-{uuid.uuid4().hex[:8]}"


def two_apps(backend: RedisQueueBackend, ran: list[tuple[str, int]]) -> tuple[Registry, Registry, str, str]:
    """Registries ``a`` and ``b`` on ``backend``, each with a function of its own queue under
    the same task name: which one ran tells whose worker took the task."""
    a, b, qa, qb = Registry(backend), Registry(backend), qname(), qname()

    @a.fifo(queue=qa, name="app.work")
    def work_a(i: int) -> None:
        ran.append(("a", i))

    @b.fifo(queue=qb, name="app.work")
    def work_b(i: int) -> None:
        ran.append(("b", i))

    for i in range(3):
        work_a(i)
        work_b(i)
    return a, b, qa, qb


def test_two_registries_on_one_backend_each_run_only_their_own_tasks(shared: RedisQueueBackend) -> None:
    ran: list[tuple[str, int]] = []
    a, b, qa, qb = two_apps(shared, ran)
    with ThreadedWorker(registry=a) as worker:
        assert worker.backend is shared and worker.scheduler.consumed_queues() == [qa]
        wait_until(lambda: drained(shared, qa), message="registry a's worker ran a's tasks")
        assert shared.queue_info(qb)["pending"] == 3, "a's worker must not poll b's queue"
    assert ran == [("a", 0), ("a", 1), ("a", 2)]
    with ThreadedWorker(registry=b):
        wait_until(lambda: drained(shared, qb), message="registry b's worker ran b's tasks")
    assert ran[3:] == [("b", 0), ("b", 1), ("b", 2)]
    assert a.registered_queues() == [qa] and b.registered_queues() == [qb]
    assert a.lookup("app.work") is not b.lookup("app.work")
    assert default_registry.lookup("app.work") is None


def test_the_async_twin_runs_only_its_registrys_tasks(shared: RedisQueueBackend) -> None:
    ran: list[tuple[str, int]] = []
    _, b, qa, qb = two_apps(shared, ran)

    async def scenario() -> None:
        async with AsyncWorker(RedisQueueBackend(shared.url, shared.settings), registry=b) as worker:
            assert worker.scheduler.consumed_queues() == [qb]
            while not drained(shared, qb):
                await asyncio.sleep(0.02)
        await worker.backend.aclose()

    asyncio.run(scenario())
    assert ran == [("b", 0), ("b", 1), ("b", 2)]
    assert shared.queue_info(qa)["pending"] == 3


def test_another_registrys_task_is_unknown_to_a_worker_told_to_consume_its_queue(
    shared: RedisQueueBackend,
) -> None:
    backend = RedisQueueBackend(shared.url, prefix=shared.keys.prefix, **{**FAST, "unknown_task_grace": 0.2})
    ran: list[tuple[str, int]] = []
    other, mine = Registry(backend), Registry(backend)
    queue = qname()

    @other.fifo(queue=queue, name="app.theirs")
    def theirs() -> None:
        ran.append(("theirs", 0))

    theirs()
    with ThreadedWorker(registry=mine, queues=[queue]):
        wait_until(lambda: backend.dead_letters(queue), message="the unknown task was dead-lettered")
    (dead,) = backend.dead_letters(queue)
    assert dead.reason == "unknown-task" and dead.header["name"] == "app.theirs" and ran == []
    backend.close()


def test_a_registry_enqueues_to_its_own_backend_and_never_to_the_default(shared: RedisQueueBackend) -> None:
    unconfigured, configured = Registry(), Registry(shared)
    queue = qname()

    @unconfigured.fifo(queue=queue, name="app.nowhere")
    def nowhere() -> None:
        pass

    @configured.fifo(queue=queue, name="app.somewhere")
    def somewhere() -> None:
        pass

    pyfiq.configure(shared)  # the default registry's backend is no fallback for another's
    with pytest.raises(NotConfiguredError, match="configure"):
        nowhere()
    assert somewhere().queue == queue and shared.queue_info(queue)["pending"] == 1
    assert nowhere.registry is unconfigured and somewhere.registry is configured
    other = memory_backend(registry=unconfigured)
    nowhere()
    assert unconfigured.get_backend() is other and pyfiq.get_backend() is shared
    assert other.queue_info(queue)["pending"] == 1
    other.close()


def test_the_default_registry_keeps_working_as_before(shared: RedisQueueBackend) -> None:
    queue, ran = qname(), []
    pyfiq.configure(shared)

    @fifo(queue=queue, name=f"{queue}.work")
    def work(i: int) -> None:
        ran.append(i)

    assert pyfiq.get_backend() is shared and work.registry is default_registry
    assert default_registry.lookup(work.name) is work and queue in default_registry.registered_queues()
    work(1)
    work(2)
    with ThreadedWorker(shared, queues=[queue]) as worker:
        assert worker.registry is default_registry
        wait_until(lambda: ran == [1, 2])
    work(3)
    drain(shared, [queue])
    assert ran == [1, 2, 3]


def test_the_factories_configure_the_registry_they_are_given(shared: RedisQueueBackend) -> None:
    mine, queue, ran = Registry(), qname(), []

    @mine.fifo(queue=queue, name="app.mine")
    def task(i: int) -> None:
        ran.append(i)

    before = default_registry._backend
    worker = pyfiq.threaded_worker(shared, registry=mine)
    try:
        assert mine.get_backend() is shared and worker.registry is mine
        task(1)
        wait_until(lambda: ran == [1])
    finally:
        worker.stop(5)
    assert default_registry._backend is before

    async def scenario() -> None:
        aw = await async_worker(RedisQueueBackend(shared.url, shared.settings), registry=mine)
        try:
            assert aw.registry is mine and mine.get_backend() is aw.backend
            await task.asend_with_options(args=(2,))
            while ran != [1, 2]:
                await asyncio.sleep(0.02)
        finally:
            await aw.stop(5)
            await aw.backend.aclose()

    asyncio.run(scenario())
    assert default_registry._backend is before


def test_drain_runs_a_registrys_tasks() -> None:
    mine, queue, ran = Registry(), qname(), []
    backend = memory_backend(registry=mine)

    @mine.fifo(queue=queue, name="app.drained")
    def task(i: int) -> None:
        ran.append(i)

    task(1)
    task.send_with_options(args=(3,), delay=0.4)  # drain waits for a delayed task too
    task(2)
    drain(backend, [queue], registry=mine)
    assert ran == [1, 2, 3]
    task.send_with_options(args=(4,), delay=60)
    with pytest.raises(TimeoutError, match="still hold tasks"):
        drain(backend, [queue], registry=mine, timeout=0.5)
    backend.close()


def test_a_name_registered_twice_in_one_registry_warns_and_the_last_wins(caplog: pytest.LogCaptureFixture) -> None:
    mine, queue = Registry(), qname()

    def first() -> None:
        pass

    def second() -> None:
        pass

    def redefined() -> list[Any]:
        return [r for r in caplog.records if getattr(r, "pyfiq", {}).get("event") == "pyfiq.task_redefined"]

    with caplog.at_level(logging.WARNING, logger="pyfiq"):
        one = mine.fifo(queue=queue, name="app.twice")(first)
        mine.fifo(queue=queue, name="app.twice")(first)
        assert redefined() == [], "the same function registered again (a re-import) is no redefinition"
        Registry().fifo(queue=queue, name="app.twice")(second)
        assert redefined() == [], "another registry's name is its own"
        two = mine.fifo(queue=queue, name="app.twice")(second)
    (record,) = redefined()
    assert record.pyfiq == {"event": "pyfiq.task_redefined", "task": "app.twice", "queue": queue}  # type: ignore[attr-defined]
    assert mine.lookup("app.twice") is two and one.func is first
