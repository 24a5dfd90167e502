"""Delayed tasks in the scripts, against a real redis-server: a task waits in its stream's later
set until Redis's clock reaches its due time, then joins the stream behind what was enqueued
before that moment and ahead of what comes after, whichever script adds work first (an enqueue,
a take of the holder, a claim, a requeue), with ties in enqueue order and a bounded move per
call."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

import pytest

from pyfiq import ConfigurationError, RedisQueueBackend
from pyfiq.engine.lease import Lease
from pyfiq.engine.protocol import AcquireReply
from pyfiq.functions import Registry
from pyfiq.task import EncodedTask, Entry, TaskRecord, due_spec, new_task_id


def qname() -> str:
    return f"later-{uuid.uuid4().hex[:8]}"


def enqueue(backend: RedisQueueBackend, stream: str, tag: object, when: str = "0", **kw: object) -> str:
    task_id = new_task_id()
    items = backend.encode([(task_id, TaskRecord("t", [tag], {}))], when=when, **kw)  # type: ignore[arg-type]
    backend.enqueuer.enqueue(stream, items)
    return task_id


def acquire(backend: RedisQueueBackend, stream: str) -> tuple[Lease | None, list[object]]:
    reply = backend.call(backend.ops.acquire(stream))
    return backend.ops.parse_acquire(stream, reply, threading.Event(), time.monotonic()), reply


def drain(backend: RedisQueueBackend, stream: str) -> list[object]:
    """Every task of ``stream`` taken in order by one holder (the tags they were enqueued with)."""
    lease, _ = acquire(backend, stream)
    assert lease is not None
    got: list[object] = []
    acks: list[str] = []
    while True:
        reply = backend.call(backend.ops.take(lease, acks, 100))
        if reply[0] == 0:
            return got
        entries = [Entry.parse(reply[i]) for i in range(2, len(reply), 2)]
        got += [TaskRecord.decode(e.payload, backend.settings.serializer).args[0] for e in entries]
        acks = [e.id for e in entries]


def redis_ms(backend: RedisQueueBackend) -> int:
    seconds, micros = backend.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_a_delayed_task_waits_outside_its_stream_until_redis_time_reaches_its_due_time(
    redis_backend: RedisQueueBackend,
) -> None:
    q = qname()
    before = redis_ms(redis_backend)
    task_id = enqueue(redis_backend, q, "d", due_spec(1.0))
    status = redis_backend.task_status(q, task_id)
    assert status.state == "scheduled" and status.due is not None
    due_ms = status.due.timestamp() * 1000
    assert before + 1000 <= due_ms <= redis_ms(redis_backend) + 1000
    info = redis_backend.queue_info(q)
    assert (info["pending"], info["inflight"]) == (0, 0)
    lease, reply = acquire(redis_backend, q)
    assert lease is None and reply[0] == AcquireReply.NOT_CLAIMABLE
    # Its stream is scored at the due time: the poll's next wake-up is then, not a poll interval.
    nxt, _, due = redis_backend.ops.parse_due(
        redis_backend.call(redis_backend.ops.due(redis_backend.keys.shard_of(q), 5, [q]))
    )
    assert due == [] and nxt is not None and 0 < nxt <= 1.0
    while redis_ms(redis_backend) < due_ms:
        time.sleep(0.02)
    assert drain(redis_backend, q) == ["d"]
    assert redis_backend.task_status(q, task_id).state == "unknown"
    assert not redis_backend.client.exists(redis_backend.keys.stream(q).later_seq)


def test_it_joins_behind_what_came_before_its_due_time_and_ahead_of_what_came_after(
    redis_backend: RedisQueueBackend,
) -> None:
    q = qname()
    enqueue(redis_backend, q, "a")
    enqueue(redis_backend, q, "late", due_spec(1.5))
    enqueue(redis_backend, q, "d", due_spec(0.5))
    enqueue(redis_backend, q, "b")
    time.sleep(0.8)
    enqueue(redis_backend, q, "c")  # after d's due time: d joined first
    time.sleep(1.0)
    enqueue(redis_backend, q, "e")
    assert drain(redis_backend, q) == ["a", "b", "d", "c", "late", "e"]


def test_tasks_due_at_the_same_moment_join_in_enqueue_order(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.3)
    for i in range(30):
        enqueue(redis_backend, q, i, due_spec(eta=eta))
    time.sleep(0.45)
    assert drain(redis_backend, q) == list(range(30))


def test_a_held_stream_takes_in_the_tasks_that_fell_due_while_it_was_held(redis_backend: RedisQueueBackend) -> None:
    """The holder's take moves them: no other replica may claim the stream meanwhile, and an
    enqueue after the due time lands behind them even though no poll ran."""
    q = qname()
    enqueue(redis_backend, q, "a")
    lease, _ = acquire(redis_backend, q)
    assert lease is not None
    first = redis_backend.call(redis_backend.ops.take(lease, [], 1))
    a = Entry.parse(first[2])
    enqueue(redis_backend, q, "d", due_spec(0.15))
    time.sleep(0.25)
    enqueue(redis_backend, q, "b")
    reply = redis_backend.call(redis_backend.ops.take(lease, [a.id], 10))
    serializer = redis_backend.settings.serializer
    tags = [TaskRecord.decode(Entry.parse(reply[i]).payload, serializer).args[0] for i in range(2, len(reply), 2)]
    assert tags == ["d", "b"]


def test_a_holder_that_runs_dry_lets_go_and_is_told_when_the_first_delayed_task_falls_due(
    redis_backend: RedisQueueBackend,
) -> None:
    q = qname()
    enqueue(redis_backend, q, "a")
    enqueue(redis_backend, q, "d", due_spec(1.0))
    lease, _ = acquire(redis_backend, q)
    assert lease is not None
    reply = redis_backend.call(redis_backend.ops.take(lease, [], 10))
    a = Entry.parse(reply[2])
    empty = redis_backend.call(redis_backend.ops.take(lease, [a.id], 10))
    assert empty[0] == 0 and 0 < empty[1] <= 1000
    k = redis_backend.keys.stream(q)
    assert redis_backend.client.get(k.lease) is None
    assert redis_backend.client.zscore(k.ready, q) == pytest.approx(redis_ms(redis_backend) + empty[1], abs=100)


def test_more_due_tasks_than_one_call_moves_keep_their_place_ahead_of_a_new_one(
    redis_backend: RedisQueueBackend,
) -> None:
    """1,200 tasks fall due together; the next enqueue moves a bounded slice (500) and puts its
    own task behind the rest, so the order stays exact however many were due."""
    q = qname()
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1.0)
    items = redis_backend.encode(
        [(new_task_id(), TaskRecord("t", [i], {})) for i in range(1200)], when=due_spec(eta=eta)
    )
    redis_backend.enqueuer.enqueue(q, items)
    assert redis_backend.client.zcard(redis_backend.keys.stream(q).later) == 1200
    time.sleep(1.2)
    enqueue(redis_backend, q, "new")
    k = redis_backend.keys.stream(q)
    assert redis_backend.client.llen(k.pending) == 500
    assert redis_backend.client.zcard(k.later) == 701
    assert drain(redis_backend, q) == [*range(1200), "new"]


def test_a_requeue_to_the_back_lands_behind_tasks_that_fell_due(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    dead = enqueue(redis_backend, q, "x", expires_in=0.05)
    time.sleep(0.1)
    assert drain(redis_backend, q) == []  # expired on hand-out: dead-lettered
    enqueue(redis_backend, q, "d", due_spec(0.1))
    time.sleep(0.2)
    assert redis_backend.requeue_dead_letters(q, task_id=dead) == 1
    assert drain(redis_backend, q) == ["d", "x"]


def test_dedup_keys_and_expiry_keep_their_meaning_for_delayed_tasks(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    reg = Registry(redis_backend)

    @reg.fifo(q, name=f"{q}.f")
    def f(i: int) -> None: ...

    first = f.send_with_options(args=(1,), dedup_key="once", delay=30)
    again = f.send_with_options(args=(2,), dedup_key="once", delay=5)
    assert again.duplicate and again.id == first.id
    assert first.status().state == "scheduled"
    with pytest.raises(ConfigurationError, match="ends before the task is due"):
        f.send_with_options(args=(3,), delay=10, expires_in=5)
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=20)
    with pytest.raises(ConfigurationError, match="ends before the task is due"):
        f.send_with_options(args=(3,), eta=eta, expires_in=10)
    with pytest.raises(ConfigurationError, match="no time zone"):
        f.send_with_options(args=(3,), eta=dt.datetime.now())
    with pytest.raises(ConfigurationError, match="not both"):
        f.send_with_options(args=(3,), eta=eta, delay=1)
    with pytest.raises(ConfigurationError, match="non-negative"):
        f.send_with_options(args=(3,), delay=-1)
    kept = f.send_with_options(args=(4,), delay=dt.timedelta(seconds=1), expires_in=60)
    entry = Entry.parse(redis_backend.client.zrange(redis_backend.keys.stream(q).later, 0, 0)[0][17:])
    assert entry.id == kept.id and entry.expires_ms == entry.enqueued_ms + 60_000
    assert redis_backend.queue_info(q)["pending"] == 0


def test_the_due_time_is_redis_time_whatever_this_process_believes(
    redis_backend: RedisQueueBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer whose clock is an hour off still delays by what it asked, counted on Redis."""
    q = qname()
    reg = Registry(redis_backend)

    @reg.fifo(q, name=f"{q}.f")
    def f() -> None: ...

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    handle = f.send_with_options(delay=2)
    due = handle.status().due
    assert due is not None
    assert abs(due.timestamp() * 1000 - (redis_ms(redis_backend) + 2000)) < 200


