"""Operator actions against a holder that has taken tasks ahead (group acknowledgements, or
``prefetch`` with inline ones): a skip never lets a task run on two workers at once, a pause
that has returned is never followed by a start, and a skip moves the stream on even when the
only replica is stuck in the skipped task. Real redis-server, real workers."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from typing import Any

import pytest

import pyfiq
from pyfiq import AsyncWorker, RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.engine.scheduler import poll_owners
from tests.support.helpers import unique_prefix, wait_until

#: A lease TTL long enough that waiting it out is not what makes these tests pass.
SLOW_LEASE = {"lease_ttl": 6.0, "poll_interval": 0.2, "shards": 4}

MODES = [
    pytest.param({}, id="group"),
    pytest.param({"ack_mode": "inline", "prefetch": 8}, id="inline-prefetch-8"),
]


class Journal:
    """Each run of a task: (task number, worker thread, start, end) on this process's clock."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, str, float, float]] = []
        self.lock = threading.Lock()

    def record(self, i: int, start: float) -> None:
        with self.lock:
            self.runs.append((i, threading.current_thread().name, start, time.monotonic()))

    def numbers(self) -> list[int]:
        with self.lock:
            return [i for i, *_ in self.runs]

    def overlaps(self) -> list[tuple[int, int]]:
        """Pairs of runs of the one stream that overlapped in time."""
        with self.lock:
            runs = sorted(self.runs, key=lambda r: r[2])
        return [(a[0], b[0]) for a, b in itertools.pairwise(runs) if b[2] < a[3]]


def backend_for(server: Any, prefix: str, **settings: Any) -> RedisQueueBackend:
    return RedisQueueBackend(server.url, prefix=prefix, **{**SLOW_LEASE, **settings})


@pytest.mark.parametrize("mode", MODES)
def test_a_skip_never_runs_a_task_taken_ahead_on_two_workers(redis_server: Any, mode: dict[str, Any]) -> None:
    prefix, q = unique_prefix(), f"sk-{uuid.uuid4().hex[:8]}"
    producer = backend_for(redis_server, prefix, **mode)
    pyfiq.configure(producer)
    journal, stuck, head_started = Journal(), threading.Event(), threading.Event()

    @fifo(queue=q, name=f"{q}.t", max_retries=0)
    def t(i: int) -> None:
        start = time.monotonic()
        if i == 0:
            head_started.set()
            stuck.wait(10)  # ends a moment after the skip, as a slow call would
            return
        time.sleep(0.2)
        journal.record(i, start)

    for i in range(6):
        t(i)
    first = ThreadedWorker(backend_for(redis_server, prefix, **mode), queues=[q]).start()
    second = None
    try:
        assert head_started.wait(5)
        second = ThreadedWorker(backend_for(redis_server, prefix, **mode), queues=[q]).start()
        time.sleep(0.5)  # the second worker is polling
        assert producer.skip(q, "stuck") is not None
        time.sleep(0.1)
        stuck.set()  # the first worker's head ends while tasks it took ahead sit in its buffer
        wait_until(lambda: sorted(set(journal.numbers())) == [1, 2, 3, 4, 5], timeout=15)
        time.sleep(1.0)  # room for a second run, had one been started
    finally:
        stuck.set()
        first.stop(5)
        if second is not None:
            second.stop(5)
    assert journal.numbers() == [1, 2, 3, 4, 5], "each task once, in order"
    assert journal.overlaps() == []
    (dead,) = producer.dead_letters(q)
    assert dead.reason == "operator"


