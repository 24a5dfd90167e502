"""The per-minute counts of finished tasks that the scripts keep for the dashboard's rates: what
counts as succeeded and failed, the bounded ring of minutes, and the rate read from it."""

from __future__ import annotations

from typing import Any

import pytest

from pyfiq import RedisQueueBackend
from pyfiq.backend.views import Rate
from pyfiq.engine.keys import COUNT_MINUTES
from pyfiq.task import TaskRecord, new_task_id
from tests.dashboard.scene import enqueue


def totals(backend: RedisQueueBackend, queue: str) -> tuple[int, int, set[int]]:
    """(succeeded, failed, minutes) summed over every shard's count hash of ``queue``."""
    ok = failed = 0
    minutes: set[int] = set()
    for shard in range(backend.keys.shards):
        fields = {k.decode(): int(v) for k, v in backend.client.hgetall(backend.keys.counts(shard, queue)).items()}
        for slot in range(COUNT_MINUTES):
            if f"m{slot}" in fields:
                minutes.add(fields[f"m{slot}"])
                ok += fields[f"s{slot}"]
                failed += fields[f"f{slot}"]
    return ok, failed, minutes


def test_acknowledged_tasks_count_as_succeeded_and_dead_letters_as_failed(redis_backend: RedisQueueBackend) -> None:
    b = redis_backend
    for i in range(4):
        enqueue(b, "counted", "app.t", i)
    lease = b.ops.parse_acquire("counted", b.call(b.ops.acquire("counted", 1)), _flag(), 0.0)
    assert lease is not None
    first = lease.initial[0][0].id
    reply = b.call(b.ops.take(lease, [first], 1))  # one acknowledged, the next handed
    second = reply[2][:32].decode()
    assert b.call(b.ops.dead_letter(lease, [], second, '{"reason":"exhausted"}')) == 1
    assert totals(b, "counted")[:2] == (1, 1)
    third = b.call(b.ops.take(lease, [], 1))[2][:32].decode()
    assert b.call(b.ops.release(lease, [third])) == 1  # acknowledged on the way out
    assert b.skip("counted") is not None  # an operator's skip is a dead letter too
    ok, failed, minutes = totals(b, "counted")
    assert (ok, failed) == (2, 2)
    last = max(minutes)
    if len(minutes) == 1:  # (unless the minute turned during the test)
        # The rate over the last minute, read at the end of the minute they were counted in.
        rate = b.admin.rates(["counted"], last * 60_000 + 59_999)["counted"]
        assert (round(rate.succeeded * 60), round(rate.failed * 60)) == (2, 2)
        # Half a minute later, half of that minute is still in the window.
        rate = b.admin.rates(["counted"], (last + 1) * 60_000 + 30_000)["counted"]
        assert (rate.succeeded * 60, rate.failed * 60) == (1.0, 1.0)
    assert b.admin.rates(["counted"], (last + 2) * 60_000 + 1)["counted"] == Rate()


def test_a_refused_call_counts_nothing(redis_backend: RedisQueueBackend) -> None:
    b = redis_backend
    enqueue(b, "refused", "app.t", 1)
    lease = b.ops.parse_acquire("refused", b.call(b.ops.acquire("refused", 1)), _flag(), 0.0)
    assert lease is not None
    b.client.delete(b.keys.stream("refused").lease)  # the lease lapsed
    assert b.call(b.ops.take(lease, [lease.initial[0][0].id], 1)) == [-1]
    assert totals(b, "refused")[:2] == (0, 0)


def test_the_counts_are_a_ring_of_minutes_that_expires(redis_backend: RedisQueueBackend) -> None:
    b = redis_backend
    k = b.keys.stream("ring")
    seconds, _ = b.client.time()
    minute = int(seconds) // 60
    slot = minute % COUNT_MINUTES
    # What the slot held COUNT_MINUTES ago must not be added to this minute's count.
    b.client.hset(k.counts, mapping={f"m{slot}": minute - COUNT_MINUTES, f"s{slot}": 99, f"f{slot}": 7})
    enqueue(b, "ring", "app.t", 1)
    lease = b.ops.parse_acquire("ring", b.call(b.ops.acquire("ring", 1)), _flag(), 0.0)
    assert lease is not None
    assert b.call(b.ops.take(lease, [lease.initial[0][0].id], 1)) == [0]
    fields = {f.decode(): int(v) for f, v in b.client.hgetall(k.counts).items()}
    if fields.get(f"m{slot}") == minute:  # (else the minute turned meanwhile: another slot took it)
        assert (fields[f"s{slot}"], fields[f"f{slot}"]) == (1, 0)
    assert len(fields) <= 3 * COUNT_MINUTES
    assert 0 < b.client.pttl(k.counts) <= (COUNT_MINUTES + 1) * 60_000


@pytest.mark.parametrize("shards", [1, 8])
def test_every_shard_of_a_keyed_queue_counts_into_its_own_key(redis_server: Any, shards: int) -> None:
    from tests.support.helpers import unique_prefix

    b = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=shards)
    streams = [f"wide#k-{i}" for i in range(20)]
    for s in streams:
        b.enqueue(s, [(new_task_id(), TaskRecord("app.t", [], {}))])
    for s in streams:
        lease = b.ops.parse_acquire(s, b.call(b.ops.acquire(s, 1)), _flag(), 0.0)
        assert lease is not None
        assert b.call(b.ops.take(lease, [lease.initial[0][0].id], 1)) == [0]
    assert totals(b, "wide")[:2] == (20, 0)
    keys = {k.decode() for k in b.client.scan_iter(f"{b.keys.prefix}:*:counts:*")}
    assert keys == {b.keys.counts(b.keys.shard_of(s), "wide") for s in streams}
    b.close()


def _flag() -> Any:
    import threading

    return threading.Event()
