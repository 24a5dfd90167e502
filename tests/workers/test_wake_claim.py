"""A wake-up is claimed by the threaded worker's listener itself, one thread hop less on the way
from an enqueue to its task's start, on a real redis-server. When that look fails, the
dispatcher looks instead (with its back-off and reports), and the task still runs; a claim
that fails part-way, in either worker, looks at its shards again rather than waiting for their
next idle poll; and stop() hands over a lease the listener was acquiring as it began."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from pyfiq import AsyncWorker, RedisQueueBackend, ThreadedWorker, fifo, hooks
from pyfiq.engine.protocol import Call
from tests.support.helpers import unique_prefix, wait_until

#: Long enough that only a wake-up can start the tasks within the tests' waits.
SETTINGS: dict[str, Any] = {"lease_ttl": 5, "poll_interval": 20, "shards": 4}


class Claims(hooks.Hooks):
    """The thread each lease was granted on."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def on_lease(self, stream: str, event: str) -> None:
        if event == "acquired":
            self.threads.append(threading.current_thread().name)


@pytest.fixture
def claims() -> Iterator[Claims]:
    listener = Claims()
    hooks.add(listener)
    yield listener
    hooks.remove(listener)


@dataclass
class Scene:
    """A queue on its own prefix, and a task that records each argument it runs with."""

    queue: str
    backend: RedisQueueBackend
    ran: list[Any]
    task: Any


@pytest.fixture
def scene(redis_server: Any) -> Iterator[Scene]:
    queue = f"wake-{uuid.uuid4().hex[:8]}"
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **SETTINGS)
    ran: list[Any] = []

    @fifo(queue=queue, name=f"{queue}.t")
    def task(tag: Any) -> None:
        ran.append(tag)

    yield Scene(queue, backend, ran, task)
    backend.close()


def idle_worker(backend: RedisQueueBackend, queue: str) -> ThreadedWorker:
    worker = ThreadedWorker(backend, queues=[queue], concurrency=1).start()
    # Its first look, at start, found nothing; from now on only a wake-up brings work.
    wait_until(lambda: backend.client.pubsub_numsub(backend.keys.wake(0))[0][1] >= 1, 5)
    time.sleep(0.3)
    return worker


def test_a_wake_up_is_claimed_by_the_listener_thread(scene: Scene, claims: Claims) -> None:
    queue, backend, ran, task = scene.queue, scene.backend, scene.ran, scene.task

    worker = idle_worker(backend, queue)
    try:
        for i in range(3):
            task.send_with_options(args=(i,), backend=backend)
            wait_until(lambda i=i: ran == list(range(i + 1)), 3)  # type: ignore[misc]
            time.sleep(0.1)  # the stream is forgotten: the next enqueue wakes the worker again
        assert claims.threads == ["pyfiq-wake"] * 3
    finally:
        worker.stop(5)


def test_a_failed_look_on_a_wake_up_is_left_to_the_dispatcher(scene: Scene, claims: Claims) -> None:
    queue, backend, ran, task = scene.queue, scene.backend, scene.ran, scene.task
    real = backend.call_many
    failed: list[str] = []

    def flaky(calls: Sequence[Call]) -> list[Any]:
        if threading.current_thread().name == "pyfiq-wake" and not failed:
            failed.append("once")
            raise redis.ConnectionError("cut")
        return real(calls)

    worker = idle_worker(backend, queue)
    backend.call_many = flaky  # type: ignore[method-assign]
    try:
        task.send_with_options(args=(0,), backend=backend)
        wait_until(lambda: ran == [0], 3)
        assert failed and claims.threads == ["pyfiq-dispatch"]
    finally:
        worker.stop(5)


def test_a_stop_during_the_listeners_claim_hands_the_stream_over_at_once(scene: Scene, claims: Claims) -> None:
    """stop() waits for a lease the listener is acquiring to reach an executor, which releases
    it: no lease is left to lapse after stop() returned (the next replica starts at once)."""
    queue, backend, ran, task = scene.queue, scene.backend, scene.ran, scene.task
    real = backend.call
    claiming = threading.Event()

    def slow(call: Call, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "pyfiq-wake" and call.script == "acquire":
            claiming.set()
            time.sleep(0.5)  # a slow round trip: stop() begins meanwhile
        return real(call, *args, **kwargs)

    worker = idle_worker(backend, queue)
    backend.call = slow  # type: ignore[method-assign]
    task.send_with_options(args=("task",), backend=backend)
    assert claiming.wait(3)
    assert worker.stop(5)
    assert claims.threads == ["pyfiq-wake"]
    assert not backend.client.exists(backend.keys.stream(queue).lease), "the lease was left to lapse"
    backend.call = real  # type: ignore[method-assign]
    other = ThreadedWorker(backend, queues=[queue], concurrency=1).start()
    try:
        wait_until(lambda: ran == ["task"], 2)  # long before the 5 s lease would lapse
    finally:
        other.stop(5)


def test_a_claim_that_fails_part_way_is_looked_at_again_at_once(scene: Scene, claims: Claims) -> None:
    """An acquire that fails (a cut connection) after the look found the stream: the retry
    looks at the shard again, rather than waiting for its next idle poll."""
    queue, backend, ran, task = scene.queue, scene.backend, scene.ran, scene.task
    real = backend.call
    failed: list[str] = []

    def flaky(call: Call, *args: Any, **kwargs: Any) -> Any:
        if call.script == "acquire" and not failed:
            failed.append(threading.current_thread().name)
            raise redis.ConnectionError("cut before the write")
        return real(call, *args, **kwargs)

    worker = idle_worker(backend, queue)
    backend.call = flaky  # type: ignore[method-assign]
    try:
        task.send_with_options(args=(0,), backend=backend)
        wait_until(lambda: ran == [0], 3)
        assert failed == ["pyfiq-wake"] and claims.threads == ["pyfiq-dispatch"]
    finally:
        worker.stop(5)


def test_an_async_workers_claim_that_fails_part_way_is_looked_at_again_at_once(scene: Scene) -> None:
    queue, backend, ran, task = scene.queue, scene.backend, scene.ran, scene.task
    real = backend.acall
    failed: list[str] = []

    async def flaky(call: Call, *args: Any, **kwargs: Any) -> Any:
        if call.script == "acquire" and not failed:
            failed.append(call.script)
            raise redis.ConnectionError("cut before the write")
        return await real(call, *args, **kwargs)

    async def main() -> None:
        worker = await AsyncWorker(backend, queues=[queue], concurrency=1).start()
        try:
            await asyncio.sleep(0.5)  # its first look, at start, found nothing
            backend.acall = flaky  # type: ignore[method-assign]
            await task.asend_with_options(args=(0,), backend=backend)
            deadline = time.monotonic() + 3
            while ran != [0] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            await worker.stop(5)

    asyncio.run(main())
    assert failed and ran == [0]