def test_an_eta_in_the_past_joins_at_once(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    enqueue(redis_backend, q, "a")
    enqueue(redis_backend, q, "past", due_spec(eta=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)))
    assert redis_backend.queue_info(q)["pending"] == 2
    assert drain(redis_backend, q) == ["a", "past"]


def test_a_holder_that_lets_go_by_a_release_wakes_the_fleet_for_the_first_delayed_task(
    redis_backend: RedisQueueBackend,
) -> None:
    """A stop or a yield releases the stream with delayed tasks left: it is scored at the first
    one's due time, earlier than the lease expiry the shard's poller last saw, and a wake-up tells
    the fleet to look again (and set its timer for it)."""
    q = qname()
    enqueue(redis_backend, q, "a")
    enqueue(redis_backend, q, "d", due_spec(5))
    listener = redis_backend.client.pubsub()
    listener.subscribe(redis_backend.keys.wake(redis_backend.keys.shard_of(q)))
    try:
        lease = redis_backend.ops.parse_acquire(
            q, redis_backend.call(redis_backend.ops.acquire(q, 5)), threading.Event(), time.monotonic()
        )
        assert lease is not None
        while listener.get_message(timeout=0.2) is not None:
            pass  # the subscription's confirmation
        done = [entry.id for entry, _ in lease.initial]
        assert redis_backend.call(redis_backend.ops.release(lease, done)) == 1
        message = listener.get_message(timeout=2)
    finally:
        listener.close()
    assert message is not None and message["data"] == str(redis_backend.keys.shard_of(q)).encode()
    score = redis_backend.client.zscore(redis_backend.keys.stream(q).ready, q)
    assert score is not None and 4_000 < score - redis_ms(redis_backend) <= 5_000


