"""Regression tests for holes an outside review found in the guarantees (G1-G5): each one
failed on the code before its fix. Script-level tests drive the Lua scripts through ``ScriptCalls``
against a real redis-server; worker-level ones run real workers (and real loopback faults)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from typing import Any

import pytest
import redis

import pyfiq
from pyfiq import AsyncWorker, ConfigurationError, RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.engine.lease import Lease
from pyfiq.engine.protocol import ScriptCalls
from pyfiq.task import Entry, TaskRecord, new_task_id
from pyfiq_harness.proxy import FaultProxy
from tests.support.helpers import FAST, unique_prefix, wait_until


def enqueue(backend: RedisQueueBackend, stream: str, n: int, **kw: Any) -> list[str]:
    ids = [new_task_id() for _ in range(n)]
    backend.enqueue(stream, [(i, TaskRecord("t", [k], {})) for k, i in enumerate(ids)], **kw)
    return ids


def acquire(backend: RedisQueueBackend, stream: str, want: int = 0) -> Lease | None:
    call = backend.ops.acquire(stream, want)
    return backend.ops.parse_acquire(stream, backend.call(call), threading.Event(), time.monotonic())


def expire_lease(backend: RedisQueueBackend, lease: Lease) -> None:
    backend.client.delete(lease.keys.lease)
    backend.client.zadd(lease.keys.ready, {lease.stream: 0})


def qname() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


# -- bad data already in Redis (G3, G5) ------------------------------------------------------


def test_malformed_pending_entry_is_dead_lettered_at_once_and_the_stream_goes_on(
    redis_backend: RedisQueueBackend,
) -> None:
    first = enqueue(redis_backend, "q", 1)
    k = redis_backend.keys.stream("q")
    redis_backend.client.rpush(k.pending, b"hello-not-a-task")
    second = enqueue(redis_backend, "q", 1)
    lease = acquire(redis_backend, "q", want=10)
    assert lease is not None, "the claim must not fail half-way and strand the lease"
    assert [e.id for e, _ in lease.initial] == first + second
    (dead,) = redis_backend.dead_letters("q")
    assert dead.reason == "undecodable" and dead.raw.endswith(b"\nhello-not-a-task")
    info = redis_backend.queue_info("q")
    assert info["lease"] == lease.token and (info["pending"], info["inflight"]) == (0, 2)


def test_entry_the_scripts_used_to_accept_but_python_rejected_is_undecodable_at_once(
    redis_backend: RedisQueueBackend,
) -> None:
    k = redis_backend.keys.stream("q")
    payload = TaskRecord("t", [], {}).encode(redis_backend.settings.serializer)
    bad = b"a" * 32 + b"|zz|0|" + payload
    redis_backend.client.rpush(k.pending, bad)
    (good,) = enqueue(redis_backend, "q", 1)
    lease = acquire(redis_backend, "q", want=1)
    assert lease is not None and [e.id for e, _ in lease.initial] == [good]
    (dead,) = redis_backend.dead_letters("q")
    assert dead.reason == "undecodable" and dead.raw.endswith(bad)
    # Python parses exactly what the scripts accept.
    with pytest.raises(pyfiq.DecodeError):
        Entry.parse(bad)


def test_requeue_keeps_a_malformed_record_and_moves_the_good_ones_in_order(redis_backend: RedisQueueBackend) -> None:
    k = redis_backend.keys.stream("q")
    (good1,) = enqueue(redis_backend, "q", 1, expires_in=0.01)
    redis_backend.client.rpush(k.pending, b"garbage")
    (good2,) = enqueue(redis_backend, "q", 1, expires_in=0.01)
    time.sleep(0.05)
    assert acquire(redis_backend, "q", want=5) is None  # all three dead-lettered, nothing to hold
    assert [d.reason for d in redis_backend.dead_letters("q")] == ["expired", "undecodable", "expired"]
    assert redis_backend.requeue_dead_letters("q") == 2
    (left,) = redis_backend.dead_letters("q")
    assert left.reason == "undecodable" and left.raw.endswith(b"\ngarbage")
    pending = [Entry.parse(e).id for e in redis_backend.client.lrange(k.pending, 0, -1)]
    assert pending == [good1, good2]


def _fill_dead_letters(backend: RedisQueueBackend, stream: str, n: int) -> list[str]:
    """n dead letters in the stored format, written directly (a benchmark-sized set fast)."""
    k = backend.keys.stream(stream)
    ids = [new_task_id() for _ in range(n)]
    payload = TaskRecord("t", [], {}).encode(backend.settings.serializer)
    pipe = backend.client.pipeline(transaction=False)
    for seq, task_id in enumerate(ids, 1):
        record = b'{"seq":%d,"reason":"exhausted","deliveries":1,"at_ms":1}\n' % seq
        pipe.zadd(k.dead, {record + task_id.encode() + b"|1|0|" + payload: seq})
        pipe.hset(k.dead_ids, task_id, seq)
    pipe.sadd(k.dlq_index, stream)
    pipe.execute()
    return ids


def test_requeue_is_bounded_per_script_call(redis_backend: RedisQueueBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyfiq.backend.admin

    ids = _fill_dead_letters(redis_backend, "q", 1050)
    calls: list[Any] = []
    real = redis_backend.operator_call

    def counting(call: Any) -> Any:
        calls.append(call)
        return real(call)

    monkeypatch.setattr(redis_backend, "operator_call", counting)
    monkeypatch.setattr(pyfiq.backend.admin, "REQUEUE_STEP", 100)
    # By id: one call that looks at one record, wherever it sits.
    assert redis_backend.requeue_dead_letters("q", task_id=ids[700]) == 1
    assert len(calls) == 1
    # All, to the front: every call looks at no more than 100 records, order is kept.
    (existing,) = enqueue(redis_backend, "q", 1)
    calls.clear()
    assert redis_backend.requeue_dead_letters("q", front=True) == 1049
    assert len(calls) == 11 and all(c.args[4] == 100 for c in calls)
    k = redis_backend.keys.stream("q")
    pending = [Entry.parse(e).id for e in redis_backend.client.lrange(k.pending, 0, -1)]
    assert pending == [i for i in ids if i != ids[700]] + [ids[700], existing]
    assert redis_backend.dead_letters("q") == [] and redis_backend.dead_letter_streams() == []


def test_requeue_count_takes_the_oldest(redis_backend: RedisQueueBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyfiq.backend.admin

    monkeypatch.setattr(pyfiq.backend.admin, "REQUEUE_STEP", 7)
    ids = _fill_dead_letters(redis_backend, "q", 30)
    assert redis_backend.requeue_dead_letters("q", count=20) == 20
    k = redis_backend.keys.stream("q")
    assert [Entry.parse(e).id for e in redis_backend.client.lrange(k.pending, 0, -1)] == ids[:20]
    assert [d.task_id for d in redis_backend.dead_letters("q")] == ids[20:]


# -- delivery accounting (G3, G4) -------------------------------------------------------------


def test_tasks_a_holder_never_started_are_never_charged(redis_backend: RedisQueueBackend) -> None:
    """A worker whose call failed (a network blip) releases saying nothing started: however
    often that happens, the tasks stay first deliveries and never become poison."""
    ids = enqueue(redis_backend, "q", 3)
    ops = redis_backend.ops
    for _ in range(redis_backend.settings.max_deliveries * 2):
        lease = acquire(redis_backend, "q")
        assert lease is not None
        redis_backend.call(ops.take(lease, [], 3))  # the reply is "lost"
        assert redis_backend.call(ops.release(lease, [], [])) == 1
    assert redis_backend.dead_letters("q") == []
    lease = acquire(redis_backend, "q", want=3)
    assert lease is not None and [(e.id, d) for e, d in lease.initial] == [(i, 1) for i in ids]


def test_a_vanished_holder_charges_only_the_task_it_had_started(redis_backend: RedisQueueBackend) -> None:
    ids = enqueue(redis_backend, "q", 3)
    k = redis_backend.keys.stream("q")
    lease = acquire(redis_backend, "q", want=3)
    assert lease is not None
    expire_lease(redis_backend, lease)  # died right after taking: only the head was starting
    lease = acquire(redis_backend, "q", want=1)
    assert lease is not None and [(e.id, d) for e, d in lease.initial] == [(ids[0], 2)]
    lost = {f.decode(): v for f, v in redis_backend.client.hgetall(k.meta).items() if f.startswith(b"x:")}
    assert lost == {f"x:{ids[0]}": b"1"}


def test_a_task_that_outlives_its_lease_is_dead_lettered_as_lease_lost_not_poison(redis_server: Any) -> None:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), max_deliveries=2, shards=2)
    (task,) = enqueue(backend, "q", 1)
    for _ in range(2):
        lease = acquire(backend, "q", want=1)
        assert lease is not None and [e.id for e, _ in lease.initial] == [task]
        entry = lease.initial[0][0]
        expire_lease(backend, lease)  # its heartbeat starved (the task held the GIL) ...
        assert backend.call(backend.ops.lost(lease, entry)) == 1  # ... and it said so when it woke
    assert acquire(backend, "q", want=1) is None
    (dead,) = backend.dead_letters("q")
    assert dead.reason == "lease-lost" and dead.task_id == task
    assert "lease_ttl" in dead.header["error"] and dead.header["outlived"] == 2
    backend.close()


# -- the shard layout guard (G5) --------------------------------------------------------------


def test_layout_guard_survives_an_empty_restart(redis_server: Any) -> None:
    prefix = unique_prefix()
    fleet = RedisQueueBackend(redis_server.url, prefix=prefix, shards=16)
    stray = RedisQueueBackend(redis_server.url, prefix=prefix, shards=8)
    enqueue(fleet, "q", 1)
    for key in fleet.client.scan_iter(f"{prefix}:*"):  # the data is gone, as after an empty restart
        fleet.client.delete(key)
    # The fleet's idle polls write the layout again ...
    fleet.call_many([fleet.ops.due(s, 1, ["q"]) for s in range(16)])
    # ... so a producer with another shard count is refused, loudly, storing nothing.
    for stream in ("q", "other", "q#k1"):
        with pytest.raises(ConfigurationError, match="16 shards"):
            stray.enqueue(stream, [(new_task_id(), TaskRecord("t", [], {}))])
    assert not list(fleet.client.scan_iter(f"{prefix}:*:pending"))
    # And a fleet finds a shard laid out by a stray producer first.
    for key in fleet.client.scan_iter(f"{prefix}:*"):
        fleet.client.delete(key)
    enqueue(stray, "q", 1)
    shard = stray.keys.shard_of("q")
    (reply,) = fleet.call_many([fleet.ops.due(shard, 1, ["q"])])
    assert isinstance(reply, Exception) and "PYFIQLAYOUT" in str(reply)
    fleet.close()
    stray.close()


@pytest.mark.parametrize("checked_before", [False, True], ids=["started-after", "checked-before"])
def test_a_producer_with_more_shards_than_the_fleet_is_refused_after_an_empty_restart(
    redis_server: Any, checked_before: bool
) -> None:
    """A stray producer's streams that fall in shards the fleet does not have: their layout is
    missing, and the enqueue script never writes it, so the prefix's layout is checked again
    first, whether the stray started after the restart or had checked it long before."""
    prefix = unique_prefix()
    fleet = RedisQueueBackend(redis_server.url, prefix=prefix, shards=8)
    stray = RedisQueueBackend(redis_server.url, prefix=prefix, shards=16)
    fleet.check_layout()
    enqueue(fleet, "q", 1)
    stray.transport.layout_checked = checked_before
    for key in fleet.client.scan_iter(f"{prefix}:*"):  # an empty restart
        fleet.client.delete(key)
    fleet.call_many([fleet.ops.due(s, 1, ["q"]) for s in range(8)])  # the fleet's idle polls
    beyond = [s for s in (f"s{i}" for i in range(60)) if stray.keys.shard_of(s) >= 8][:5]
    assert beyond
    for stream in beyond:
        with pytest.raises(ConfigurationError, match="laid out with 8 shards"):
            stray.enqueue(stream, [(new_task_id(), TaskRecord("t", [], {}))])

    async def asynchronously() -> None:
        stray.transport.layout_checked = checked_before
        for stream in beyond:
            with pytest.raises(ConfigurationError, match="laid out with 8 shards"):
                await stray.aenqueue(stream, [(new_task_id(), TaskRecord("t", [], {}))])
        await stray.aclose()

    asyncio.run(asynchronously())
    assert not list(fleet.client.scan_iter(f"{prefix}:*:pending")), "nothing was stored"
    assert not [s for s in range(8, 16) if fleet.client.exists(stray.keys.layout(s))], "no shard laid out"
    fleet.close()
    stray.close()


def test_a_refused_stray_writes_nothing_and_a_shard_polled_since_the_restart_is_enough(redis_server: Any) -> None:
    prefix = unique_prefix()
    fleet = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    stray = RedisQueueBackend(redis_server.url, prefix=prefix, shards=8)
    fleet.call_many([fleet.ops.due(3, 1, None)])  # after an empty restart, one poll of shard 3 only
    with pytest.raises(ConfigurationError, match="laid out with 4 shards"):
        stray.enqueue("s", [(new_task_id(), TaskRecord("t", [], {}))])
    assert fleet.client.get(fleet.keys.layout_key) is None, "the refused stray wrote the prefix's layout"
    assert [k for k in fleet.client.scan_iter(f"{prefix}:*") if fleet.client.get(k) == b"8"] == []
    late = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    enqueue(late, "s", 1)  # a producer of the fleet's, started after the stray, is not locked out
    replies = fleet.call_many([fleet.ops.due(s, 1, None) for s in range(4)])
    assert not [r for r in replies if isinstance(r, Exception)]
    for b in (fleet, stray, late):
        b.close()


def test_a_stray_that_lays_out_first_is_heard_by_the_fleet_until_its_keys_are_deleted(redis_server: Any) -> None:
    prefix = unique_prefix()
    fleet = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    stray = RedisQueueBackend(redis_server.url, prefix=prefix, shards=8)
    producer = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    producer.check_layout()  # started before the empty restart
    for key in fleet.client.scan_iter(f"{prefix}:*"):
        fleet.client.delete(key)
    enqueue(stray, "s", 1)  # first after the restart: it wins, as documented
    (reply,) = fleet.call_many([fleet.ops.due(0, 1, None)])
    assert isinstance(reply, Exception) and "PYFIQLAYOUT" in str(reply), "the fleet hears of it"
    zero = next(s for s in (f"z{i}" for i in range(100)) if producer.keys.shard_of(s) == 0)
    with pytest.raises(ConfigurationError, match="laid out with 8 shards"):
        enqueue(producer, zero, 1)
    # The remedy the guide gives: the stray stopped, its layout keys deleted.
    fleet.client.delete(fleet.keys.layout_key, *(stray.keys.layout(s) for s in range(8)))
    replies = fleet.call_many([fleet.ops.due(s, 1, None) for s in range(4)])
    assert not [r for r in replies if isinstance(r, Exception)]
    enqueue(producer, zero, 1)
    assert fleet.client.llen(fleet.keys.stream(zero).pending) == 1
    for b in (fleet, stray, producer):
        b.close()


def test_a_layout_erased_again_before_the_call_is_laid_out_again(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = unique_prefix()
    producer = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    lay_out, restarts = producer.transport.lay_out, []

    def then_an_empty_restart(*shards: int) -> None:
        lay_out(*shards)
        if not restarts:
            restarts.append(1)
            for key in producer.client.scan_iter(f"{prefix}:*"):
                producer.client.delete(key)

    monkeypatch.setattr(producer.transport, "lay_out", then_an_empty_restart)
    (stored,) = producer.enqueue("s", [(new_task_id(), TaskRecord("t", [], {}))])
    assert stored[1] and restarts == [1]
    assert producer.client.llen(producer.keys.stream("s").pending) == 1
    producer.close()


@pytest.mark.parametrize("side", ["sync", "asyncio"])
def test_a_producer_whose_shard_0_changed_count_while_it_laid_out_takes_its_layout_back(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    """An empty restart right after its check, and a poll of the fleet's before its last read:
    the shard it wrote is taken back, so no producer of its count that checked before finds it
    laid out."""
    prefix = unique_prefix()
    fleet = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    stray = RedisQueueBackend(redis_server.url, prefix=prefix, shards=8)
    beyond = next(s for s in (f"s{i}" for i in range(100)) if stray.keys.shard_of(s) >= 4)
    transport = stray.transport

    def restart_and_poll() -> None:
        for key in fleet.client.scan_iter(f"{prefix}:*"):
            fleet.client.delete(key)
        fleet.call_many([fleet.ops.due(0, 1, None)])

    check, acheck, calls = transport.check_layout, transport.acheck_layout, []

    def checked() -> None:  # the first check is the enqueue's, the second lay_out's
        check()
        calls.append(1)
        if len(calls) == 2:
            restart_and_poll()

    async def achecked() -> None:
        await acheck()
        calls.append(1)
        if len(calls) == 2:
            restart_and_poll()

    monkeypatch.setattr(transport, "check_layout", checked)
    monkeypatch.setattr(transport, "acheck_layout", achecked)
    task = [(new_task_id(), TaskRecord("t", [], {}))]
    with pytest.raises(ConfigurationError, match="laid out with 4 shards"):
        if side == "sync":
            stray.enqueue(beyond, task)
        else:
            asyncio.run(stray.aenqueue(beyond, task))
    assert len(calls) == 2, "the race came inside lay_out"
    assert fleet.client.get(stray.keys.layout(stray.keys.shard_of(beyond))) is None, "taken back"
    assert fleet.client.get(fleet.keys.layout(0)) == b"4"
    assert not list(fleet.client.scan_iter(f"{prefix}:*:pending"))
    fleet.close()
    stray.close()


def test_a_shard_being_laid_out_lets_no_task_in_until_shard_0_agrees(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two strays of one count, one of which checked before an empty restart: while the other
    lays out a shard (and finds the fleet's count at shard 0), the first's enqueue there is
    refused, and nothing is left behind."""
    prefix = unique_prefix()
    fleet = RedisQueueBackend(redis_server.url, prefix=prefix, shards=2)
    first = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    second = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    first.check_layout()  # before the restart below, it laid the prefix out with 4
    beyond = next(s for s in (f"s{i}" for i in range(100)) if first.keys.shard_of(s) >= 2)
    target = first.keys.layout(first.keys.shard_of(beyond))
    for key in fleet.client.scan_iter(f"{prefix}:*"):  # an empty restart, then the fleet polls
        fleet.client.delete(key)
    fleet.call_many([fleet.ops.due(0, 1, None)])
    outcomes: list[str] = []
    real_set = second.transport.client.set

    def set_then_the_other_enqueues(name: str, value: Any, **kw: Any) -> Any:
        done = real_set(name, value, **kw)
        if name == target and not outcomes:
            try:
                first.enqueue(beyond, [(new_task_id(), TaskRecord("t", [], {}))])
                outcomes.append("accepted")
            except ConfigurationError:
                outcomes.append("refused")
        return done

    second.transport.layout_checked = True
    monkeypatch.setattr(second.transport, "check_layout", lambda: None)  # checked before, too
    monkeypatch.setattr(second.transport.client, "set", set_then_the_other_enqueues)
    with pytest.raises(ConfigurationError, match="laid out with 2 shards"):
        second.transport.lay_out(second.keys.shard_of(beyond))
    assert outcomes == ["refused"], "the shard being laid out let a task in"
    assert fleet.client.get(target) is None, "the tentative layout was taken back"
    assert not list(fleet.client.scan_iter(f"{prefix}:*:pending"))
    for b in (fleet, first, second):
        b.close()


