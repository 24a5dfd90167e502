"""pyfiq.hooks: the events both drivers report (the same ones), a listener that raises, lease
take-overs, and enqueues; against a real redis-server and memory://."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import pyfiq
from pyfiq import AsyncWorker, ConfigurationError, RedisQueueBackend, TaskContext, current_task, fifo, hooks
from pyfiq.task import EncodedTask, new_task_id
from tests.support.helpers import drained, wait_until
from tests.workers.test_worker import qname
from tests.workers.test_worker import start_worker as start_worker  # the fixture, over both drivers


class Recorder(hooks.Hooks):
    """Every hook event of one queue, as plain tuples; tasks named by ``names[task id]``."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.names: dict[str, Any] = {}
        self.events: list[tuple[Any, ...]] = []
        self.durations: list[float] = []
        self._lock = threading.Lock()

    def _add(self, queue: str, *event: Any) -> None:
        if queue == self.queue:
            with self._lock:
                self.events.append(event)

    def _task(self, ctx: TaskContext) -> tuple[Any, int, int]:
        return self.names.get(ctx.id, ctx.id), ctx.attempt, ctx.deliveries

    def before_execution(self, ctx: TaskContext) -> None:
        self._add(ctx.queue, "before", *self._task(ctx))

    def after_execution(self, ctx: TaskContext, outcome: str, duration: float) -> None:
        if ctx.queue == self.queue:
            self.durations.append(duration)
        self._add(ctx.queue, "after", *self._task(ctx), outcome)

    def on_retry(self, ctx: TaskContext, error: BaseException, wait: float) -> None:
        self._add(ctx.queue, "retry", self.names.get(ctx.id), type(error).__name__, wait)

    def on_dead_letter(self, stream: str, reason: str, ctx: TaskContext | None) -> None:
        self._add(stream.split("#")[0], "dead", stream, reason, None if ctx is None else self.names.get(ctx.id))

    def on_lease(self, stream: str, event: str) -> None:
        self._add(stream.split("#")[0], "lease", stream, event)

    def on_enqueue(self, queue: str, count: int) -> None:
        self._add(queue, "enqueue", count)

    def seen(self, *event: Any) -> bool:
        with self._lock:
            return event in self.events


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder(qname())
    hooks.add(rec)
    yield rec
    hooks.remove(rec)


def _worker(w: Any) -> Any:
    return getattr(w, "worker", w)  # the AsyncWorker inside the fixture's thread wrapper


def test_a_run_reports_the_same_events_from_both_drivers(backend, start_worker, recorder) -> None:  # type: ignore[no-untyped-def]
    q = recorder.queue

    @fifo(queue=q, name=f"{q}.work", max_retries=1, retry_wait=0.01)
    def work(i: int) -> None:
        if i == 1 and current_task().attempt == 1:
            raise OSError("flaky")
        if i == 2:
            raise ValueError("bad input")

    recorder.names = {work(i).id: i for i in range(4)}
    start_worker([q])
    wait_until(lambda: recorder.seen("lease", q, "released"), message="the lease handed back")
    assert recorder.events == [
        *[("enqueue", 1)] * 4,
        ("lease", q, "acquired"),
        ("before", 0, 1, 1),
        ("after", 0, 1, 1, "succeeded"),
        ("before", 1, 1, 1),
        ("after", 1, 1, 1, "failed"),
        ("retry", 1, "OSError", 0.01),
        ("before", 1, 2, 1),
        ("after", 1, 2, 1, "succeeded"),
        ("before", 2, 1, 1),
        ("after", 2, 1, 1, "failed"),
        ("retry", 2, "ValueError", 0.01),
        ("before", 2, 2, 1),
        ("after", 2, 2, 1, "failed"),
        ("dead", q, "exhausted", 2),
        ("before", 3, 1, 1),
        ("after", 3, 1, 1, "succeeded"),
        ("lease", q, "released"),
    ]
    assert len(recorder.durations) == 6 and all(0 <= d < 5 for d in recorder.durations)


def test_a_task_that_cannot_be_decoded_is_reported_without_a_context(backend, start_worker, recorder) -> None:  # type: ignore[no-untyped-def]
    q = recorder.queue
    backend.enqueuer.enqueue(q, [EncodedTask(new_task_id(), 0, "0", b"\xff not a task record")])
    start_worker([q])
    wait_until(lambda: recorder.seen("lease", q, "released"), message="the lease handed back")
    assert recorder.events == [("lease", q, "acquired"), ("dead", q, "undecodable", None), ("lease", q, "released")]
    assert [d.reason for d in backend.dead_letters(q)] == ["undecodable"]


def test_a_listener_that_raises_is_logged_and_breaks_nothing(backend, start_worker, recorder, caplog) -> None:  # type: ignore[no-untyped-def]
    q, ran = recorder.queue, []

    class Broken(hooks.Hooks):
        def fail(self, *args: Any) -> None:
            raise RuntimeError("listener boom")

        before_execution = on_failure = after_execution = on_retry = on_dead_letter = fail  # type: ignore[assignment]
        on_lease = before_enqueue = on_enqueue = fail  # type: ignore[assignment]

    broken = Broken()
    hooks.remove(recorder)
    hooks.add(broken)
    hooks.add(recorder)  # after the broken one: it must still be called
    try:

        @fifo(queue=q, name=f"{q}.work", max_retries=1, retry_wait=0.01)
        def work(i: int) -> None:
            ran.append(i)
            if i == 1:
                raise ValueError("always")

        caplog.set_level(logging.WARNING, logger="pyfiq")
        for i in range(3):
            work(i)
        w = start_worker([q])
        wait_until(lambda: recorder.seen("lease", q, "released"), message="the lease handed back")
    finally:
        hooks.remove(broken)
    assert ran == [0, 1, 1, 2]
    assert drained(backend, q) and len(backend.dead_letters(q)) == 1
    assert _worker(w).healthy
    failed = [r.getMessage() for r in caplog.records if "pyfiq.hook_failed" in r.getMessage()]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "pyfiq.hook_failed" in r.getMessage())
    for event in hooks.EVENTS:
        assert any(f"hook={event}" in m and "RuntimeError: listener boom" in m for m in failed), event
    assert ("dead", q, "exhausted", None) in recorder.events  # names not set: only its presence counts


