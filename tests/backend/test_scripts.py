"""The Lua scripts, driven directly through the sans-I/O ``ScriptCalls`` against a real redis-server:
fencing, ordering, in-flight recovery, poison detection, expiry, dedup and clean-up."""

from __future__ import annotations

import threading
import time

import pytest

from pyfiq import RedisQueueBackend
from pyfiq.engine.lease import Lease
from pyfiq.engine.protocol import ScriptCalls
from pyfiq.task import Entry, TaskRecord, due_spec, new_task_id


def enqueue(backend: RedisQueueBackend, stream: str, n: int, **kw) -> list[str]:  # type: ignore[no-untyped-def]
    ids = [new_task_id() for _ in range(n)]
    backend.enqueue(stream, [(i, TaskRecord("t", [k], {})) for k, i in enumerate(ids)], **kw)
    return ids


def acquire(backend: RedisQueueBackend, stream: str) -> Lease | None:
    return backend.ops.parse_acquire(
        stream, backend.call(backend.ops.acquire(stream)), threading.Event(), time.monotonic()
    )


def take(backend: RedisQueueBackend, lease: Lease, acks: list[str], want: int) -> list:  # type: ignore[type-arg]
    return backend.call(backend.ops.take(lease, acks, want))


def ids_of(reply: list) -> list[str]:  # type: ignore[type-arg]
    return [Entry.parse(reply[i]).id for i in range(2, len(reply), 2)]


def expire_lease(backend: RedisQueueBackend, lease: Lease) -> None:
    """Make the lease lapse now, as the TTL would: the key expires and the stream falls due."""
    backend.client.delete(lease.keys.lease)
    backend.client.zadd(lease.keys.ready, {lease.stream: 0})


def test_take_hands_tasks_in_acceptance_order_and_acks_carry(redis_backend: RedisQueueBackend) -> None:
    ids = enqueue(redis_backend, "orders", 5)
    lease = acquire(redis_backend, "orders")
    assert lease is not None
    got: list[str] = []
    acks: list[str] = []
    while True:
        reply = take(redis_backend, lease, acks, 2)
        if reply[0] == 0:
            break
        batch = ids_of(reply)
        got += batch
        acks = batch
    assert got == ids
    info = redis_backend.queue_info("orders")
    assert (info["pending"], info["inflight"], info["lease"]) == (0, 0, None)


def test_a_second_consumer_cannot_acquire_a_held_stream(redis_backend: RedisQueueBackend) -> None:
    enqueue(redis_backend, "q", 1)
    assert acquire(redis_backend, "q") is not None
    assert acquire(redis_backend, "q") is None


def test_stale_holder_is_fenced_from_every_state_change(redis_backend: RedisQueueBackend) -> None:
    ids = enqueue(redis_backend, "q", 3)
    old = acquire(redis_backend, "q")
    assert old is not None
    assert ids_of(take(redis_backend, old, [], 1)) == ids[:1]
    expire_lease(redis_backend, old)
    new = acquire(redis_backend, "q")
    assert new is not None and new.fence > old.fence

    ops = redis_backend.ops
    assert take(redis_backend, old, [ids[0]], 1) == [-1]
    assert redis_backend.call(ops.dead_letter(old, [], ids[0], '{"reason":"x"}')) == -1
    assert redis_backend.call(ops.release(old, [ids[0]], [])) == -1
    assert redis_backend.call(ops.renew(old)) == 0
    info = redis_backend.queue_info("q")
    assert (info["pending"], info["inflight"], info["dead"]) == (2, 1, 0)
    # The new holder gets the in-flight task first, as a second delivery.
    reply = take(redis_backend, new, [], 5)
    assert ids_of(reply) == ids[:1] and reply[3] == 2


def test_fencing_token_keeps_rising_when_the_counter_is_lost(redis_backend: RedisQueueBackend) -> None:
    enqueue(redis_backend, "q", 1)
    first = acquire(redis_backend, "q")
    assert first is not None
    expire_lease(redis_backend, first)
    redis_backend.client.delete(first.keys.epoch)  # as a failover to a stale replica would
    second = acquire(redis_backend, "q")
    assert second is not None
    assert second.fence > first.fence
    assert second.token != first.token