def test_a_refusal_after_a_try_that_may_have_stored_reports_the_outcome_unknown(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyfiq.errors import BackendUnavailableError, EnqueueOutcomeUnknown

    prefix = unique_prefix()
    producer = RedisQueueBackend(redis_server.url, prefix=prefix, shards=2)
    enqueue(producer, "s", 1)
    transport, tries = producer.transport, []
    call_once = transport.call_once

    def stored_then_cut(call: Any, attempt: Any) -> Any:
        tries.append(1)
        reply = call_once(call, attempt)
        if len(tries) == 1:  # the reply is lost: the task is stored, the caller cannot know
            for key in producer.client.scan_iter(f"{prefix}:*layout"):
                producer.client.delete(key)  # and the layout is gone when it tries again
            raise redis.ConnectionError("Connection closed by server.")
        return reply

    def vanished(*shards: int) -> None:
        raise BackendUnavailableError("the shard layout vanished 3 times while it was written")

    monkeypatch.setattr(transport, "call_once", stored_then_cut)
    monkeypatch.setattr(transport, "lay_out", vanished)
    with pytest.raises(EnqueueOutcomeUnknown):
        producer.enqueuer.retry_alone("s", producer.encode([(new_task_id(), TaskRecord("t", [], {}))]), ["k"])
    assert producer.client.llen(producer.keys.stream("s").pending) == 2, "it was stored"
    producer.close()


def test_a_producer_alone_on_a_new_prefix_lays_out_each_shard_it_uses(redis_server: Any) -> None:
    prefix = unique_prefix()
    producer = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    streams = [f"s{i}" for i in range(12)]
    for stream in streams:
        enqueue(producer, stream, 2)
    asyncio.run(producer.aenqueue("late", [(new_task_id(), TaskRecord("t", [], {}))]))
    used = {producer.keys.shard_of(s) for s in [*streams, "late"]} | {0}
    assert {s for s in range(4) if producer.client.get(producer.keys.layout(s)) == b"4"} == used
    assert producer.client.get(producer.keys.layout_key) is None, "the prefix's own key is only read"
    assert sum(producer.client.llen(producer.keys.stream(s).pending) for s in streams) == 24
    producer.close()


# -- worker-level -----------------------------------------------------------------------------


@pytest.fixture
def rbackend(redis_server: Any) -> Any:
    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **FAST)
    pyfiq.configure(b)
    yield b
    b.close()