def test_a_lost_lease_and_its_take_over_are_reported(backend, start_worker, recorder) -> None:  # type: ignore[no-untyped-def]
    q, gate = recorder.queue, threading.Event()

    @fifo(queue=q, name=f"{q}.work")
    def work() -> None:
        if current_task().deliveries == 1:
            gate.wait(10)

    recorder.names = {work().id: "t"}
    w = start_worker([q])
    wait_until(lambda: recorder.seen("before", "t", 1, 1), message="the first run")
    backend.client.delete(backend.keys.stream(q).lease)  # as if it had lapsed: the next renewal is refused
    scheduler = _worker(w).scheduler
    wait_until(lambda: any(lease.lost for lease in scheduler.held_leases()), message="the loss noticed")
    gate.set()
    wait_until(lambda: recorder.seen("lease", q, "released"), message="the take-over's hand-back")
    assert recorder.events == [
        ("enqueue", 1),
        ("lease", q, "acquired"),
        ("before", "t", 1, 1),
        ("after", "t", 1, 1, "fenced"),
        ("lease", q, "lost"),
        ("lease", q, "taken_over"),
        ("before", "t", 1, 2),
        ("after", "t", 1, 2, "succeeded"),
        ("lease", q, "released"),
    ]


def test_an_asyncio_stop_past_its_deadline_reports_the_attempt_cancelled(backend, recorder) -> None:  # type: ignore[no-untyped-def]
    q = recorder.queue
    started = asyncio.Event()

    @fifo(queue=q, name=f"{q}.work")
    async def work() -> None:
        started.set()
        await asyncio.sleep(30)

    pyfiq.configure(backend)
    recorder.names = {work.send_with_options().id: "t"}

    async def main() -> None:
        async_backend = RedisQueueBackend(backend.url, backend.settings)
        worker = await AsyncWorker(async_backend, queues=[q]).start()
        await asyncio.wait_for(started.wait(), 10)
        assert await worker.stop(timeout=0.2) is False
        await async_backend.aclose()

    asyncio.run(main())
    assert recorder.events == [
        ("enqueue", 1),
        ("lease", q, "acquired"),
        ("before", "t", 1, 1),
        ("after", "t", 1, 1, "cancelled"),
        ("lease", q, "released"),
    ]


def test_enqueues_report_the_tasks_they_stored(backend, recorder) -> None:  # type: ignore[no-untyped-def]
    q = recorder.queue
    pyfiq.configure(backend)

    @fifo(queue=q, name=f"{q}.work", key=lambda i: f"k{i % 2}")
    async def work(i: int) -> None: ...

    work.send_with_options(args=(1,))
    work.send_with_options(args=(2,), dedup_key="once")
    work.send_with_options(args=(2,), dedup_key="once")  # a duplicate stores nothing
    work.enqueue_many([(3,), (4,), (5,)])  # two streams: one round trip each
    work.enqueue_many([(6,), (7,)], batch_id="b")
    work.enqueue_many([(6,), (7,), (8,)], batch_id="b")  # only the third is new

    async def send() -> None:
        await work.asend_with_options(args=(9,))
        await backend.aclose()

    asyncio.run(send())
    assert recorder.events == [("enqueue", n) for n in (1, 1, 2, 1, 1, 1, 1, 1)]


def test_listeners_are_added_once_removed_and_must_subclass_hooks() -> None:
    calls: list[tuple[str, int]] = []

    class Counter(hooks.Hooks):
        def on_enqueue(self, queue: str, count: int) -> None:
            calls.append((queue, count))

    listener = Counter()
    hooks.add(listener)
    hooks.add(listener)
    assert hooks.dispatcher.listens(hooks.Hooks.on_enqueue)
    hooks.dispatcher.on_enqueue("q-hooks-unit", 2)
    hooks.dispatcher.on_lease("q-hooks-unit", "acquired")  # not overridden: the no-op, never called
    hooks.remove(listener)
    hooks.dispatcher.on_enqueue("q-hooks-unit", 3)
    hooks.remove(listener)  # not registered any more: ignored
    assert calls == [("q-hooks-unit", 2)]

    class Duck:  # the right method name, but not a Hooks: a typo in it would go unnoticed
        def on_enqueue(self, queue: str, count: int) -> None: ...

    for wrong in (Duck(), object(), hooks.dispatcher):
        with pytest.raises(ConfigurationError, match="subclass Hooks"):
            hooks.add(wrong)  # type: ignore[arg-type]


def test_the_hook_methods_are_typed_no_ops_and_the_dispatcher_has_each() -> None:
    assert hooks.EVENTS == (
        "before_execution",
        "on_failure",
        "after_execution",
        "on_retry",
        "on_dead_letter",
        "on_lease",
        "before_enqueue",
        "on_enqueue",
    )
    plain = hooks.Hooks()
    assert plain.on_enqueue("q", 1) is None and plain.on_lease("s", "lost") is None
    for name in hooks.EVENTS:
        assert getattr(hooks.Dispatcher, name) is not getattr(hooks.Hooks, name), name
        assert (getattr(hooks.Hooks, name).__doc__ or "").strip(), f"{name} says when it is called"