def test_a_skip_moves_the_stream_on_with_a_single_replica_stuck_in_the_head(redis_server: Any) -> None:
    prefix, q = unique_prefix(), f"sk1-{uuid.uuid4().hex[:8]}"
    producer = backend_for(redis_server, prefix)
    pyfiq.configure(producer)
    journal, stuck, head_started = Journal(), threading.Event(), threading.Event()

    @fifo(queue=q, name=f"{q}.t", max_retries=0)
    def t(i: int) -> None:
        start = time.monotonic()
        if i == 0:
            head_started.set()
            stuck.wait(60)  # a call that never returns, as far as this test goes
            return
        journal.record(i, start)

    for i in range(4):
        t(i)
    worker = ThreadedWorker(backend_for(redis_server, prefix), queues=[q]).start()
    try:
        assert head_started.wait(5)
        skipped_at = time.monotonic()
        producer.skip(q, "stuck for good")
        # Well within one lease TTL (6 s): the holder let go as soon as it heard of the skip.
        wait_until(lambda: journal.numbers() == [1, 2, 3], timeout=4)
        assert not stuck.is_set(), "the stuck execution still runs"
        assert journal.runs[0][2] - skipped_at < 3.0
    finally:
        stuck.set()
        worker.stop(5)
    assert journal.numbers() == [1, 2, 3]


@pytest.mark.parametrize("mode", MODES)
def test_no_task_starts_once_pause_has_returned(redis_server: Any, mode: dict[str, Any]) -> None:
    prefix, q = unique_prefix(), f"pz-{uuid.uuid4().hex[:8]}"
    producer = backend_for(redis_server, prefix, **mode)
    pyfiq.configure(producer)
    journal = Journal()
    starts: list[float] = []

    @fifo(queue=q, name=f"{q}.t")
    def t(i: int) -> None:
        start = time.monotonic()
        starts.append(start)
        time.sleep(0.3)
        journal.record(i, start)

    for i in range(12):
        t(i)
    worker = ThreadedWorker(backend_for(redis_server, prefix, **mode), queues=[q]).start()
    try:
        wait_until(lambda: len(starts) >= 2, timeout=5)
        report = producer.pause(q)
        returned = time.monotonic()
        assert report.confirmed == [worker.replica] or report.ended, report
        assert report.complete
        time.sleep(1.5)  # five tasks' time: a buffered task would have started by now
        late = [s for s in starts if s > returned]
        assert late == [], f"{len(late)} task(s) started after pause() returned"
        info = producer.queue_info(q)
        ran = len(journal.numbers())
        assert info["pending"] + info["inflight"] == 12 - ran, "what was taken ahead went back"
        producer.resume(q)
        wait_until(lambda: len(journal.numbers()) == 12, timeout=15)
    finally:
        worker.stop(5)
    assert journal.numbers() == list(range(12))
    assert journal.overlaps() == []


def test_pause_of_a_queue_nobody_runs_returns_at_once(redis_server: Any) -> None:
    producer = backend_for(redis_server, unique_prefix())
    before = time.monotonic()
    report = producer.pause("idle-queue")
    assert report.complete and report.confirmed == [] and report.unconfirmed == []
    assert time.monotonic() - before < 2.0
    assert producer.paused() == ["idle-queue"]


