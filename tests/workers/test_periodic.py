"""Time, through whole workers: delayed tasks start at their due time and not before, and a
periodic schedule enqueues exactly one task per tick however many workers of either driver fire
it, catches up as asked, stands down for a newer version, skips ticks while its queue is paused,
and shows itself to operators (``pyfiq schedules list``, the dashboard)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
import time
import uuid
from typing import Any

import pytest
from click.testing import CliRunner

import pyfiq
from pyfiq import RedisQueueBackend, ThreadedWorker
from pyfiq.engine.ticks import TICK_HEADER
from pyfiq.functions import Registry
from pyfiq.ops.cli import main
from tests.support.helpers import wait_until
from tests.workers.test_worker import AsyncWorkerInThread


def qname() -> str:
    return f"time-{uuid.uuid4().hex[:8]}"


def redis_ms(backend: RedisQueueBackend) -> int:
    return backend.admin.redis_now_ms()


class Workers:
    """Workers of both drivers on one registry, stopped together."""

    def __init__(self, backend: RedisQueueBackend, registry: Registry, queues: list[str], threaded: int, aio: int):
        self.all: list[Any] = [
            ThreadedWorker(backend.copy(), registry=registry, queues=queues, concurrency=2).start()
            for _ in range(threaded)
        ]
        self.all += [AsyncWorkerInThread(backend.copy(), registry=registry, queues=queues).start() for _ in range(aio)]

    def stop(self) -> None:
        for w in self.all:
            w.stop(5)
            if isinstance(w, AsyncWorkerInThread):
                w.close()


def test_delayed_tasks_start_at_their_due_time_never_before(backend: RedisQueueBackend) -> None:
    q, reg = qname(), Registry(backend)
    started: dict[int, int] = {}

    @reg.fifo(q, name=f"{q}.job")
    def job(i: int) -> None:
        started[i] = redis_ms(backend)

    workers = Workers(backend, reg, [q], threaded=1, aio=1)
    try:
        eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.6)
        handles = {0: job.send_with_options(args=(0,), delay=0.3), 1: job.send_with_options(args=(1,), eta=eta)}
        handles[2] = job.send_with_options(args=(2,), delay=dt.timedelta(seconds=0.9))
        due = {i: h.status().due for i, h in handles.items()}
        wait_until(lambda: len(started) == 3, 15)
    finally:
        workers.stop()
    for i, when in due.items():
        assert when is not None and started[i] >= when.timestamp() * 1000, f"task {i} started before it was due"
    assert sorted(started, key=started.__getitem__) == [0, 1, 2]


def test_every_tick_enqueues_exactly_one_task_whichever_workers_fire_it(backend: RedisQueueBackend) -> None:
    """Three threaded and two asyncio workers fire a 300 ms schedule for 3 s: each tick's task
    ran once, the ticks follow each other without a gap, and Redis counts as many as ran (on a
    real Redis and on ``memory://``)."""
    q, reg = qname(), Registry(backend)
    ran: list[tuple[int, str]] = []
    lock = threading.Lock()

    # catch_up="all": a tick late past the next one (a starved CI machine) is still owed, so a
    # gap can only be a lost tick.
    @reg.periodic(q, every=0.3, name=f"{q}.beat", args=("x",), catch_up="all")
    def beat(tag: str) -> None:
        ctx = pyfiq.current_task()
        with lock:
            ran.append((int(ctx.headers[TICK_HEADER]), ctx.id))
        assert tag == "x"

    workers = Workers(backend, reg, [q], threaded=3, aio=2)
    try:
        time.sleep(3.2)
    finally:
        workers.stop()
    ticks = sorted(t for t, _ in ran)
    assert len(ticks) >= 5  # about ten in 3.2 s; fewer only when a loaded machine starts the workers late
    assert len(set(ticks)) == len(ticks), "a tick ran twice"
    assert len({task for _, task in ran}) == len(ran)
    assert all(b - a == 300 for a, b in itertools.pairwise(ticks)), ticks
    (view,) = backend.admin.schedules()
    info = backend.queue_info(q)  # a tick fired as the workers stopped waits unrun
    assert view.fired == len(ticks) + info["pending"] + info["inflight"]
    assert view.name == f"{q}.beat" and view.rule == "every 300 ms"


@pytest.mark.parametrize(("catch_up", "expected"), [("once", 1), ("all", 6), ("skip", 0)])
def test_ticks_missed_while_every_worker_was_down_are_caught_up_as_asked(
    redis_backend: RedisQueueBackend, catch_up: str, expected: int
) -> None:
    """Every worker was down for 48 s: the record's last tick of an 8 s schedule is six
    ticks back when the first worker starts. ``once`` enqueues one task (for the latest tick),
    ``all`` one per tick, oldest first, ``skip`` none (the latest tick is past its grace, 4 s)."""
    q, reg = qname(), Registry(redis_backend)
    ran: list[int] = []

    @reg.periodic(q, every=8, name=f"{q}.sync", catch_up=catch_up)  # type: ignore[arg-type]
    def sync() -> None:
        ran.append(int(pyfiq.current_task().headers[TICK_HEADER]))

    # Start at a known point of the interval, so the next tick cannot fall within the test:
    # just after a tick, or (skip) just past the latest tick's grace.
    target = 4_400 if catch_up == "skip" else 200
    time.sleep(((target - redis_ms(redis_backend) % 8_000) % 8_000) / 1000)
    now = redis_ms(redis_backend)
    latest = now - now % 8_000
    record = redis_backend.keys.schedule_record(redis_backend.keys.shard_of(q), f"{q}.sync")
    redis_backend.client.hset(record, mapping={"last": latest - 48_000, "version": 0, "stream": q})
    workers = Workers(redis_backend, reg, [q], threaded=2, aio=0)
    try:
        wait_until(lambda: redis_backend.client.hget(record, "last") == str(latest).encode(), 10)
        wait_until(lambda: len(ran) >= expected, 10)
        time.sleep(0.5)  # and no more
    finally:
        workers.stop()
    assert redis_ms(redis_backend) < latest + 8_000, "the next tick fell within the test"
    assert len(ran) == expected
    if catch_up == "all":
        assert ran == [latest - 40_000 + 8_000 * i for i in range(6)]
    elif catch_up == "once":
        assert ran == [latest]


def test_a_newer_version_stands_the_older_replicas_down_at_once(redis_backend: RedisQueueBackend) -> None:
    """A rolling deploy: old workers fire v1; a worker with v2 of the schedule starts and from its
    first look on no v1 worker fires, and no tick is fired twice across the two."""
    q = qname()
    old_reg, new_reg = Registry(redis_backend), Registry(redis_backend)
    ran: list[tuple[str, int]] = []
    lock = threading.Lock()

    def record(version: str) -> Any:
        def body() -> None:
            with lock:
                ran.append((version, int(pyfiq.current_task().headers[TICK_HEADER])))

        return body

    old_reg.periodic(q, every=0.2, name=f"{q}.v1", schedule="report", version=1)(record("v1"))
    new_reg.periodic(q, every=0.2, name=f"{q}.v2", schedule="report", version=2)(record("v2"))
    # Each worker runs the tasks of its own registry; both consume the queue.
    old = Workers(redis_backend, old_reg, [q], threaded=2, aio=0)
    new = None
    try:
        time.sleep(1.0)
        new = Workers(redis_backend, new_reg, [q], threaded=1, aio=0)
        record = redis_backend.keys.schedule_record(redis_backend.keys.shard_of(q), "report")
        wait_until(lambda: redis_backend.client.hget(record, "version") == b"2", 10)
        switched = redis_ms(redis_backend)  # from here on Redis refuses version 1
        time.sleep(1.5)
    finally:
        old.stop()
        if new is not None:
            new.stop()
    ticks = [t for _, t in ran]
    assert len(ticks) == len(set(ticks)), "a tick was fired twice"
    assert any(v == "v1" for v, _ in ran) and any(v == "v2" for v, _ in ran)
    assert all(v == "v2" for v, t in ran if t > switched), ran


def test_a_paused_queue_skips_its_ticks_and_the_first_after_the_resume_runs(redis_backend: RedisQueueBackend) -> None:
    q, reg = qname(), Registry(redis_backend)
    ran: list[int] = []

    @reg.periodic(q, every=0.2, name=f"{q}.tick")
    def tick() -> None:
        ran.append(int(pyfiq.current_task().headers[TICK_HEADER]))

    workers = Workers(redis_backend, reg, [q], threaded=1, aio=0)
    try:
        wait_until(lambda: len(ran) >= 2, 10)
        redis_backend.admin.pause(q)
        paused_at, count = redis_ms(redis_backend), len(ran)
        time.sleep(1.0)
        assert redis_backend.queue_info(q)["pending"] == 0, "a paused queue's schedule enqueued a tick"
        (view,) = redis_backend.admin.schedules()
        assert view.paused and view.skipped >= 3
        assert view.task_id is None, "a tick skipped while paused enqueued no task"
        redis_backend.admin.resume(q)
        wait_until(lambda: len(ran) > count + 1, 10)
    finally:
        workers.stop()
    skipped = [t for t in ran if paused_at + 200 < t < paused_at + 1000]
    assert skipped == [], "no tick of the paused stretch ran, even after the resume"


@pytest.mark.parametrize("loss", ["forget", "flush"])
def test_a_forgotten_or_lost_record_skips_no_tick_while_a_worker_runs(
    redis_backend: RedisQueueBackend, loss: str
) -> None:
    """An operator forgets the record mid-interval, or Redis loses every key (an empty restart):
    the worker that knew it fires the next tick all the same."""
    q, reg = qname(), Registry(redis_backend)
    ran: list[int] = []

    @reg.periodic(q, every=0.5, name=f"{q}.beat", catch_up="all")
    def beat() -> None:
        ran.append(int(pyfiq.current_task().headers[TICK_HEADER]))

    workers = Workers(redis_backend, reg, [q], threaded=1, aio=0)
    try:
        wait_until(lambda: len(ran) >= 2, 10)
        now = redis_ms(redis_backend)
        time.sleep(max(0.0, 0.3 - (now % 500) / 1000))  # mid-interval
        if loss == "forget":
            assert redis_backend.admin.forget_schedule(f"{q}.beat")
        else:  # this prefix's keys, all of them: what an empty restart leaves of the app
            redis_backend.client.delete(*redis_backend.client.scan_iter(f"{redis_backend.keys.prefix}:*"))
        lost_at = redis_ms(redis_backend)
        wait_until(lambda: len([t for t in ran if t > lost_at]) >= 3, 10)
    finally:
        workers.stop()
    ticks = sorted(set(ran))
    assert all(b - a == 500 for a, b in itertools.pairwise(ticks)), (lost_at, ticks)


def test_operators_see_each_schedule_and_can_forget_one(redis_backend: RedisQueueBackend, redis_server: Any) -> None:
    q, reg = qname(), Registry(redis_backend)

    @reg.periodic(q, every=0.2, name=f"{q}.shown")
    def shown() -> None: ...

    workers = Workers(redis_backend, reg, [q], threaded=1, aio=0)
    try:
        wait_until(lambda: any(v.fired >= 2 for v in redis_backend.admin.schedules()), 10)
    finally:
        workers.stop()
    args = ["--redis", redis_server.url, "--prefix", redis_backend.keys.prefix]
    listed = CliRunner().invoke(main, [*args, "schedules", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = [json.loads(line) for line in listed.output.splitlines()]
    assert (
        row["name"] == f"{q}.shown"
        and row["rule"] == "every 200 ms"
        and row["task_state"]
        in (
            "succeeded",
            "unknown",
            "pending",
            "running",
            "taken",
        )
    )
    assert row["next_tick"] > row["last_tick"] and not row["paused"]
    table = CliRunner().invoke(main, [*args, "schedules", "list"])
    assert table.output.splitlines()[0].startswith("name\tqueue\trule")
    status = CliRunner().invoke(main, [*args, "status"]).output.splitlines()
    below = status[status.index("schedule\tqueue\trule\tlast_tick\tnext_tick\tstate") + 1 :]
    assert [line.split("\t")[::5] for line in below] == [[f"{q}.shown", "running"]]
    forgot = CliRunner().invoke(main, [*args, "schedules", "forget", f"{q}.shown"])
    assert forgot.exit_code == 0 and redis_backend.admin.schedules() == []
    again = CliRunner().invoke(main, [*args, "schedules", "forget", f"{q}.shown"])
    assert again.exit_code != 0 and "no schedule named" in again.output


def test_a_schedule_name_fired_by_two_functions_is_refused(redis_backend: RedisQueueBackend) -> None:
    q, reg = qname(), Registry(redis_backend)
    reg.periodic(q, every=1, name=f"{q}.a", schedule="shared")(lambda: None)
    with pytest.raises(pyfiq.ConfigurationError, match="already fired by"):
        reg.periodic(q, every=1, name=f"{q}.b", schedule="shared")(lambda: None)
    assert reg.lookup(f"{q}.b") is None, "nothing was bound"
    again = reg.periodic(q, every=2, name=f"{q}.a", schedule="shared")(lambda: None)  # a redefinition
    assert [s.rule.text for s in reg.schedules_of([q])] == ["every 2 s"] and again.schedule is not None
    with pytest.raises(TypeError, match="nothing was bound"):
        reg.periodic(q, every=1, name=f"{q}.c", args=(1, 2))(lambda x: None)
    assert reg.lookup(f"{q}.c") is None


def test_a_replica_starting_right_after_a_forget_does_not_fire_the_last_tick_again(
    redis_backend: RedisQueueBackend,
) -> None:
    """The record is forgotten a moment after a tick fired and a second worker starts then (a
    deploy): it must not take that tick for one still owed within its grace."""
    q, reg = qname(), Registry(redis_backend)
    ran: list[tuple[int, str]] = []

    @reg.periodic(q, every=2, name=f"{q}.beat")
    def beat() -> None:
        ctx = pyfiq.current_task()
        ran.append((int(ctx.headers[TICK_HEADER]), ctx.id))

    first = Workers(redis_backend, reg, [q], threaded=1, aio=0)
    second = None
    try:
        wait_until(lambda: bool(ran) and redis_ms(redis_backend) - ran[-1][0] < 400, 10, interval=0.005)
        assert redis_backend.admin.forget_schedule(f"{q}.beat")
        second = Workers(redis_backend, reg, [q], threaded=1, aio=0)
        time.sleep(2.5)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    tasks: dict[int, set[str]] = {}
    for tick, task in ran:
        tasks.setdefault(tick, set()).add(task)
    assert all(len(ids) == 1 for ids in tasks.values()), tasks


def test_a_tick_over_max_payload_bytes_is_refused_as_a_call_would_be(redis_backend: RedisQueueBackend) -> None:
    import logging

    small = RedisQueueBackend(redis_backend.url, prefix=redis_backend.keys.prefix, max_payload_bytes=1_000, shards=4)
    q, reg, ran = qname(), Registry(small), []
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    @reg.periodic(q, every=0.2, name=f"{q}.big", args=("x" * 5_000,))
    def big(blob: str) -> None:
        ran.append(len(blob))

    handler = Keep(level=logging.ERROR)
    logging.getLogger("pyfiq").addHandler(handler)
    worker = ThreadedWorker(small, registry=reg, queues=[q]).start()
    try:
        wait_until(lambda: any("pyfiq.schedule_failed" in r.getMessage() for r in records), timeout=10)
        time.sleep(0.5)
    finally:
        worker.stop(5)
        logging.getLogger("pyfiq").removeHandler(handler)
        small.close()
    (failed, *_) = [r for r in records if "pyfiq.schedule_failed" in r.getMessage()]
    assert "PayloadTooLargeError" in failed.getMessage() and ran == [], "no tick's task was enqueued"
