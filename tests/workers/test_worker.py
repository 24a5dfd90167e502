"""Behaviour of @fifo and the threaded worker, against a real redis-server and memory://."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

import pyfiq
from pyfiq import (
    AsyncWorker,
    BackendUnavailableError,
    ConfigurationError,
    NotConfiguredError,
    RedisQueueBackend,
    SerializationError,
    ThreadedWorker,
    current_task,
    fifo,
)
from pyfiq.task import TaskRecord
from pyfiq_harness.servers import free_port
from tests.support.helpers import FAST, drained, unique_prefix, wait_until


class Journal:
    """Thread-safe record of (queue, item, event, time) to check order and exclusion."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, str, float]] = []
        self._lock = threading.Lock()

    def add(self, queue: str, item: Any, event: str) -> None:
        with self._lock:
            self.events.append((queue, item, event, time.monotonic()))

    def items(self, queue: str, event: str = "start") -> list[Any]:
        return [i for q, i, e, _ in list(self.events) if q == queue and e == event]


class AsyncWorkerInThread:
    """Drives an AsyncWorker on its own event loop so the same tests run against both drivers."""

    def __init__(self, backend: RedisQueueBackend, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.worker = self._run(self._make(backend, kw))

    async def _make(self, backend: RedisQueueBackend, kw: dict[str, Any]) -> AsyncWorker:
        return AsyncWorker(backend, **kw)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def start(self) -> AsyncWorkerInThread:
        self._run(self.worker.start())
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        result = bool(self._run(self.worker.stop(timeout)))
        return result

    def close(self) -> None:
        self._run(self.worker.backend.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def held_streams(self) -> list[str]:
        return self.worker.held_streams


@pytest.fixture(params=["threaded", "asyncio"])
def start_worker(request: pytest.FixtureRequest, backend: RedisQueueBackend) -> Iterator[Callable[..., Any]]:
    """Starts workers of the parametrized driver; the behaviour suite runs against both."""
    workers: list[Any] = []

    def start(queues: list[str], b: RedisQueueBackend | None = None, **kw: Any) -> Any:
        if request.param == "threaded":
            w: Any = ThreadedWorker(b or backend, queues=queues, **kw).start()
        else:
            kw.pop("concurrency", None)
            w = AsyncWorkerInThread((b or backend).copy(), queues=queues, **kw).start()
        workers.append(w)
        return w

    pyfiq.configure(backend)
    yield start
    for w in workers:
        w.stop(timeout=5)
        if isinstance(w, AsyncWorkerInThread):
            w.close()


def qname() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


def test_tasks_run_in_order_and_a_retry_holds_the_queue(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()

    @fifo(queue=q, name=f"{q}.work", max_retries=3, retry_wait=0.02)
    def work(i: int) -> None:
        log.add(q, (i, current_task().attempt), "start")
        if i == 2 and current_task().attempt < 3:
            raise OSError("flaky upstream")

    for i in range(6):
        work(i)
    start_worker([q])
    wait_until(lambda: len(log.items(q)) == 8, message="all attempts")
    assert log.items(q) == [(0, 1), (1, 1), (2, 1), (2, 2), (2, 3), (3, 1), (4, 1), (5, 1)]
    wait_until(lambda: drained(backend, q))
    assert backend.dead_letters(q) == []


def test_exhausted_task_is_dead_lettered_with_its_error_and_the_queue_moves_on(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()
    errors: list[tuple[str, int]] = []

    def on_error(exc: BaseException, task: pyfiq.TaskContext, binding: Any) -> None:
        errors.append((type(exc).__name__, task.attempt))

    @fifo(queue=q, name=f"{q}.work", max_retries=2, retry_wait=0.01, on_error=on_error)
    def work(i: int) -> None:
        log.add(q, i, "start")
        if i == 1:
            raise ValueError(f"bad input {i}")

    handles = [work(i) for i in range(3)]
    start_worker([q])
    wait_until(lambda: drained(backend, q))
    assert log.items(q) == [0, 1, 1, 1, 2]
    assert errors == [("ValueError", 1), ("ValueError", 2), ("ValueError", 3)]
    (dead,) = backend.dead_letters(q)
    assert dead.reason == "exhausted"
    assert dead.task_id == handles[1].id
    assert dead.header["attempts"] == 3 and dead.header["deliveries"] == 1
    assert dead.header["error_type"] == "builtins.ValueError" and dead.header["error"] == "bad input 1"
    assert "raise ValueError" in dead.header["traceback"]
    assert dead.record is not None and dead.record.args == [1] and dead.record.name == f"{q}.work"
    assert dead.header["replica"]


def test_max_retries_minus_one_retries_forever_and_blocks_the_queue(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()

    @fifo(queue=q, name=f"{q}.work", max_retries=-1, retry_wait=0.01)
    def work(i: int) -> None:
        log.add(q, i, "start")
        if i == 0 and current_task().attempt <= 12:
            raise ConnectionError("down")

    work(0)
    work(1)
    start_worker([q])
    wait_until(lambda: drained(backend, q))
    assert log.items(q) == [0] * 13 + [1]
    assert backend.dead_letters(q) == []


def test_on_exhausted_block_keeps_the_queue_waiting_until_the_task_succeeds(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()
    healthy = threading.Event()

    @fifo(
        queue=q,
        name=f"{q}.work",
        retry=Retrying(stop=stop_after_attempt(2), wait=wait_fixed(0.02)),
        on_exhausted="block",
    )
    def work(i: int) -> None:
        log.add(q, i, "start")
        if i == 0 and not healthy.is_set():
            raise RuntimeError("upstream 503")

    work(0)
    work(1)
    start_worker([q])
    wait_until(lambda: len(log.items(q)) >= 6, message="several exhausted rounds")
    assert set(log.items(q)) == {0}, "nothing behind a blocked task may start"
    healthy.set()
    wait_until(lambda: drained(backend, q))
    assert log.items(q)[-2:] == [0, 1]
    assert backend.dead_letters(q) == []


def test_tenacity_policy_retries_only_the_chosen_exceptions(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()

    @fifo(
        queue=q,
        name=f"{q}.work",
        retry=Retrying(retry=retry_if_exception_type(OSError), stop=stop_after_attempt(5), wait=wait_fixed(0)),
    )
    def work(kind: str) -> None:
        log.add(q, kind, "start")
        if kind == "io" and current_task().attempt < 3:
            raise OSError("retry me")
        if kind == "bug":
            raise KeyError("do not retry me")

    work("io")
    work("bug")
    start_worker([q])
    wait_until(lambda: drained(backend, q))
    assert log.items(q) == ["io", "io", "io", "bug"]
    (dead,) = backend.dead_letters(q)
    assert dead.header["attempts"] == 1 and dead.header["error_type"] == "builtins.KeyError"


def test_current_task_exposes_id_queue_attempt_deliveries_and_fencing_token(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q = qname()
    seen: list[pyfiq.TaskContext] = []
    results: list[tuple[Any, str]] = []

    @fifo(
        queue=q,
        name=f"{q}.work",
        on_success=lambda result, task, binding: results.append((result, binding.name)),
    )
    def work(x: int) -> int:
        seen.append(current_task())
        return x * 2

    with pytest.raises(RuntimeError, match="outside a running pyfiq task"):
        current_task()
    handle = work(21)
    assert handle.queue == q and handle.name == f"{q}.work" and not handle.duplicate
    start_worker([q])
    wait_until(lambda: results)
    (ctx,) = seen
    assert ctx.id == handle.id and ctx.queue == q and ctx.name == f"{q}.work"
    assert ctx.attempt == 1 and ctx.deliveries == 1 and ctx.fencing_token > 0
    assert ctx.enqueued_at.year >= 2024 and ctx.expires_at is None
    assert results == [(42, f"{q}.work")]


def test_unknown_task_is_left_to_other_replicas_then_dead_lettered_in_order(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()
    graced = backend.copy(backend.settings.replace(unknown_task_grace=0.5))

    @fifo(queue=q, name=f"{q}.known")
    def known() -> None:
        log.add(q, "known", "start")

    backend.enqueue(q, [(uuid.uuid4().hex, TaskRecord("somewhere.removed_function", [], {}))])
    known()
    start_worker([q], b=graced)
    time.sleep(0.3)
    assert log.items(q) == [], "the task behind an unknown one must wait for it"
    info = backend.queue_info(q)
    assert info["pending"] + info["inflight"] == 2, "both wait; the unknown one was never started here"
    wait_until(lambda: drained(backend, q), timeout=10)
    (dead,) = backend.dead_letters(q)
    assert dead.reason == "unknown-task" and dead.header["name"] == "somewhere.removed_function"
    assert dead.header["deliveries"] == 1, "hand-offs are not deliveries"
    assert log.items(q) == ["known"]


def test_undecodable_payload_is_dead_lettered_and_the_worker_goes_on(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        log.add(q, i, "start")

    work(1)
    k = backend.keys.stream(q)
    backend.client.rpush(k.pending, b"f" * 32 + b"|1|0|\x80not json")
    work(2)
    start_worker([q])
    wait_until(lambda: drained(backend, q))
    assert log.items(q) == [1, 2]
    (dead,) = backend.dead_letters(q)
    assert dead.reason == "undecodable" and dead.task_id == "f" * 32 and dead.record is None


def test_expired_task_is_dead_lettered_instead_of_run(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()

    @fifo(queue=q, name=f"{q}.work", expires_in=0.05)
    def work(i: int) -> None:
        log.add(q, i, "start")

    work(1)
    work.send_with_options(args=(2,), expires_in=60)
    time.sleep(0.1)
    start_worker([q])
    wait_until(lambda: drained(backend, q))
    assert log.items(q) == [2]
    assert [d.reason for d in backend.dead_letters(q)] == ["expired"]


def test_unserializable_arguments_are_rejected_at_enqueue_and_nothing_is_stored(backend) -> None:  # type: ignore[no-untyped-def]
    q = qname()
    pyfiq.configure(backend)

    @fifo(queue=q, name=f"{q}.work")
    def work(x: Any) -> None:
        pass

    with pytest.raises(SerializationError, match=f"{q}.work.*not JSON serializable"):
        work(object())
    assert backend.queue_info(q)["pending"] == 0


def test_dedup_key_returns_the_first_handle(backend) -> None:  # type: ignore[no-untyped-def]
    q = qname()
    pyfiq.configure(backend)

    @fifo(queue=q, name=f"{q}.work")
    def work(x: int) -> None:
        pass

    first = work.send_with_options(args=(1,), dedup_key="evt-1")
    again = work.send_with_options(args=(1,), dedup_key="evt-1")
    assert again.duplicate and again.id == first.id and not first.duplicate
    assert backend.queue_info(q)["pending"] == 1


def test_mutual_exclusion_and_order_with_two_workers(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    queues, log = [qname() for _ in range(4)], Journal()
    funcs = {}
    for q in queues:

        def work(i: int, q: str = q) -> None:
            log.add(q, i, "start")
            time.sleep(0.002)
            log.add(q, i, "end")

        funcs[q] = fifo(queue=q, name=f"{q}.work")(work)
    second = backend.copy()
    start_worker(queues, concurrency=2)
    start_worker(queues, b=second, concurrency=2)
    for i in range(25):
        for q in queues:
            funcs[q](i)
    wait_until(lambda: all(drained(backend, q) for q in queues), timeout=30)
    for q in queues:
        assert log.items(q) == list(range(25))
        events = [(e, t) for qq, _, e, t in log.events if qq == q]
        running = 0
        for e, _ in sorted(events, key=lambda x: x[1]):
            running += 1 if e == "start" else -1
            assert running in (0, 1), f"two executions of {q} overlapped"


def test_graceful_stop_hands_the_lease_over_at_once(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    slow = backend.settings.replace(lease_ttl=10.0)
    a_backend = backend.copy(slow)
    b_backend = backend.copy(slow)
    q, log = qname(), Journal()

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        log.add(q, (i, current_task().replica), "start")
        time.sleep(0.05)

    for i in range(40):
        work(i)
    a = start_worker([q], b=a_backend, replica="a")
    wait_until(lambda: len(log.items(q)) >= 3)
    b = start_worker([q], b=b_backend, replica="b")
    assert a.stop(timeout=5)
    stopped = time.monotonic()
    wait_until(lambda: any(r == "b" for _, r in log.items(q)), timeout=5)
    took = time.monotonic() - stopped
    assert took < 2.0, f"hand-over took {took:.2f}s, lease TTL is 10s"
    wait_until(lambda: drained(backend, q), timeout=20)
    assert [i for i, _ in log.items(q)] == list(range(40))
    b.stop()


def test_lease_lost_mid_task_drops_the_result_and_acks_nothing(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q = qname()
    started, successes = threading.Event(), []

    @fifo(queue=q, name=f"{q}.work", on_success=lambda *a: successes.append(a))
    def work() -> None:
        started.set()
        time.sleep(1.0)

    work()
    w = start_worker([q])
    assert started.wait(5)
    lease_key = backend.keys.stream(q).lease
    # A rival takes the stream over as if this worker had been paused past the TTL.
    backend.client.set(lease_key, "999:rival", px=10_000)
    wait_until(lambda: not w.held_streams, timeout=5, message="worker gives the stream up")
    info = backend.queue_info(q)
    assert info["inflight"] == 1 and info["lease"] == "999:rival"
    assert successes == []
    assert backend.dead_letters(q) == []


def test_prefetch_keeps_order_and_acks_in_batches(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    fast = backend.copy(backend.settings.replace(prefetch=10, batch_limit=50))
    q, log = qname(), Journal()

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        log.add(q, i, "start")

    for i in range(120):
        work(i)
    start_worker([q], b=fast)
    wait_until(lambda: drained(backend, q), timeout=20)
    assert log.items(q) == list(range(120))


def test_worker_consumes_queues_defined_after_it_started(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    w = ThreadedWorker(backend).start()
    try:
        q, log = qname(), Journal()

        @fifo(queue=q, name=f"{q}.late")
        def late(i: int) -> None:
            log.add(q, i, "start")

        late(7)
        wait_until(lambda: log.items(q) == [7])
    finally:
        assert w.stop(timeout=5)
        assert w.stop(timeout=5), "stop() is idempotent"


def test_worker_as_context_manager_stops_cleanly(backend) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()
    pyfiq.configure(backend)

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        log.add(q, i, "start")

    with ThreadedWorker(backend, queues=[q]) as w:
        work(1)
        wait_until(lambda: log.items(q) == [1])
    assert w.held_streams == []
    assert backend.queue_info(q)["lease"] is None


def test_enqueue_with_nothing_configured_fails_at_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pyfiq.functions import default_registry

    monkeypatch.setattr(default_registry, "_backend", None)

    @fifo(queue="nowhere", name="tests.nowhere")
    def nowhere() -> None:
        pass

    t = time.monotonic()
    with pytest.raises(NotConfiguredError, match="configure"):
        nowhere()
    assert time.monotonic() - t < 1


def test_enqueue_to_unreachable_redis_gives_up_after_bounded_retries() -> None:
    backend = RedisQueueBackend(
        f"redis://127.0.0.1:{free_port()}/0", prefix=unique_prefix(), enqueue_attempts=3, enqueue_timeout=2
    )

    @fifo(queue="unreachable", name="tests.unreachable")
    def task() -> None:
        pass

    t = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="unreachable after 3 attempts"):
        task.send_with_options(backend=backend)
    assert time.monotonic() - t < 5


def test_plain_function_stays_callable_and_names_are_explicit(backend) -> None:  # type: ignore[no-untyped-def]
    @fifo(queue="named", name="billing.charge")
    def charge(cents: int) -> int:
        return cents + 1

    assert charge.func(1) == 2
    assert charge.name == "billing.charge" and charge.__name__ == "charge"
    pyfiq.configure(backend)
    charge(5)
    (raw,) = backend.client.lrange(backend.keys.stream("named").pending, 0, -1)
    assert b'"name":"billing.charge"' in raw


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"queue": "bad name"}, "invalid queue name"),
        ({"queue": "q", "max_retries": -2}, "max_retries"),
        ({"queue": "q", "retry": "often"}, "tenacity Retrying"),
        ({"queue": "q", "retry": Retrying(), "max_retries": 1}, "either retry="),
        ({"queue": "q", "on_exhausted": "ignore"}, "on_exhausted"),
    ],
)
def test_bad_decorator_arguments_fail_clearly(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        fifo(**kwargs)(lambda: None)


def test_task_raising_system_exit_fails_like_any_error_and_the_worker_survives(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()

    @fifo(queue=q, name=f"{q}.work", max_retries=0)
    def work(i: int) -> None:
        log.add(q, i, "start")
        if i == 0:
            raise SystemExit(3)

    for i in range(3):
        work(i)
    start_worker([q], concurrency=1)
    wait_until(lambda: drained(backend, q))
    assert log.items(q) == [0, 1, 2]
    (dead,) = backend.dead_letters(q)
    assert dead.header["error_type"].endswith("TaskExit") and "SystemExit" in dead.header["error"]


def test_graceful_stops_mid_retry_never_make_a_task_poison(backend) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()
    strict = backend.settings.replace(max_deliveries=2)
    pyfiq.configure(backend)

    @fifo(queue=q, name=f"{q}.work", max_retries=-1, retry_wait=0.05)
    def work() -> None:
        log.add(q, current_task().deliveries, "start")
        raise OSError("still down")

    work()
    for _ in range(4):  # four rolling restarts while the task keeps failing
        w = ThreadedWorker(backend.copy(strict), queues=[q]).start()
        wait_until(lambda: len(log.items(q)) >= 2)
        assert w.stop(timeout=5)
        log.events.clear()
    assert backend.dead_letters(q) == []
    assert backend.queue_info(q)["inflight"] + backend.queue_info(q)["pending"] == 1


def test_stop_racing_an_acquire_leaves_no_lease_behind(backend) -> None:  # type: ignore[no-untyped-def]
    q = qname()
    pyfiq.configure(backend)

    @fifo(queue=q, name=f"{q}.work")
    def work() -> None:
        time.sleep(0.01)

    for _ in range(5):
        for _ in range(3):
            work()
        w = ThreadedWorker(backend, queues=[q]).start()
        assert w.stop(timeout=5)
        assert backend.queue_info(q)["lease"] is None


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="heartbeat_interval"):
        pyfiq.Settings(lease_ttl=3, heartbeat_interval=2)
    with pytest.raises(ConfigurationError, match="prefetch"):
        pyfiq.Settings(prefetch=0)
    with pytest.raises(ConfigurationError, match="at most 1000"):
        pyfiq.Settings(prefetch=5000, batch_limit=5000)
    assert pyfiq.Settings(lease_ttl=5).effective_heartbeat == 1.0


def test_replicas_with_different_shard_counts_are_refused(redis_server) -> None:  # type: ignore[no-untyped-def]
    prefix = unique_prefix()
    RedisQueueBackend(redis_server.url, prefix=prefix, shards=4).check_layout()
    with pytest.raises(ConfigurationError, match="4 shards"):
        ThreadedWorker(RedisQueueBackend(redis_server.url, prefix=prefix, shards=8), queues=["x"]).start()


_ = FAST


def test_enqueue_many_keeps_order_and_rejects_the_whole_batch_on_a_bad_argument(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()

    @fifo(queue=q, name=f"{q}.work")
    def work(i: Any) -> None:
        log.add(q, i, "start")

    with pytest.raises(SerializationError):
        work.enqueue_many([(1,), (object(),)])
    assert backend.queue_info(q)["pending"] == 0
    handles = work.enqueue_many([(i,) for i in range(1200)])
    assert len({h.id for h in handles}) == 1200
    start_worker([q])
    wait_until(lambda: drained(backend, q), timeout=30)
    assert log.items(q) == list(range(1200))