def test_a_worker_whose_stop_timed_out_leaves_its_shard_polls_to_others(redis_server: Any) -> None:
    """A stopping worker still running a task keeps heartbeating, but it no longer dispatches:
    the fleet must not count it as polling, or a crash elsewhere would never be taken over."""
    fast = {"lease_ttl": 1.5, "poll_interval": 0.2, "shards": 4}
    prefix = unique_prefix()
    # Replica names under which the stopping worker owns some shard's poll.
    tag = next(
        t
        for t in (uuid.uuid4().hex[:6] for _ in range(100))
        if f"stopping-{t}" in poll_owners([f"stopping-{t}", f"live-{t}"], 4)
    )
    stopping_id, live_id = f"stopping-{tag}", f"live-{tag}"
    producer = RedisQueueBackend(redis_server.url, prefix=prefix, **fast)
    pyfiq.configure(producer)
    # A crashed queue whose shard the shared poll gives to the stopping worker.
    q1 = f"long-{tag}"
    q2 = next(
        f"crash-{tag}-{n}"
        for n in range(1000)
        if poll_owners([stopping_id, live_id], 4)[producer.keys.stream(f"crash-{tag}-{n}").shard] == stopping_id
    )
    release, runs = threading.Event(), []

    @fifo(queue=q1, name=f"{q1}.t")
    def long(i: int) -> None:
        release.wait(20)

    @fifo(queue=q2, name=f"{q2}.t")
    def crash(i: int) -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            release.wait(20)  # on the replica that is then killed

    def worker(replica: str) -> ThreadedWorker:
        return ThreadedWorker(
            RedisQueueBackend(redis_server.url, prefix=prefix, **fast), queues=[q1, q2], replica=replica
        )

    stopping = worker(stopping_id).start()
    crashing = live = None
    try:
        long(0)
        wait_until(lambda: stopping.held_streams == [q1], timeout=5)
        crashing = worker(f"crashing-{tag}").start()
        assert stopping.stop(timeout=0.5) is False  # its task still runs
        crash(0)
        wait_until(lambda: crashing.held_streams == [q2], timeout=5)
        live = worker(live_id).start()
        time.sleep(1.0)  # the live worker's view of the pollers settles
        crashing.abandon()  # as if killed: its lease on q2 lapses, nobody releases it
        killed = time.monotonic()
        wait_until(lambda: len(runs) == 2, timeout=1.5 + 0.2 + 2.0 + 2.0)
        assert runs[1] - killed <= 1.5 + 0.2 + 2.0, "taken over within lease TTL + poll + 2 s"
    finally:
        release.set()
        for w in (stopping, crashing, live):
            if w is not None:
                w.stop(5)


def test_requeue_to_the_front_keeps_order_across_pages_while_a_worker_runs_the_stream(redis_server: Any) -> None:
    prefix, q = unique_prefix(), f"rq-{uuid.uuid4().hex[:8]}"
    producer = RedisQueueBackend(redis_server.url, prefix=prefix, lease_ttl=6.0, poll_interval=0.2, shards=4)
    pyfiq.configure(producer)
    failing, ran = threading.Event(), []
    failing.set()

    @fifo(queue=q, name=f"{q}.t", max_retries=0)
    def t(i: int) -> None:
        if failing.is_set() and i < 3000:
            raise RuntimeError("downstream down")
        ran.append(i)
        if i >= 3000:
            time.sleep(0.005)  # pending work the holder is busy with during the requeue

    for i in range(3000):
        t(i)
    worker = ThreadedWorker(
        RedisQueueBackend(redis_server.url, prefix=prefix, lease_ttl=6.0, poll_interval=0.2, shards=4), queues=[q]
    ).start()
    try:
        wait_until(lambda: producer.queue_info(q)["dead"] == 3000, timeout=60)
        failing.clear()
        for i in range(3000, 3400):
            t(i)
        wait_until(lambda: len(ran) >= 20, timeout=10)
        moved = producer.requeue_dead_letters(q, front=True)
        assert moved == 3000
        wait_until(lambda: len(ran) == 3400, timeout=60)
    finally:
        worker.stop(5)
    requeued = [i for i in ran if i < 3000]
    assert requeued == list(range(3000)), "requeued tasks run in their original order"
    assert sorted(ran) == list(range(3400)), "each task once"
    # Ahead of the pending work: no pending task runs between the first and the last requeued
    # one, except those the holder had already taken when the requeue began.
    first, last = ran.index(0), ran.index(2999)
    assert last - first == 2999
    assert producer.paused() == [], "the requeue's own halt is lifted"