def test_expiry_is_checked_right_before_a_buffered_task_starts(redis_server: Any) -> None:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **{**FAST, "prefetch": 10})
    pyfiq.configure(backend)
    q, ran = qname(), []

    @fifo(queue=q, name=f"{q}.slow")
    def slow(i: int) -> None:
        ran.append(i)
        time.sleep(0.8 if i == 0 else 0)

    slow(0)
    slow.send_with_options(args=(1,), expires_in=0.3)
    slow(2)
    with ThreadedWorker(backend, queues=[q]):
        wait_until(lambda: ran == [0, 2], timeout=10, message="the expired task is skipped")
        wait_until(lambda: len(backend.dead_letters(q)) == 1, timeout=5)
    (dead,) = backend.dead_letters(q)
    assert dead.reason == "expired" and dead.record is not None and dead.record.args == [1]
    backend.close()


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def test_an_exception_whose_str_raises_follows_the_retry_policy(rbackend: RedisQueueBackend) -> None:
    q, attempts = qname(), []

    @fifo(queue=q, name=f"{q}.bad", max_retries=1, retry_wait=0)
    def bad() -> None:
        attempts.append(1)
        raise Unprintable()

    bad()
    with ThreadedWorker(rbackend, queues=[q]):
        wait_until(lambda: rbackend.dead_letters(q), timeout=10)
    (dead,) = rbackend.dead_letters(q)
    assert dead.reason == "exhausted" and len(attempts) == 2 and dead.header["attempts"] == 2
    assert "Unprintable" in dead.header["error"] and "str() raised RuntimeError" in dead.header["error"]


