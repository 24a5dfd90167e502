"""Concurrent enqueues share round trips: order per producer, every caller's own handle, dedup
keys kept apart, fewer script calls than enqueues, and a failed shared round trip retried by
each caller alone; on a real redis-server, from threads and from asyncio tasks."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import redis

from pyfiq import RedisQueueBackend, TaskHandle, fifo
from pyfiq.redis import coalesce
from pyfiq.task import Entry, TaskRecord
from tests.workers.test_worker import qname


def stored(backend: RedisQueueBackend, stream: str) -> list[list[Any]]:
    raw = backend.client.lrange(backend.keys.stream(stream).pending, 0, -1)
    return [TaskRecord.decode(Entry.parse(r).payload, backend.settings.serializer).args for r in raw]


def evalsha_calls(backend: RedisQueueBackend) -> int:
    return int(backend.client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def per_producer_in_order(rows: list[list[Any]]) -> bool:
    seen: dict[int, list[int]] = {}
    for producer, i in rows:
        seen.setdefault(producer, []).append(i)
    return all(ids == sorted(ids) for ids in seen.values())


def test_threads_share_round_trips_and_keep_each_producers_order(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    work = fifo(queue=q, name=f"{q}.work", key=lambda p, i: f"k{p % 2}")(lambda p, i: None)
    work.send_with_options(args=(0, -1), backend=redis_backend)  # the layout check, alone
    handles: list[list[TaskHandle]] = [[] for _ in range(16)]
    start = threading.Barrier(16)

    def produce(p: int) -> None:
        start.wait()
        for i in range(50):
            handles[p].append(work.send_with_options(args=(p, i), backend=redis_backend))

    before = evalsha_calls(redis_backend)
    threads = [threading.Thread(target=produce, args=(p,)) for p in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls = evalsha_calls(redis_backend) - before
    rows = stored(redis_backend, f"{q}#k0") + stored(redis_backend, f"{q}#k1")
    assert len(rows) == 16 * 50 + 1
    assert per_producer_in_order([r for r in rows if r[1] >= 0])
    ids = {h.id for hs in handles for h in hs}
    assert len(ids) == 16 * 50 and not any(h.duplicate for hs in handles for h in hs)
    assert calls < 16 * 50, f"{calls} script calls for {16 * 50} enqueues: nothing was shared"


def test_asyncio_tasks_share_round_trips_and_keep_each_producers_order(redis_backend: RedisQueueBackend) -> None:
    q = qname()

    async def job(p: int, i: int) -> None:
        pass

    work = fifo(queue=q, name=f"{q}.work")(job)

    async def main() -> list[TaskHandle]:
        backend = redis_backend.copy()
        await work.asend_with_options(args=(0, -1), backend=backend)

        async def produce(p: int) -> list[TaskHandle]:
            return [await work.asend_with_options(args=(p, i), backend=backend) for i in range(20)]

        done = await asyncio.gather(*(produce(p) for p in range(50)))
        await backend.aclose()
        return [h for hs in done for h in hs]

    before = evalsha_calls(redis_backend)
    handles = asyncio.run(main())
    calls = evalsha_calls(redis_backend) - before
    rows = stored(redis_backend, q)
    assert len(rows) == 50 * 20 + 1 and per_producer_in_order(rows[1:])
    assert len({h.id for h in handles}) == 1000
    assert calls < 1000, f"{calls} script calls for 1000 enqueues: nothing was shared"


def test_dedup_keys_in_a_shared_round_trip_answer_each_caller(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    redis_backend.check_layout()
    first = coalesce.Request(q, redis_backend.encode([("a" * 32, TaskRecord("x", [1], {}))], None), ["same"])
    again = coalesce.Request(q, redis_backend.encode([("b" * 32, TaskRecord("x", [2], {}))], None), ["same"])
    plain = coalesce.Request(q, redis_backend.encode([("c" * 32, TaskRecord("x", [3], {}))], None), None)
    calls = coalesce.merged(redis_backend.ops, [first, plain, again])
    assert [len(group) for _, group in calls] == [1, 1, 1], "a request with dedup keys goes alone"
    coalesce.deliver(calls, redis_backend.send_enqueues([call for call, _ in calls]))
    assert first.result == [("a" * 32, True)] and plain.result == [("c" * 32, True)]
    assert again.result == [("a" * 32, False)], "the repeat answers with the first task"
    assert [r[0] for r in stored(redis_backend, q)] == [1, 3]


def test_a_failed_shared_round_trip_is_retried_by_each_caller_alone(
    redis_backend: RedisQueueBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = qname()
    work = fifo(queue=q, name=f"{q}.work")(lambda p, i: None)
    work.send_with_options(args=(0, -1), backend=redis_backend)
    failures = []

    def broken(calls: Any) -> list[Any]:
        failures.append(len(calls))
        raise redis.ConnectionError("connection reset by peer")

    monkeypatch.setattr(redis_backend, "send_enqueues", broken)
    gate = threading.Barrier(8)

    def produce(p: int) -> None:
        gate.wait()
        for i in range(20):
            work.send_with_options(args=(p, i), backend=redis_backend)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = stored(redis_backend, q)
    assert failures, "some enqueues met in a shared round trip"
    assert len(rows) == 8 * 20 + 1 and per_producer_in_order(rows[1:])
