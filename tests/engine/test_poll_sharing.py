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
from pyfiq.engine.scheduler import VIEW_REFRESH_BEATS, Scheduler, poll_group, poll_owners
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


def beat(s: Scheduler, reply: Any, now: float) -> None:
    _, calls = s.heartbeat_round(now)
    s.on_renewed([], [reply], now)
    assert calls[-1].script == "beat"


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
    assert polled_at(s, 10.0 + 3 * SETTINGS.effective_heartbeat + 0.1) == ALL


def test_the_heartbeat_reads_the_pollers_afresh_now_and_then_and_checks_its_view_otherwise() -> None:
    s = scheduler("b")
    _, calls = s.heartbeat_round(10.0)
    call = calls[-1]
    assert call.keys == [OPS.keys.replicas, OPS.keys.pollers]
    report = call.args[1]
    assert report.endswith(f'"poll":"{GROUP}"}}'), "the poll field comes last, where beat.lua reads it"
    assert call.args[3:9] == [f"{GROUP}|b", 1, s.poll_live_ms(), SHARDS, 1, 1] and len(call.args) == 9
    s.on_renewed([], [view("a", "b")], 10.0)
    refreshes = []
    for i in range(1, 2 * VIEW_REFRESH_BEATS):
        _, calls = s.heartbeat_round(10.0 + i)
        refreshes.append(calls[-1].args[7])
        if calls[-1].args[7] == 0:
            assert calls[-1].args[9:] == [f"{GROUP}|a", f"{GROUP}|b"]
        s.on_renewed([], [view("a", "b")], 10.0 + i)
    assert refreshes.count(1) == 2, "one fresh read every VIEW_REFRESH_BEATS beats"


def test_a_poller_counts_as_gone_before_a_lease_it_held_can_lapse() -> None:
    for ttl in (1.5, 5.0, 60.0):
        ops = ScriptCalls(KeySchema("p", SHARDS), Settings(lease_ttl=ttl))
        s = Scheduler(ops, 1, ["orders"], Directory(), clock=FakeClock(), lock=nullcontext)
        beat_s = s.settings.effective_heartbeat
        live = s.poll_live_ms() / 1000
        # Gone after `live` of silence, noticed within one more heartbeat, before the lease
        # renewed in its last round lapses; and never on a single late heartbeat.
        assert beat_s * 1.5 <= live and live + beat_s < ttl