def test_unknown_task_grace_starts_again_after_a_requeue(redis_server: Any) -> None:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), **{**FAST, "unknown_task_grace": 1.0})
    q = qname()
    backend.enqueue(q, [(new_task_id(), TaskRecord("nobody.has.this", [], {}))])
    with ThreadedWorker(backend, queues=[q]):
        wait_until(lambda: backend.dead_letters(q), timeout=10)
        requeued = time.monotonic()
        assert backend.requeue_dead_letters(q) == 1
        wait_until(lambda: backend.dead_letters(q), timeout=10)
        waited = time.monotonic() - requeued
    assert waited >= 0.9, f"dead-lettered again {waited:.2f}s after the requeue, within its grace"
    backend.close()


def test_every_retry_takes_a_rate_permit(rbackend: RedisQueueBackend) -> None:
    q, times = qname(), []

    @fifo(queue=q, name=f"{q}.flaky", rate_limit=4, max_retries=5, retry_wait=0)
    def flaky() -> None:
        times.append(time.monotonic())
        if len(times) < 4:
            raise RuntimeError("downstream is failing")

    flaky()
    with ThreadedWorker(rbackend, queues=[q]):
        wait_until(lambda: len(times) == 4, timeout=10)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.2, f"attempts closer than the 4/s limit allows: {gaps}"