def test_recovery_hands_earlier_in_flight_tasks_one_at_a_time(redis_backend: RedisQueueBackend) -> None:
    ids = enqueue(redis_backend, "q", 4)
    old = acquire(redis_backend, "q")
    assert old is not None
    assert ids_of(take(redis_backend, old, [], 3)) == ids[:3]  # prefetch 3, then "crash"
    expire_lease(redis_backend, old)
    new = acquire(redis_backend, "q")
    assert new is not None
    seen = []
    acks: list[str] = []
    while (reply := take(redis_backend, new, acks, 3))[0] == 1:
        batch = ids_of(reply)
        seen.append((batch, reply[3::2]))
        acks = batch
    # Each in-flight task comes back alone with its delivery count raised, then fresh work.
    assert seen == [([ids[0]], [2]), ([ids[1]], [2]), ([ids[2]], [2]), ([ids[3]], [1])]


def test_poison_task_is_dead_lettered_after_max_deliveries(redis_server) -> None:  # type: ignore[no-untyped-def]
    from tests.support.helpers import unique_prefix

    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), max_deliveries=3, shards=2)
    ids = enqueue(backend, "q", 2)
    for delivery in (1, 2, 3):
        lease = acquire(backend, "q")
        assert lease is not None
        reply = take(backend, lease, [], 1)
        assert ids_of(reply) == ids[:1] and reply[3] == delivery
        expire_lease(backend, lease)  # the consumer died running it
    lease = acquire(backend, "q")
    assert lease is not None
    reply = take(backend, lease, [], 1)
    assert ids_of(reply) == ids[1:] and reply[3] == 1  # the task behind it was not counted
    (dead,) = backend.dead_letters("q")
    assert dead.reason == "poison" and dead.task_id == ids[0] and dead.header["deliveries"] == 3
    assert backend.dead_letter_streams() == ["q"]


def test_release_returns_unstarted_tasks_to_the_front_in_order(redis_backend: RedisQueueBackend) -> None:
    ids = enqueue(redis_backend, "q", 5)
    lease = acquire(redis_backend, "q")
    assert lease is not None
    assert ids_of(take(redis_backend, lease, [], 3)) == ids[:3]
    # ids[0] done, ids[1] and ids[2] never started.
    assert redis_backend.call(redis_backend.ops.release(lease, [ids[0]], [])) == 1
    assert redis_backend.client.lrange(lease.keys.inflight, 0, -1) == []
    pending = [Entry.parse(e).id for e in redis_backend.client.lrange(lease.keys.pending, 0, -1)]
    assert pending == ids[1:]
    nxt = acquire(redis_backend, "q")
    assert nxt is not None
    reply = take(redis_backend, nxt, [], 1)
    assert ids_of(reply) == ids[1:2] and reply[3] == 1  # a first delivery, not a redelivery


def test_ack_out_of_order_is_refused_without_changes(redis_backend: RedisQueueBackend) -> None:
    ids = enqueue(redis_backend, "q", 2)
    lease = acquire(redis_backend, "q")
    assert lease is not None
    take(redis_backend, lease, [], 2)
    with pytest.raises(Exception, match="not at the head"):
        take(redis_backend, lease, [ids[1]], 1)
    assert redis_backend.queue_info("q")["inflight"] == 2


def test_expired_task_is_dead_lettered_not_run(redis_backend: RedisQueueBackend) -> None:
    stale = enqueue(redis_backend, "q", 1, expires_in=0.05)
    fresh = enqueue(redis_backend, "q", 1)
    time.sleep(0.1)
    lease = acquire(redis_backend, "q")
    assert lease is not None
    assert ids_of(take(redis_backend, lease, [], 5)) == fresh
    (dead,) = redis_backend.dead_letters("q")
    assert dead.reason == "expired" and dead.task_id == stale[0]


def test_dedup_key_returns_the_first_task_within_the_window(redis_backend: RedisQueueBackend) -> None:
    rec = TaskRecord("t", [], {})
    first = redis_backend.enqueue("q", [("a" * 32, rec)], dedup_keys=["order-1"])
    again = redis_backend.enqueue("q", [("b" * 32, rec)], dedup_keys=["order-1"])
    other = redis_backend.enqueue("q", [("c" * 32, rec)], dedup_keys=["order-2"])
    assert first == [("a" * 32, True)]
    assert again == [("a" * 32, False)]
    assert other == [("c" * 32, True)]
    assert redis_backend.queue_info("q")["pending"] == 2


def test_drained_stream_leaves_no_keys_behind(redis_backend: RedisQueueBackend) -> None:
    ids = enqueue(redis_backend, "gone", 2)
    lease = acquire(redis_backend, "gone")
    assert lease is not None
    take(redis_backend, lease, [], 2)
    assert take(redis_backend, lease, ids, 2) == [0]
    prefix = redis_backend.keys.prefix
    left = {k.decode() for k in redis_backend.client.scan_iter(f"{prefix}:*")}
    assert not [k for k in left if ":q:gone:" in k]
    assert "gone" not in redis_backend.active_streams()


