"""Sharing the safety poll, without Redis: which shards a replica polls, decided from the view
its heartbeat brings back (``beat.lua``'s reply), and what its heartbeat sends. Replies are
exact shapes; times are explicit monotonic seconds (the scheduler's own clock is a ``FakeClock``)."""

from __future__ import annotations

import json
import threading
from contextlib import nullcontext
from typing import Any

from pyfiq.config import Settings
from pyfiq.engine.keys import KeySchema
from pyfiq.engine.protocol import ScriptCalls
from pyfiq.engine.scheduler import (
    IDLE_BEAT_ROUNDS,
    IDLE_POLL_FACTOR,
    VIEW_REFRESH_BEATS,
    Scheduler,
    poll_group,
    poll_owners,
)
from tests.engine.helpers import FakeClock

SHARDS = 8
SETTINGS = Settings(prefix="poll", shards=SHARDS, lease_ttl=5.0, poll_interval=1.0)
OPS = ScriptCalls(KeySchema("poll", SHARDS), SETTINGS)
GROUP = poll_group(["orders"])
ALL = list(range(SHARDS))


class Directory:
    def registered_queues(self) -> list[str]:
        return ["orders"]

    def lookup(self, name: str) -> Any:
        return None

    def rate_limit_of(self, queue: str) -> None:
        return None


def scheduler(replica: str = "b", concurrency: int = 2) -> Scheduler:
    s = Scheduler(OPS, concurrency, ["orders"], Directory(), clock=FakeClock(), lock=nullcontext)
    s.identify(replica, host="h", pid=1, driver="threaded", concurrency=concurrency)
    return s


def view(*pollers: str, busy: tuple[str, ...] = ()) -> list[Any]:
    """A beat reply: Redis ms, then each poller's name and whether it polls now, by name."""
    reply: list[Any] = [1_000]
    for replica in sorted({*pollers, *busy}):
        reply += [f"{GROUP}|{replica}".encode(), 0 if replica in busy else 1]
    return reply


def polled_at(s: Scheduler, now: float) -> list[int]:
    """The shards a timed look at ``now`` covers (every shard is due by then)."""
    shards, _ = s.due_calls(now)
    return shards


def beat_call(s: Scheduler, now: float) -> Any:
    """The next heartbeat round that writes to the registry (an idle replica's rounds in between
    send nothing)."""
    for _ in range(IDLE_BEAT_ROUNDS):
        _, calls = s.heartbeat_round(now)
        if calls:
            assert calls[-1].script == "beat"
            return calls[-1]
    raise AssertionError(f"no heartbeat written in {IDLE_BEAT_ROUNDS} rounds")


def beat(s: Scheduler, reply: Any, now: float) -> None:
    beat_call(s, now)
    s.on_renewed([], [reply], now)


def test_every_shard_has_one_owner_whatever_order_the_pollers_are_seen_in() -> None:
    pollers = ["a", "b", "c"]
    owners = poll_owners(pollers, SHARDS)
    assert poll_owners(list(reversed(pollers)), SHARDS) == owners
    assert set(owners) <= set(pollers) and len(owners) == SHARDS
    assert set(poll_owners(["x", "y", "z", "w"], 64)) == {"x", "y", "z", "w"}, "64 shards spread over all four"


def test_a_poller_joining_or_leaving_moves_only_its_own_shards() -> None:
    before = poll_owners(["a", "b", "c"], 64)
    joined = poll_owners(["a", "b", "c", "d"], 64)
    assert all(new in (old, "d") for old, new in zip(before, joined, strict=True))
    assert "d" in joined
    left = poll_owners(["a", "c"], 64)
    assert all(new == old for old, new in zip(before, left, strict=True) if old != "b")


def test_before_any_view_every_shard_is_polled() -> None:
    s = scheduler()
    assert polled_at(s, 10.0) == ALL


def test_a_view_divides_the_timed_polls_and_leaves_events_to_everyone() -> None:
    a, b = scheduler("a"), scheduler("b")
    for s in (a, b):
        beat(s, view("a", "b"), 10.0)
    mine_a, mine_b = polled_at(a, 11.0), polled_at(b, 11.0)
    assert sorted(mine_a + mine_b) == ALL, "each shard polled by exactly one of them"
    assert mine_a and mine_b
    assert mine_a == [s for s, owner in enumerate(poll_owners(["a", "b"], SHARDS)) if owner == "a"]
    # Events are not divided: a wake-up, or a claim that may have left more work, looks at once.
    other = mine_b[0]
    a.wake([other])
    assert other in polled_at(a, 11.0)
    a.candidates([other], [[-1, 0]], 11.0)
    assert a.on_acquired(other, "orders", [0, 300], threading.Event(), 11.0) is None
    assert other not in polled_at(a, 11.1) and other in polled_at(a, 11.3), "a lease lapsing there is seen"


def test_a_poller_gone_from_the_view_hands_its_shards_over_at_once() -> None:
    s = scheduler("b")
    beat(s, view("a", "b"), 10.0)
    assert not s.gained_shards(), "the first view hands nothing over: every shard was polled"
    mine = polled_at(s, 10.0)
    s.candidates(mine, [[-1, 0]] * len(mine), 10.0)
    beat(s, view("b", busy=("a",)), 10.5)  # a is busy (every slot taken): b polls for both
    assert s.gained_shards() and not s.gained_shards(), "told once"
    assert s.idle_wait(10.5) == 0.0
    assert polled_at(s, 10.5) == sorted(set(ALL) - set(mine)), "the shards b polled stay on their schedule"