def test_a_stream_waiting_for_its_rate_permit_holds_no_worker_slot(rbackend: RedisQueueBackend) -> None:
    limited, free, started = qname(), qname(), {}

    @fifo(queue=limited, name=f"{limited}.t", key=lambda k, i: k, rate_limit=1)
    def slow_lane(k: str, i: int) -> None:
        pass

    @fifo(queue=free, name=f"{free}.t")
    def fast_lane() -> None:
        started["free"] = time.monotonic()

    for i in range(4):
        for k in ("a", "b"):
            slow_lane(k, i)
    with ThreadedWorker(rbackend, queues=[limited, free], concurrency=2):
        time.sleep(0.5)  # both slots busy with the limited queue's streams
        enqueued = time.monotonic()
        fast_lane()
        wait_until(lambda: "free" in started, timeout=10)
    assert started["free"] - enqueued < 1.0, "an unlimited queue waited behind rate-limited streams"


class _Flaky:
    def __init__(self) -> None:
        self.runs: list[tuple[str, float, float]] = []
        self.lock = threading.Lock()


@pytest.mark.parametrize("driver", ["threaded", "asyncio"])
def test_stop_timeout_never_lets_another_replica_run_the_task_alongside(
    rbackend: RedisQueueBackend, driver: str
) -> None:
    """stop(timeout) while a plain function runs: the lease stays renewed until the function
    really ends (past the TTL), so the other replica never runs the task at the same time;
    the finished task is acknowledged and runs once."""
    q, runs, lock = qname(), [], threading.Lock()

    @fifo(queue=q, name=f"{q}.slow")
    def slow() -> None:
        start = time.monotonic()
        time.sleep(2.5)  # well past the 1.5 s lease TTL
        with lock:
            runs.append((threading.current_thread().name, start, time.monotonic()))

    slow()
    if driver == "threaded":
        first = ThreadedWorker(rbackend, queues=[q]).start()
        wait_until(lambda: first.held_streams == [q], timeout=5)
        time.sleep(0.3)
        assert first.stop(timeout=0.2) is False
    else:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()

        async def make() -> AsyncWorker:
            return await AsyncWorker(RedisQueueBackend(rbackend.url, rbackend.settings), queues=[q]).start()

        aw = asyncio.run_coroutine_threadsafe(make(), loop).result(10)
        wait_until(lambda: aw.held_streams == [q], timeout=5)
        time.sleep(0.3)
        assert asyncio.run_coroutine_threadsafe(aw.stop(timeout=0.2), loop).result(10) is False
    with ThreadedWorker(rbackend, queues=[q]):
        time.sleep(4.0)
    if driver == "asyncio":
        loop.call_soon_threadsafe(loop.stop)
    assert len(runs) == 1, f"the task ran {len(runs)} times: {runs}"
    assert rbackend.queue_info(q)["inflight"] == 0 and rbackend.queue_info(q)["pending"] == 0


