"""The shard layout guard's fault model: a fleet and a stray producer with another shard count,
on a real redis-server, with empty restarts and the fleet's polls at any point in between.

The guard holds if every task the stray got stored is where the fleet looks for it (the same
shard under both counts, and one the fleet has), or else the fleet hears of the stray loudly:
one of its polls is refused for the layout. A task stored in a shard no worker polls, with no
refusal anywhere, would wait forever unseen."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyfiq import ConfigurationError, RedisQueueBackend
from pyfiq.task import TaskRecord, new_task_id
from tests.support.helpers import unique_prefix
from tests.support.servers import RedisServer

STREAMS = [f"s{i}" for i in range(24)]

actions = st.lists(
    st.one_of(
        st.tuples(st.just("restart")),
        st.tuples(st.just("poll"), st.integers(0, 15)),
        st.tuples(st.just("poll-all")),
        st.tuples(st.just("stray"), st.sampled_from(STREAMS)),
        st.tuples(st.just("fleet"), st.sampled_from(STREAMS)),
    ),
    min_size=1,
    max_size=14,
)


def _enqueue(backend: RedisQueueBackend, stream: str) -> bool:
    try:
        backend.enqueue(stream, [(new_task_id(), TaskRecord("t", [], {}))])
    except ConfigurationError:
        return False
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fleet_shards=st.integers(1, 8),
    stray_shards=st.integers(1, 16),
    stray_checked=st.booleans(),
    steps=actions,
)
def test_a_stray_producer_never_stores_a_task_the_fleet_cannot_find_unheard(
    redis_server: RedisServer, fleet_shards: int, stray_shards: int, stray_checked: bool, steps: list[Any]
) -> None:
    if fleet_shards == stray_shards:
        stray_shards += 1
    prefix = unique_prefix()
    fleet = RedisQueueBackend(redis_server.url, prefix=prefix, shards=fleet_shards)
    stray = RedisQueueBackend(redis_server.url, prefix=prefix, shards=stray_shards)
    try:
        fleet.check_layout()
        # A stray that checked the prefix before the fleet existed, or one that checks now.
        stray.transport.layout_checked = stray_checked
        refused = False  # the fleet heard of the stray (a poll refused for the layout)
        stored: list[str] = []
        won = False  # the stray had a task stored since the last empty restart
        for step in steps:
            if step[0] == "restart":  # an empty restart: every key of the prefix gone
                for key in fleet.client.scan_iter(f"{prefix}:*"):
                    fleet.client.delete(key)
                won = refused = False  # what happened before is gone with the data
            elif step[0] in ("poll", "poll-all"):
                shards = range(fleet_shards) if step[0] == "poll-all" else [step[1] % fleet_shards]
                replies = fleet.call_many([fleet.ops.due(s, 1, None) for s in shards])
                refused |= any(isinstance(r, Exception) and "PYFIQLAYOUT" in str(r) for r in replies)
            elif step[0] == "stray":
                if _enqueue(stray, step[1]):
                    stored.append(step[1])
                    won = True
            else:
                _enqueue(fleet, step[1])
        # The fleet goes on polling every shard it has.
        replies = fleet.call_many([fleet.ops.due(s, 1, None) for s in range(fleet_shards)])
        refused |= any(isinstance(r, Exception) and "PYFIQLAYOUT" in str(r) for r in replies)
        unseen = [
            s
            for s in stored
            if stray.keys.shard_of(s) != fleet.keys.shard_of(s) or stray.keys.shard_of(s) >= fleet_shards
        ]
        # Where the stray's task went under the stray's count, and still holds it.
        unseen = [s for s in unseen if fleet.client.llen(stray.keys.stream(s).pending)]
        if not won:
            # A stray refused wrote nothing: it locks out neither the fleet nor a producer
            # started after it.
            assert not refused, "a poll of the fleet was refused, though the stray never got in"
            late = RedisQueueBackend(redis_server.url, prefix=prefix, shards=fleet_shards)
            try:
                assert _enqueue(late, "late"), "a producer with the fleet's count was refused"
            finally:
                late.close()
        assert not unseen or refused, (
            f"the stray ({stray_shards} shards) stored tasks of {unseen} where the fleet "
            f"({fleet_shards} shards) never looks, and no poll of the fleet was refused"
        )
    finally:
        fleet.close()
        stray.close()