def test_a_due_task_is_in_its_stream_before_anything_moved_it(redis_backend: RedisQueueBackend) -> None:
    """On a paused queue nothing moves due tasks into the list, yet a due task has joined its
    stream: its status says pending (with its place), the counts say so, and an operator's skip
    reaches it as the head."""
    q = qname()
    redis_backend.admin.pause(q)
    first = enqueue(redis_backend, q, "a")
    late = enqueue(redis_backend, q, "d", due_spec(0.2))
    waiting = enqueue(redis_backend, q, "w", due_spec(30))
    time.sleep(0.3)
    status = redis_backend.task_status(q, late)
    assert (status.state, status.place) == ("pending", 1)
    assert redis_backend.task_status(q, waiting).state == "scheduled"
    counts = redis_backend.admin.stream_status(q)
    assert (counts.pending, counts.scheduled) == (2, 1)
    info = redis_backend.queue_info(q)
    assert (info["pending"], info["scheduled"]) == (2, 1)
    assert redis_backend.admin.skip(q) == first
    assert redis_backend.admin.skip(q) == late, "the due task was the head"
    assert redis_backend.task_status(q, late).state == "skipped"
    assert redis_backend.task_status(q, waiting).state == "scheduled"


def test_an_eta_whose_expiry_passes_first_by_redis_time_is_dead_lettered_unrun(
    redis_backend: RedisQueueBackend,
) -> None:
    """The call refuses an ``expires_in`` that ends before an ``eta`` by this process's clock; a
    producer whose clock is off can still send one that Redis's clock says expires first: it is
    dead-lettered as expired when it falls due, never run and never lost."""
    q = qname()
    now = redis_ms(redis_backend)
    task_id = new_task_id()
    items = [
        EncodedTask(
            task_id, 100, f"={now + 1500}", TaskRecord("t", ["x"], {}).encode(redis_backend.settings.serializer)
        )
    ]
    redis_backend.enqueuer.enqueue(q, items)
    time.sleep(1.7)
    assert drain(redis_backend, q) == []
    assert redis_backend.task_status(q, task_id).state == "expired"
