"""The enqueue script's hot path, against a real redis-server: immediate tasks without dedup, for
a stream that is already claimable or held and has no delayed tasks, are appended with four
commands and no helper built (see enqueue.lua). Each test shows that the path is taken where it
may be, and that every other case still goes the general way: a wake-up for a stream that was
not claimable, delayed tasks that fell due moved first, the layout guard, dedup."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from pyfiq import ConfigurationError, RedisQueueBackend
from pyfiq.task import Entry, TaskRecord, new_task_id
from tests.backend.test_delayed import acquire, drain, enqueue, redis_ms
from tests.support.helpers import unique_prefix


def qname() -> str:
    return f"hot-{uuid.uuid4().hex[:8]}"


def calls(backend: RedisQueueBackend) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in backend.client.info("commandstats").items()}


def counted(backend: RedisQueueBackend, before: dict[str, int]) -> dict[str, int]:
    """Commands run since ``before``, pyfiq's own reads of the counters left out."""
    after = calls(backend)
    delta = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    delta.pop("info", None)
    return delta


def test_an_enqueue_to_a_claimable_stream_only_appends(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    first = enqueue(redis_backend, q, 0)  # the general path: the stream becomes claimable
    before = calls(redis_backend)
    ids = [enqueue(redis_backend, q, k, expires_in=30) for k in range(1, 4)]
    ran = counted(redis_backend, before)
    assert ran == {"evalsha": 3, "zscore": 3, "exists": 3, "get": 3, "time": 3, "rpush": 3}
    entries = [Entry.parse(e) for e in redis_backend.client.lrange(redis_backend.keys.stream(q).pending, 0, -1)]
    assert [e.id for e in entries] == [first, *ids]
    now = redis_ms(redis_backend)
    for e in entries[1:]:  # Redis's clock, the deadline counted from it, as the general path writes
        assert now - 5_000 < e.enqueued_ms <= now
        assert e.expires_ms == e.enqueued_ms + 30_000
    assert drain(redis_backend, q) == [0, 1, 2, 3]


def test_a_held_stream_takes_the_hot_path_and_its_holder_takes_the_task(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    enqueue(redis_backend, q, 0)
    lease, _ = acquire(redis_backend, q)
    assert lease is not None
    before = calls(redis_backend)
    enqueue(redis_backend, q, 1)
    ran = counted(redis_backend, before)
    assert "zadd" not in ran and "publish" not in ran and ran["rpush"] == 1
    # The lease's expiry is still the stream's score: its holder, not a poll, takes the task.
    assert redis_backend.client.zscore(lease.keys.ready, q) == pytest.approx(
        redis_ms(redis_backend) + redis_backend.client.pttl(lease.keys.lease), abs=2_000
    )
    reply = redis_backend.call(redis_backend.ops.take(lease, [], 10))
    payloads = [Entry.parse(reply[i]).payload for i in range(2, len(reply), 2)]
    tags = [TaskRecord.decode(p, redis_backend.settings.serializer).args[0] for p in payloads]
    assert tags[-1] == 1 and tags == sorted(tags)


def test_a_stream_that_was_not_claimable_is_made_so_and_its_shard_woken(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    keys = redis_backend.keys.stream(q)
    listener = redis_backend.client.pubsub()
    listener.subscribe(redis_backend.keys.wake(keys.shard))
    assert listener.get_message(timeout=2) is not None  # the subscription itself
    for round_ in range(2):  # the first enqueue ever, then one after the stream was drained
        enqueue(redis_backend, q, round_)
        assert redis_backend.client.zscore(keys.ready, q) is not None
        message = listener.get_message(timeout=2)
        assert message is not None and message["data"] == str(keys.shard).encode()
        assert drain(redis_backend, q) == [round_]
        assert redis_backend.client.zscore(keys.ready, q) is None
    listener.close()


def test_delayed_tasks_that_fell_due_still_join_ahead_of_a_later_enqueue(redis_backend: RedisQueueBackend) -> None:
    """A claimable stream with delayed tasks goes the general path, which moves due ones first."""
    q = qname()
    enqueue(redis_backend, q, "now")
    enqueue(redis_backend, q, "delayed", when="+50")
    time.sleep(0.15)
    enqueue(redis_backend, q, "after")
    assert drain(redis_backend, q) == ["now", "delayed", "after"]


def test_a_call_with_a_delayed_task_goes_the_general_path(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    enqueue(redis_backend, q, 0)
    ids = [new_task_id() for _ in range(3)]
    items = [
        *redis_backend.encode([(ids[0], TaskRecord("t", [1], {}))]),
        *redis_backend.encode([(ids[1], TaskRecord("t", [2], {}))], when="+60000"),
        *redis_backend.encode([(ids[2], TaskRecord("t", [3], {}))]),
    ]
    redis_backend.enqueuer.enqueue(q, items)
    keys = redis_backend.keys.stream(q)
    assert redis_backend.client.llen(keys.pending) == 3  # 0, 1 and 3; 2 waits its minute
    assert redis_backend.client.zcard(keys.later) == 1


def test_dedup_goes_the_general_path(redis_backend: RedisQueueBackend) -> None:
    q = qname()
    enqueue(redis_backend, q, 0)
    first, again = new_task_id(), new_task_id()
    stored = redis_backend.enqueue(q, [(first, TaskRecord("t", [1], {}))], dedup_keys=["k"])
    repeated = redis_backend.enqueue(q, [(again, TaskRecord("t", [2], {}))], dedup_keys=["k"])
    assert [tuple(s) for s in stored] == [(first, True)]
    assert [tuple(s) for s in repeated] == [(first, False)]
    assert drain(redis_backend, q) == [0, 1]


def test_a_producer_with_another_shard_count_is_refused_at_a_claimable_stream(redis_server: Any) -> None:
    """The hot path reads the shard's layout too: a producer laid out otherwise is refused at a
    stream that is claimable, whether or not its shard number for the stream is the fleet's."""
    prefix = unique_prefix()
    fleet = RedisQueueBackend(redis_server.url, prefix=prefix, shards=16)
    stray = RedisQueueBackend(redis_server.url, prefix=prefix, shards=8)
    stray.transport.layout_checked = True  # as if it started before the fleet laid the prefix out
    streams = [f"s{i}" for i in range(40)]
    for stream in streams:
        enqueue(fleet, stream, "fleet")
    same = 0
    for stream in streams:
        same += stray.keys.shard_of(stream) == fleet.keys.shard_of(stream)
        with pytest.raises(ConfigurationError, match="16 shards"):
            enqueue(stray, stream, "stray")
        assert drain(fleet, stream) == ["fleet"]
    assert same, "some streams have the same shard under both counts"
    assert not list(fleet.client.scan_iter(f"{prefix}:*:pending"))
    fleet.close()
    stray.close()