def test_requeue_moves_dead_letters_back_with_deadline_cleared(redis_backend: RedisQueueBackend) -> None:
    (stale,) = enqueue(redis_backend, "q", 1, expires_in=0.01)
    time.sleep(0.05)
    lease = acquire(redis_backend, "q")
    assert lease is not None
    assert take(redis_backend, lease, [], 1) == [0]  # expired, dead-lettered, stream released
    assert redis_backend.requeue_dead_letters("q") == 1
    assert redis_backend.dead_letters("q") == [] and redis_backend.dead_letter_streams() == []
    lease = acquire(redis_backend, "q")
    assert lease is not None
    reply = take(redis_backend, lease, [], 1)
    assert ids_of(reply) == [stale]
    assert Entry.parse(reply[2]).expires_ms == 0


def test_enqueue_wakes_idle_workers_only_when_a_stream_becomes_claimable(
    redis_backend: RedisQueueBackend,
) -> None:
    pubsub = redis_backend.pubsub()
    pubsub.subscribe(redis_backend.keys.wake_channel)
    time.sleep(0.05)
    enqueue(redis_backend, "q", 1)
    enqueue(redis_backend, "q", 1)  # already claimable: no second wake-up
    messages = []
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        m = pubsub.get_message(timeout=0.1)
        if m:
            messages.append(int(m["data"]))
    pubsub.close()
    assert messages == [redis_backend.keys.shard_of("q")]


def test_due_filters_streams_by_consumed_queue(redis_backend: RedisQueueBackend) -> None:
    b = RedisQueueBackend(redis_backend.url, prefix=redis_backend.keys.prefix + "x", shards=1)
    enqueue(b, "mine", 1)
    enqueue(b, "theirs", 1)
    enqueue(b, "mine#k1", 1)
    _, offset, due = ScriptCalls.parse_due(b.call(b.ops.due(0, 10, ["mine"])))
    assert [s for s, _ in due] == ["mine", "mine#k1"] and offset == 0
    assert due[0][1] <= due[1][1], "oldest first"


def test_due_cost_does_not_grow_with_foreign_backlog(redis_backend: RedisQueueBackend) -> None:
    """An idle worker of queue 'mine' pays the same per poll whether another queue has 5 or
    5,000 due streams: it never reads them (it paged through all of them before)."""
    b = RedisQueueBackend(redis_backend.url, prefix=redis_backend.keys.prefix + "p", shards=1)
    enqueue(b, "mine", 1)

    def commands_per_poll() -> int:
        before = int(b.client.info("stats")["total_commands_processed"])
        _, offset, due = ScriptCalls.parse_due(b.call(b.ops.due(0, 4, ["mine"])))
        assert [s for s, _ in due] == ["mine"] and offset == 0
        return int(b.client.info("stats")["total_commands_processed"]) - before

    for i in range(5):
        enqueue(b, f"theirs#{i}", 1)
    small = commands_per_poll()
    rec = TaskRecord("t", [], {})
    for chunk in range(50):
        for i in range(100):
            b.enqueue(f"theirs#{5 + chunk * 100 + i}", [(new_task_id(), rec)])
    assert commands_per_poll() == small


def test_due_with_many_consumed_queues_pages_the_queue_index(redis_backend: RedisQueueBackend) -> None:
    from pyfiq.engine.protocol import DUE_SCAN

    b = RedisQueueBackend(redis_backend.url, prefix=redis_backend.keys.prefix + "m", shards=1)
    for i in range(DUE_SCAN + 5):
        enqueue(b, f"theirs{i}", 1)
    enqueue(b, "mine", 1)
    consumed = ["mine", *[f"other{i}" for i in range(100)]]  # more than are looked up one by one
    offset, found, calls = 0, [], 0
    while True:
        calls += 1
        _, offset, due = ScriptCalls.parse_due(b.call(b.ops.due(0, 4, consumed, offset)))
        found += [s for s, _ in due]
        if not offset:
            break
    assert found == ["mine"] and calls == 2


