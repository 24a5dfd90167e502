"""A representative behaviour set, run on any backend: what the suite checks over TLS, under a
minimal ACL and through Sentinel, where running the whole suite again would add little.

Both drivers run ordered tasks with a retry in place; a failing task is dead-lettered and
requeued; a queue is paused and resumed; the operator views read what happened."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

from pyfiq import AsyncWorker, RedisQueueBackend, ThreadedWorker, fifo
from tests.support.helpers import wait_until


def _queue() -> str:
    return f"smoke-{uuid.uuid4().hex[:8]}"


def run_smoke(backend: RedisQueueBackend) -> None:
    """Raises (an assertion, or pyfiq's own error) if any step misbehaves."""
    import pyfiq

    pyfiq.configure(backend)
    _ordered_with_a_retry(backend)
    _dead_letter_and_requeue(backend)
    _pause_and_resume(backend)
    _asyncio_worker(backend)


def _ordered_with_a_retry(backend: RedisQueueBackend) -> None:
    q, seen, failed = _queue(), [], threading.Event()

    @fifo(queue=q, name=f"{q}.step", retry_wait=0.01)
    def step(i: int) -> None:
        if i == 3 and not failed.is_set():
            failed.set()
            raise RuntimeError("first attempt fails")
        seen.append(i)

    for i in range(10):
        step(i)
    with ThreadedWorker(backend, queues=[q]):
        wait_until(lambda: len(seen) == 10, timeout=15, message=f"10 tasks of {q}")
    assert seen == list(range(10)), seen


def _dead_letter_and_requeue(backend: RedisQueueBackend) -> None:
    q, runs, fixed = _queue(), [], threading.Event()

    @fifo(queue=q, name=f"{q}.fragile", max_retries=0)
    def fragile(i: int) -> None:
        if not fixed.is_set():
            raise ValueError(f"broken {i}")
        runs.append(i)

    fragile(1)
    with ThreadedWorker(backend, queues=[q]):
        wait_until(lambda: backend.queue_info(q)["dead"] == 1, timeout=15, message="a dead letter")
        [letter] = backend.dead_letters(q)
        assert letter.reason == "exhausted" and "broken 1" in str(letter.header)
        assert backend.dead_letter_streams() == [q]
        fixed.set()
        assert backend.requeue_dead_letters(q) == 1
        wait_until(lambda: runs == [1], timeout=15, message="the requeued task")
    assert backend.purge_dead_letters(q) == 0


def _pause_and_resume(backend: RedisQueueBackend) -> None:
    q, seen = _queue(), []

    @fifo(queue=q, name=f"{q}.held")
    def held(i: int) -> None:
        seen.append(i)

    backend.pause(q)
    assert q in backend.paused()
    held(1)
    with ThreadedWorker(backend, queues=[q]) as worker:
        wait_until(lambda: q in backend.active_streams(), timeout=5)
        threading.Event().wait(0.5)
        assert seen == [], "a paused queue starts nothing"
        backend.resume(q)
        wait_until(lambda: seen == [1], timeout=15, message="the resumed queue")
        assert any(r["replica"] == worker.replica for r in backend.replicas())


def _asyncio_worker(backend: RedisQueueBackend) -> None:
    q, seen = _queue(), []

    @fifo(queue=q, name=f"{q}.coro")
    async def coro(i: int) -> None:
        seen.append(i)

    async def main() -> None:
        for i in range(5):
            await coro.asend_with_options(args=(i,))
        async with AsyncWorker(backend, queues=[q]):
            for _ in range(300):
                if len(seen) == 5:
                    break
                await asyncio.sleep(0.05)
        await backend.aclose()

    asyncio.run(main())
    assert seen == list(range(5)), seen


def smoke_settings() -> dict[str, Any]:
    return {"lease_ttl": 1.5, "poll_interval": 0.2, "shards": 4}