def test_asyncio_workers_obey_skip_and_pause_for_work_taken_ahead(redis_server: Any) -> None:
    """The same two rules with the asyncio driver: a skip while two AsyncWorkers share the
    stream runs each task once and never two at once; no start once pause() has returned."""
    prefix, q = unique_prefix(), f"ask-{uuid.uuid4().hex[:8]}"
    producer = backend_for(redis_server, prefix)
    pyfiq.configure(producer)
    journal, starts = Journal(), []

    @fifo(queue=q, name=f"{q}.t", max_retries=0)
    async def t(i: int) -> None:
        start = time.monotonic()
        starts.append((i, start))
        if i == 0:
            await asyncio.sleep(0.8)  # ends a moment after the skip
            return
        await asyncio.sleep(0.2)
        journal.record(i, start)

    async def main() -> tuple[float, Any]:
        for i in range(12):
            await t(i)
        async with AsyncWorker(backend_for(redis_server, prefix), queues=[q]):
            while not starts:
                await asyncio.sleep(0.01)
            async with AsyncWorker(backend_for(redis_server, prefix), queues=[q]):
                await asyncio.sleep(0.3)
                await asyncio.to_thread(producer.skip, q, "stuck")
                while len(journal.numbers()) < 3:
                    await asyncio.sleep(0.02)
                report = await asyncio.to_thread(producer.pause, q)
                returned = time.monotonic()
                await asyncio.sleep(1.0)
                late = [s for _, s in starts if s > returned]
                assert late == [], f"{len(late)} task(s) started after pause() returned"
                await asyncio.to_thread(producer.resume, q)
                deadline = time.monotonic() + 15
                while len(journal.numbers()) < 11 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                return returned, report

    _, report = asyncio.run(main())
    assert report.complete
    assert journal.numbers() == list(range(1, 12)), "each task once, in order"
    assert journal.overlaps() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_skip_dead_letters_the_task_the_holder_runs_not_one_it_finished(
    redis_server: Any, mode: dict[str, Any]
) -> None:
    """With tasks taken ahead, tasks a holder finished may still sit unacknowledged in flight in
    front of the one it runs: the skip hits the one it runs (reported by its renewals)."""
    prefix, q = unique_prefix(), f"skr-{uuid.uuid4().hex[:8]}"
    producer = backend_for(redis_server, prefix, **mode)
    pyfiq.configure(producer)
    journal, stuck, third = Journal(), threading.Event(), threading.Event()

    @fifo(queue=q, name=f"{q}.t", max_retries=0)
    def t(i: int) -> None:
        start = time.monotonic()
        if i == 3:
            third.set()
            stuck.wait(60)
            return
        journal.record(i, start)

    handles = [t(i) for i in range(8)]
    worker = ThreadedWorker(backend_for(redis_server, prefix, **mode), queues=[q]).start()
    try:
        assert third.wait(5)
        time.sleep(1.5)  # a renewal (every 1.2 s) has said which task runs
        assert producer.skip(q, "stuck") == handles[3].id
        wait_until(lambda: journal.numbers() == [0, 1, 2, 4, 5, 6, 7], timeout=4)
    finally:
        stuck.set()
        worker.stop(5)
    (dead,) = producer.dead_letters(q)
    assert dead.task_id == handles[3].id


def test_two_skips_in_a_row_still_move_a_stuck_single_replica_on(redis_server: Any) -> None:
    prefix, q = unique_prefix(), f"sk2-{uuid.uuid4().hex[:8]}"
    producer = backend_for(redis_server, prefix)
    pyfiq.configure(producer)
    journal, stuck, head = Journal(), threading.Event(), threading.Event()

    @fifo(queue=q, name=f"{q}.t", max_retries=0)
    def t(i: int) -> None:
        start = time.monotonic()
        if i == 0:
            head.set()
            stuck.wait(60)
            return
        journal.record(i, start)

    for i in range(6):
        t(i)
    worker = ThreadedWorker(backend_for(redis_server, prefix), queues=[q]).start()
    try:
        assert head.wait(5)
        time.sleep(1.5)
        assert producer.skip(q, "one") is not None
        assert producer.skip(q, "two") is not None
        wait_until(lambda: journal.numbers() == [2, 3, 4, 5], timeout=4)
    finally:
        stuck.set()
        worker.stop(5)
    assert len(producer.dead_letters(q)) == 2