def test_network_blips_never_turn_tasks_that_never_ran_into_poison(redis_server: Any) -> None:
    with FaultProxy(redis_server.port) as proxy:
        settings = {**FAST, "max_deliveries": 2}
        backend = RedisQueueBackend(proxy.url, prefix=unique_prefix(), **settings)
        producer = RedisQueueBackend(redis_server.url, backend.settings)
        pyfiq.configure(producer)
        q, ran = qname(), []

        @fifo(queue=q, name=f"{q}.t", key=lambda k, i: k, rate_limit=2, retry_wait=0.05)
        def task(k: str, i: int) -> None:
            ran.append((k, i))

        for i in range(4):
            for k in ("a", "b", "c"):
                task(k, i)
        with ThreadedWorker(backend, queues=[q], concurrency=3):
            for _ in range(8):
                time.sleep(0.4)
                proxy.cut()
                time.sleep(0.3)
                proxy.heal()
            wait_until(lambda: len(set(ran)) == 12 or producer.dead_letters(q), timeout=30)
        assert producer.dead_letters(q) == []
        assert len(set(ran)) == 12
        for k in ("a", "b", "c"):
            firsts = list(dict.fromkeys(i for kk, i in ran if kk == k))
            assert firsts == [0, 1, 2, 3]
        backend.close()
        producer.close()