def test_a_busy_replica_polls_nothing_itself_and_every_shard_once_it_has_room() -> None:
    s = scheduler("b", concurrency=1)
    beat(s, view("a", "b"), 10.0)
    lease = s.on_acquired(0, "orders", [1, b"1:n", 1, 1], threading.Event(), 10.0)
    assert lease is not None and polled_at(s, 10.5) == [], "no slot free: no look at all"
    _, calls = s.heartbeat_round(11.0)
    assert json.loads(calls[-1].args[1])["poll"] == "" and calls[-1].args[4] == 0
    s.on_renewed([], [[2_000]], 11.0)
    assert not s.gained_shards()
    s.finished(lease, None)
    assert polled_at(s, 11.5) == ALL


def test_a_stale_view_falls_back_to_every_shard() -> None:
    s = scheduler("b")
    beat(s, view("a", "b"), 10.0)
    assert len(polled_at(s, 10.5)) < SHARDS
    s.on_renewed([], [ConnectionError("reset")], 11.0)  # the registry cannot be read
    assert len(polled_at(s, 11.0)) < SHARDS, "the last view stands for a while"
    assert polled_at(s, 10.0 + 3 * s.registry_interval() + 0.1) == ALL


def test_the_heartbeat_reads_the_pollers_afresh_now_and_then_and_checks_its_view_otherwise() -> None:
    s = scheduler("b")
    call = beat_call(s, 10.0)
    assert call.keys == [OPS.keys.replicas, OPS.keys.pollers]
    report = call.args[1]
    assert report.endswith(f'"poll":"{GROUP}"}}'), "the poll field comes last, where beat.lua reads it"
    assert call.args[3:9] == [f"{GROUP}|b", 1, s.poll_live_ms(), SHARDS, 1, 1] and len(call.args) == 9
    s.on_renewed([], [view("a", "b")], 10.0)
    refreshes = []
    for i in range(1, 2 * VIEW_REFRESH_BEATS):
        call = beat_call(s, 10.0 + i)
        refreshes.append(call.args[7])
        if call.args[7] == 0:
            assert call.args[9:] == [f"{GROUP}|a", f"{GROUP}|b"]
        s.on_renewed([], [view("a", "b")], 10.0 + i)
    assert refreshes.count(1) == 1, "one fresh read every VIEW_REFRESH_BEATS intervals (the first at 10.0)"
    assert refreshes.index(1) == VIEW_REFRESH_BEATS - 1


def test_a_lease_lapse_is_looked_at_by_every_replica_that_saw_it_not_only_the_shards_poller() -> None:
    a, b = scheduler("a"), scheduler("b")
    for s in (a, b):
        beat(s, view("a", "b"), 10.0)
    theirs = [shard for shard in ALL if shard not in polled_at(b, 11.0)]
    shard = theirs[0]
    b.wake([shard])
    assert shard in polled_at(b, 11.0)
    b.candidates([shard], [[4_500, 0]], 11.0)  # a lease there lapses in 4.5 s
    assert shard not in polled_at(b, 15.4)
    assert shard in polled_at(b, 15.5), "b looks when the lease can lapse, though a polls the shard"
    # Silence long enough to count a poller as gone never comes from an idle one's rhythm.
    assert b.poll_live_ms() >= 2.5 * b.registry_interval() * 1000


def test_an_empty_shard_waits_for_a_wake_up_and_a_slow_safety_poll() -> None:
    s = scheduler("b")
    assert polled_at(s, 10.0) == ALL
    replies: list[Any] = [[-1, 0]] * SHARDS
    replies[1] = [-1, 0, b"orders", 9_000]  # a due stream there
    replies[2] = [800, 0]  # a lease lapsing, or a delayed task, in 0.8 s
    s.candidates(ALL, replies, 10.0)
    assert polled_at(s, 10.0 + SETTINGS.poll_interval) == [1, 2], "shards with work keep poll_interval"
    s.candidates([1, 2], [[-1, 0]] * 2, 11.0)
    assert polled_at(s, 11.5) == []
    s.wake([5])
    assert polled_at(s, 11.5) == [5], "a wake-up is looked at at once"
    s.candidates([5], [[-1, 0]], 11.5)
    assert polled_at(s, 10.0 + IDLE_POLL_FACTOR * SETTINGS.poll_interval - 0.1) == []
    assert polled_at(s, 10.0 + IDLE_POLL_FACTOR * SETTINGS.poll_interval) == [s for s in ALL if s not in (1, 2, 5)]


def test_an_idle_replica_writes_its_heartbeat_every_few_rounds_and_at_once_when_it_changes() -> None:
    s = scheduler("b", concurrency=1)
    written = []
    for i in range(3 * IDLE_BEAT_ROUNDS):
        _, calls = s.heartbeat_round(10.0 + i)
        written.append(bool(calls))
    assert written.count(True) == 3, written
    lease = s.on_acquired(0, "orders", [1, b"1:n", 1, 1], threading.Event(), 30.0)
    assert lease is not None
    _, calls = s.heartbeat_round(31.0)  # full now: it stops polling, and says so at once
    assert calls[-1].script == "beat" and calls[-1].args[4] == 0
    for i in range(IDLE_BEAT_ROUNDS):
        _, calls = s.heartbeat_round(32.0 + i)
        assert [c.script for c in calls] == ["renew", "beat"], "a holder's record says what runs, every round"
    s.finished(lease, None)
    _, calls = s.heartbeat_round(40.0)
    assert calls and calls[-1].args[4] == 1, "it polls again: said at once"
    assert json.loads(calls[-1].args[1])["heartbeat_ms"] == int(s.registry_interval() * 1000)
