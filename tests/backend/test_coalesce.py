"""Concurrent enqueues share round trips: order per producer, every caller's own handle, dedup
keys kept apart, fewer script calls than enqueues, and a failed shared round trip retried by
each caller alone; on a real redis-server, from threads and from asyncio tasks."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from typing import Any

import pytest
import redis

from pyfiq import RedisQueueBackend, TaskHandle, fifo
from pyfiq.backend import coalesce
from pyfiq.errors import EnqueueOutcomeUnknown
from pyfiq.task import Entry, TaskRecord
from tests.support.helpers import wait_until
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
    redis_backend.transport.lay_out(redis_backend.keys.shard_of(q))  # the raw round trip below writes no layout
    first = coalesce.Request(q, redis_backend.encode([("a" * 32, TaskRecord("x", [1], {}))], None), ["same"])
    again = coalesce.Request(q, redis_backend.encode([("b" * 32, TaskRecord("x", [2], {}))], None), ["same"])
    plain = coalesce.Request(q, redis_backend.encode([("c" * 32, TaskRecord("x", [3], {}))], None), None)
    calls = coalesce.merged(redis_backend.ops, [first, plain, again])
    assert [len(group) for _, group in calls] == [1, 1, 1], "a request with dedup keys goes alone"
    coalesce.deliver(calls, redis_backend.enqueuer.shared_round_trip([call for call, _ in calls]).run())
    assert first.result == [("a" * 32, True)] and plain.result == [("c" * 32, True)]
    assert again.result == [("a" * 32, False)], "the repeat answers with the first task"
    assert [r[0] for r in stored(redis_backend, q)] == [1, 3]


class Unsent:
    """A shared round trip that fails while connecting: nothing of it reached Redis."""

    sent = False
    replies: list[Any] = []

    def __init__(self, failures: list[int], calls: Any) -> None:
        failures.append(len(calls))

    def run(self) -> list[Any]:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")


def test_a_shared_round_trip_that_failed_before_its_write_is_retried_by_each_caller_alone(
    redis_backend: RedisQueueBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = qname()
    work = fifo(queue=q, name=f"{q}.work")(lambda p, i: None)
    work.send_with_options(args=(0, -1), backend=redis_backend)
    failures: list[int] = []
    monkeypatch.setattr(redis_backend.enqueuer, "shared_round_trip", lambda calls: Unsent(failures, calls))
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


class Interrupted(BaseException):
    """What a signal handler raises, like KeyboardInterrupt: no ``except Exception`` takes it."""


def test_a_caller_interrupted_while_it_waits_never_hangs_the_others(redis_backend: RedisQueueBackend) -> None:
    """Waiting callers are woken one after another, each by the one before it: a caller that a
    signal handler interrupts while it waits (the main thread, sent SIGUSR1 every half
    millisecond) must step out without breaking that chain or losing the turn, or every thread
    queued behind it would wait forever. What it never sent is not stored; every handle a
    caller got is. When it led a round trip, the others still get their own outcome: their
    handle, or (when the interruption cut the round trip where its replies could not be read)
    ``EnqueueOutcomeUnknown``; no task is ever stored twice."""
    q = qname()
    work = fifo(queue=q, name=f"{q}.work", key=lambda p, i: "k")(lambda p, i: None)
    work.send_with_options(args=(-1, -1), backend=redis_backend)  # the layout check, alone
    handles: list[TaskHandle] = []
    unknown: list[str] = []
    stop = threading.Event()

    def produce(p: int) -> None:
        for i in range(300):
            try:
                handles.append(work.send_with_options(args=(p, i), backend=redis_backend))
            except EnqueueOutcomeUnknown as exc:
                unknown.extend(exc.task_ids)

    # Raises once per arming, only inside the enqueue call: the test's own lines stay whole.
    armed = [False]

    def interrupt(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise Interrupted

    def interrupter(main: int) -> None:
        while not stop.wait(0.0005):
            signal.pthread_kill(main, signal.SIGUSR1)

    producers = [threading.Thread(target=produce, args=(p,), daemon=True) for p in range(8)]
    sender = threading.Thread(target=interrupter, args=(threading.get_ident(),), daemon=True)
    previous = signal.signal(signal.SIGUSR1, interrupt)
    interrupted_inside = main_sent = attempts = 0
    deadline = time.monotonic() + 15
    try:
        for t in producers:
            t.start()
        sender.start()
        while time.monotonic() < deadline and (any(t.is_alive() for t in producers) or interrupted_inside == 0):
            attempts += 1
            try:
                armed[0] = True
                handles.append(work.send_with_options(args=(99, attempts), backend=redis_backend))
                armed[0] = False
                main_sent += 1
            except Interrupted as exc:
                tb = exc.__traceback__
                while tb is not None:
                    code = tb.tb_frame.f_code
                    interrupted_inside += code.co_name == "enqueue" and code.co_filename == coalesce.__file__
                    tb = tb.tb_next
    finally:
        armed[0] = False
        stop.set()
        if sender.is_alive():
            sender.join()  # no signal may arrive once the default action is back: it kills
        signal.signal(signal.SIGUSR1, previous)
    assert not any(t.is_alive() for t in producers), "producers left waiting behind an interrupted caller"
    assert interrupted_inside > 0, "the main thread was never interrupted inside the coalescer"
    wait_until(
        lambda: not redis_backend.enqueuer._coalescer._busy and not redis_backend.enqueuer._coalescer._queue, timeout=10
    )
    raw = redis_backend.client.lrange(redis_backend.keys.stream(f"{q}#k").pending, 0, -1)
    ids = Counter(Entry.parse(r).id for r in raw)
    assert all(n == 1 for n in ids.values()), "a task was stored twice"
    assert all(ids[h.id] == 1 for h in handles), "a handle was given for a task not stored"
    rows = Counter((p, i) for p, i in stored(redis_backend, f"{q}#k"))
    assert all(n == 1 for n in rows.values()), "a call was stored twice"
    # Every producer call not told "may be stored" is stored, exactly once.
    assert len([r for r in rows if r[0] != 99]) == 1 + 8 * 300 - len([i for i in unknown if i not in ids])
    # The main thread's calls that returned are stored; those interrupted may or may not be.
    assert main_sent <= len([r for r in rows if r[0] == 99]) <= attempts