def test_a_raising_log_handler_cannot_kill_a_worker_thread(rbackend: RedisQueueBackend) -> None:
    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise BrokenPipeError("stdout is a closed pipe")

    logger = logging.getLogger("pyfiq")
    handler, level = Broken(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        q, done = qname(), []

        @fifo(queue=q, name=f"{q}.t", max_retries=1, retry_wait=0)
        def t(i: int) -> None:
            if i == 0:
                raise ValueError("logged as a retry and a dead letter")
            done.append(i)

        for i in range(3):
            t(i)
        with ThreadedWorker(rbackend, queues=[q]) as w:
            wait_until(lambda: done == [1, 2], timeout=10)
            assert w.healthy
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_worker_thread_that_dies_takes_the_worker_down_loudly(
    rbackend: RedisQueueBackend, caplog: pytest.LogCaptureFixture
) -> None:
    class Fatal(BaseException):
        pass

    w = ThreadedWorker(rbackend, queues=[qname()])

    def explode(now: float) -> float:
        raise Fatal("boom")

    w.scheduler.idle_wait = explode  # type: ignore[method-assign]
    with caplog.at_level(logging.CRITICAL, logger="pyfiq"):
        w.start()
        wait_until(lambda: not w.healthy and w._stopped.is_set(), timeout=10)
    assert isinstance(w.failure, Fatal)
    assert any("pyfiq.worker_thread_died" in r.getMessage() for r in caplog.records)


def test_pyfiq_prints_nothing_unless_the_application_configures_logging(
    rbackend: RedisQueueBackend, capfd: pytest.CaptureFixture[str]
) -> None:
    q, done = qname(), []

    @fifo(queue=q, name=f"{q}.t", max_retries=0)
    def t() -> None:
        done.append(1)
        raise ValueError("dead-lettered, logged at error level")

    t()
    with ThreadedWorker(rbackend, queues=[q]):
        wait_until(lambda: rbackend.dead_letters(q), timeout=10)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_ops_release_signature_names_started_tasks() -> None:
    from pyfiq.engine.keys import KeySchema

    ops = ScriptCalls(KeySchema("p", 1), pyfiq.Settings())
    lease = Lease("s", ops.keys.stream("s"), "1:x", 1, threading.Event())
    call = ops.release(lease, ["a" * 32], ["b" * 32], delay_ms=250)
    assert call.args[2:4] == [1, 1] and call.args[6] == 250 and call.args[7:] == ["a" * 32, "b" * 32]
