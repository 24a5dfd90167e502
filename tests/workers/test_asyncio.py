"""asyncio: @fifo on async def, async enqueue, the AsyncWorker's stop deadline and heartbeats,
and the FastAPI example."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest

import pyfiq
from pyfiq import AsyncWorker, RedisQueueBackend, ThreadedWorker, current_task, fifo
from tests.support.helpers import FAST, drained, unique_prefix, wait_until


def qname() -> str:
    return f"aq-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def rbackend(redis_server) -> RedisQueueBackend:  # type: ignore[no-untyped-def]
    return RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)


def test_async_task_enqueues_by_await_in_a_loop_and_directly_from_sync_code(rbackend: RedisQueueBackend) -> None:
    q, seen = qname(), []
    pyfiq.configure(rbackend)

    @fifo(queue=q, name=f"{q}.deliver")
    async def deliver(i: int) -> None:
        await asyncio.sleep(0)
        seen.append((i, current_task().attempt))

    sync_handle = deliver(0)  # no running loop: enqueues at once
    assert isinstance(sync_handle, pyfiq.TaskHandle)

    async def main() -> None:
        pending = deliver(1)
        assert asyncio.iscoroutine(pending)
        handle = await pending
        assert handle.queue == q and not handle.duplicate
        async with AsyncWorker(rbackend, queues=[q]):
            for _ in range(200):
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.02)
        await rbackend.aclose()

    asyncio.run(main())
    assert seen == [(0, 1), (1, 1)]


def test_threaded_worker_runs_async_tasks_on_its_own_loop(rbackend: RedisQueueBackend) -> None:
    q, seen = qname(), []
    pyfiq.configure(rbackend)

    @fifo(queue=q, name=f"{q}.deliver", max_retries=1, retry_wait=0.01)
    async def deliver(i: int) -> int:
        if i == 1 and current_task().attempt == 1:
            raise OSError("retry once")
        seen.append(i)
        return i

    for i in range(4):
        deliver(i)
    with ThreadedWorker(rbackend, queues=[q]):
        wait_until(lambda: seen == [0, 1, 2, 3])
    assert drained(rbackend, q)


def test_stop_deadline_cancels_a_running_async_task_and_leaves_it_in_redis(rbackend: RedisQueueBackend) -> None:
    q = qname()
    started, finished = threading.Event(), []
    pyfiq.configure(rbackend)

    @fifo(queue=q, name=f"{q}.slow")
    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)
        finished.append(True)

    slow()

    async def main() -> bool:
        worker = await AsyncWorker(rbackend, queues=[q]).start()
        while not started.is_set():
            await asyncio.sleep(0.01)
        t = time.monotonic()
        clean = await worker.stop(timeout=0.3)
        assert time.monotonic() - t < 3
        await rbackend.aclose()
        return clean

    assert asyncio.run(main()) is False
    info = rbackend.queue_info(q)
    assert finished == []
    assert info["inflight"] == 1 and info["lease"] is None, "handed over at once, task kept for redelivery"


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_heartbeats_keep_the_lease_while_a_task_runs_past_the_ttl(rbackend: RedisQueueBackend, kind: str) -> None:
    q, runs = qname(), []
    pyfiq.configure(rbackend)
    hold = rbackend.settings.lease_ttl * 2

    if kind == "async":

        @fifo(queue=q, name=f"{q}.long")
        async def long_task() -> None:
            runs.append(current_task().fencing_token)
            await asyncio.sleep(hold)

    else:

        @fifo(queue=q, name=f"{q}.long")
        def long_task() -> None:  # blocking: runs in the thread pool, not on the loop
            runs.append(current_task().fencing_token)
            time.sleep(hold)

    long_task()

    async def main() -> None:
        rival = rbackend.copy()
        async with AsyncWorker(rbackend, queues=[q]), AsyncWorker(rival, queues=[q]):
            for _ in range(int(hold * 50) + 200):
                if rbackend.queue_info(q)["pending"] == 0 and rbackend.queue_info(q)["inflight"] == 0:
                    break
                await asyncio.sleep(0.02)
        await rival.aclose()
        await rbackend.aclose()

    asyncio.run(main())
    assert len(runs) == 1, "the lease must not lapse while the task runs"
    assert drained(rbackend, q)


def test_fastapi_example_enqueues_from_an_endpoint_and_delivers_in_order() -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from examples import fastapi_app

    with TestClient(fastapi_app.app) as client:
        for seq in range(5):
            for customer in ("c-1", "c-2"):
                r = client.post("/events", json={"customer_id": customer, "kind": "paid", "seq": seq})
                assert r.status_code == 202
                assert r.json()["stream"] == f"webhooks#{customer}"
        deadline = time.monotonic() + 10
        delivered: list[dict[str, Any]] = []
        while time.monotonic() < deadline and len(delivered) < 10:
            delivered = client.get("/delivered").json()
            time.sleep(0.05)
    assert len(delivered) == 10
    for customer in ("c-1", "c-2"):
        assert [e["seq"] for e in delivered if e["customer_id"] == customer] == list(range(5))


def test_the_asyncio_page_fastapi_snippet_serves_and_runs_its_task(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """docs/guide/asyncio.md, "With FastAPI or Starlette": the app serves, and its task runs."""
    import importlib.util
    import re
    from pathlib import Path

    from fastapi.testclient import TestClient

    page = (Path(__file__).resolve().parents[2] / "docs" / "guide" / "asyncio.md").read_text()
    block = re.search(r"## With FastAPI or Starlette\n.*?```python\n(.*?)```", page, flags=re.S)
    assert block is not None and "pyfiq_lifespan(backend" in block.group(1)
    source = block.group(1).replace('"redis://localhost"', repr(f"memory://docs-{uuid.uuid4().hex}"))
    path = tmp_path / "docs_asyncio.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("docs_asyncio", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with TestClient(module.app) as client:
        reply = client.post("/events", json={"id": 1})
        assert reply.status_code == 200 and len(reply.json()["task"]) == 32
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = module.backend.queue_info("webhooks")
            if info["pending"] == info["inflight"] == 0:
                break
            time.sleep(0.02)
        info = module.backend.queue_info("webhooks")
        assert (info["pending"], info["inflight"], info["dead"]) == (0, 0, 0)