def test_graceful_hand_off_never_counts_as_a_lost_consumer(redis_backend: RedisQueueBackend) -> None:
    (task,) = enqueue(redis_backend, "q", 1)
    for round_ in range(redis_backend.settings.max_deliveries + 3):
        lease = acquire(redis_backend, "q")
        assert lease is not None
        reply = take(redis_backend, lease, [], 1)
        # It ran on each holder, so its deliveries rise; but no holder died running it.
        assert ids_of(reply) == [task] and reply[3] == round_ + 1
        # Stopped mid-retry: the started task stays in flight, the lease is handed over.
        assert redis_backend.call(redis_backend.ops.release(lease, [], [task])) == 1
    assert redis_backend.dead_letters("q") == []


def test_pipelined_calls_survive_a_lost_script_cache(redis_backend: RedisQueueBackend) -> None:
    enqueue(redis_backend, "q", 1)
    redis_backend.client.script_flush()  # as after a Redis restart
    shard = redis_backend.keys.shard_of("q")
    (reply,) = redis_backend.call_many([redis_backend.ops.due(shard, 5, None)])
    assert ScriptCalls.parse_due(reply)[2][0][0] == "q"


def test_acquire_takes_the_first_tasks_in_the_same_round_trip(redis_backend: RedisQueueBackend) -> None:
    ops = redis_backend.ops
    ids = enqueue(redis_backend, "q", 3)
    lease = ops.parse_acquire("q", redis_backend.call(ops.acquire("q", 2)), threading.Event(), time.monotonic())
    assert lease is not None and [(e.id, d) for e, d in lease.initial] == [(ids[0], 1), (ids[1], 1)]
    expire_lease(redis_backend, lease)  # crashed with both in flight
    again = ops.parse_acquire("q", redis_backend.call(ops.acquire("q", 2)), threading.Event(), time.monotonic())
    assert again is not None and [(e.id, d) for e, d in again.initial] == [(ids[0], 2)], "recovery: one at a time"
    assert ids_of(take(redis_backend, again, [ids[0]], 2)) == [ids[1]]


def test_acquire_of_a_stream_holding_only_expired_tasks_forgets_it(redis_backend: RedisQueueBackend) -> None:
    (stale,) = enqueue(redis_backend, "q", 1, expires_in=0.01)
    time.sleep(0.05)
    ops = redis_backend.ops
    assert ops.parse_acquire("q", redis_backend.call(ops.acquire("q", 5)), threading.Event(), time.monotonic()) is None
    assert [d.task_id for d in redis_backend.dead_letters("q")] == [stale]
    assert redis_backend.queue_info("q")["lease"] is None and "q" not in redis_backend.active_streams()


def test_release_after_an_error_keeps_delivery_counts(redis_backend: RedisQueueBackend) -> None:
    (task,) = enqueue(redis_backend, "q", 1)
    ops = redis_backend.ops
    lease = ops.parse_acquire("q", redis_backend.call(ops.acquire("q", 1)), threading.Event(), time.monotonic())
    assert lease is not None and lease.initial[0][1] == 1
    # The worker lost track of the last call (a connection error): the task may have run.
    assert redis_backend.call(ops.release(lease, [], [task])) == 1
    again = ops.parse_acquire("q", redis_backend.call(ops.acquire("q", 1)), threading.Event(), time.monotonic())
    assert again is not None and [(e.id, d) for e, d in again.initial] == [(task, 2)]


def test_a_batch_moves_live_tasks_in_order_and_dead_letters_expired_ones_between_them(
    redis_backend: RedisQueueBackend,
) -> None:
    """A slice of pending tasks is moved at once: the expired ones in it are dead-lettered in
    their order, the others handed over in theirs, and nothing is left behind or doubled."""
    live_a = enqueue(redis_backend, "q", 2)
    stale_a = enqueue(redis_backend, "q", 1, expires_in=0.05)
    live_b = enqueue(redis_backend, "q", 1)
    stale_b = enqueue(redis_backend, "q", 2, expires_in=0.05)
    live_c = enqueue(redis_backend, "q", 3)
    time.sleep(0.1)
    lease = acquire(redis_backend, "q")
    assert lease is not None
    first = take(redis_backend, lease, [], 4)
    assert ids_of(first) == live_a + live_b + live_c[:1], "4 live tasks: the slice read past the expired"
    second = take(redis_backend, lease, ids_of(first), 4)
    assert ids_of(second) == live_c[1:]
    dead = redis_backend.dead_letters("q")
    assert [(d.reason, d.task_id) for d in dead] == [("expired", i) for i in stale_a + stale_b]
    assert take(redis_backend, lease, ids_of(second), 4) == [0]


def test_marks_of_redelivered_tasks_are_cleared_when_they_are_acknowledged(redis_backend: RedisQueueBackend) -> None:
    """A batch without marks skips the clear; one whose tasks carry marks (handed over after a
    lost holder) clears exactly theirs, so a later delivery starts counting afresh."""
    ids = enqueue(redis_backend, "q", 3)
    first = acquire(redis_backend, "q")
    assert first is not None
    assert ids_of(take(redis_backend, first, [], 3)) == ids
    expire_lease(redis_backend, first)  # the holder died with the batch in flight
    second = acquire(redis_backend, "q")
    assert second is not None
    meta = second.keys.meta

    def marked() -> set[str]:
        """The task ids the meta hash holds marks of."""
        fields = {f.decode() for f in redis_backend.client.hkeys(meta)} - {"handed", "running", "attempt"}
        return {f.split(":", 1)[1] for f in fields}

    handed = ids_of(take(redis_backend, second, [], 1))
    assert handed == ids[:1] and marked() == {ids[0]}
    more = ids_of(take(redis_backend, second, handed, 1))
    assert more == ids[1:2] and marked() == {ids[1]}, "the acknowledged task's marks went"
    rest = ids_of(take(redis_backend, second, more, 1))
    assert rest == ids[2:]
    assert take(redis_backend, second, rest, 1) == [0]
    assert not redis_backend.client.exists(meta)


def test_a_poll_of_an_empty_shard_reads_one_key(redis_backend: RedisQueueBackend) -> None:
    """An idle fleet's polls: a shard where no consumed queue has a stream costs the layout
    check and one ZCARD, however many queues the worker consumes."""
    b = RedisQueueBackend(redis_backend.url, prefix=redis_backend.keys.prefix + "e", shards=1)
    queues = [f"idle-{i}" for i in range(4)]
    b.call(b.ops.due(0, 4, queues))  # the layout key is written by the first look

    def calls() -> dict[str, int]:
        stats = b.client.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    before = calls()
    assert ScriptCalls.parse_due(b.call(b.ops.due(0, 4, queues))) == (None, 0, [])
    after = calls()
    ran = {cmd: n - before.get(cmd, 0) for cmd, n in after.items() if n != before.get(cmd, 0)}
    ran.pop("info", None)
    assert ran == {"evalsha": 1, "get": 1, "zcard": 1}, ran


def test_a_replica_that_lost_the_race_for_a_stream_is_told_when_its_lease_can_lapse(
    redis_backend: RedisQueueBackend,
) -> None:
    """Every idle replica hears a wake-up and tries the claim; the losers learn when the
    winner's lease lapses, so they take the stream over then if the winner dies (whoever
    polls the shard)."""
    enqueue(redis_backend, "race", 1)
    winner = acquire(redis_backend, "race")
    assert winner is not None
    reply = redis_backend.call(redis_backend.ops.acquire("race"))
    ttl_ms = redis_backend.settings.lease_ttl_ms
    assert reply[0] == 0 and ttl_ms - 200 <= int(reply[1]) <= ttl_ms


def test_a_poll_reports_a_lease_lapse_beside_a_paused_due_stream_of_the_same_queue(
    redis_backend: RedisQueueBackend,
) -> None:
    """The queue's index score is its earliest stream's: a paused stream that is due must not
    hide when another stream's lease lapses (a dead holder's take-over waits on it)."""
    b = RedisQueueBackend(redis_backend.url, prefix=redis_backend.keys.prefix + "h", shards=1)
    enqueue(b, "q#paused", 1)
    b.pause("q", "paused", wait=0)
    enqueue(b, "q#held", 1)
    assert acquire(b, "q#held") is not None
    nxt, _, streams = ScriptCalls.parse_due(b.call(b.ops.due(0, 4, ["q"])))
    ttl = b.settings.lease_ttl
    assert streams == [] and nxt is not None and ttl - 0.2 <= nxt <= ttl


def test_a_poll_reports_a_delayed_task_beside_a_paused_due_stream_of_the_same_queue(
    redis_backend: RedisQueueBackend,
) -> None:
    b = RedisQueueBackend(redis_backend.url, prefix=redis_backend.keys.prefix + "d", shards=1)
    enqueue(b, "q#paused", 1)
    b.pause("q", "paused", wait=0)
    items = b.encode([(new_task_id(), TaskRecord("t", [], {}))], when=due_spec(delay=3.0))
    b.enqueuer.enqueue("q#later", items)
    nxt, _, streams = ScriptCalls.parse_due(b.call(b.ops.due(0, 4, ["q"])))
    assert streams == [] and nxt is not None and 2.8 <= nxt <= 3.0
