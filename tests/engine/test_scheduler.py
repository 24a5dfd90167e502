"""``Scheduler`` without Redis: claims, heartbeats, the memory of tasks this replica cannot run,
and the events it keeps for the driver to log. Time is a ``FakeClock``, moved by hand."""

from __future__ import annotations

import threading

import pytest

from pyfiq.engine.events import ClaimFailed, HeartbeatLate, LayoutMismatch, LeaseLost, TaskRefused
from pyfiq.engine.lease import Lease, lease_margin
from pyfiq.engine.outcomes import Deferred, Prepared
from pyfiq.engine.protocol import Call, RateLimit
from pyfiq.engine.scheduler import Scheduler
from tests.engine.helpers import (
    FENCE,
    KEYS,
    OPS,
    SETTINGS,
    SK,
    START,
    STREAM,
    TOKEN,
    Directory,
    FakeClock,
    entry,
    granted,
    header_of,
    kinds,
    run_task,
    scheduler_of,
    stream_keys,
    task_id,
)

# -- the memory of tasks this replica has no function for -----------------------------------------


def test_grace_memory_is_forgotten_once_the_task_is_dead_lettered() -> None:
    clock = FakeClock()
    scheduler = scheduler_of(Directory(), clock=clock)
    step = run_task(1)
    assert isinstance(scheduler.prepare(granted(), step, "r"), Deferred)
    clock.now += SETTINGS.unknown_task_grace
    assert header_of(scheduler.prepare(granted(), step, "r"))["reason"] == "unknown-task"
    (refused,) = scheduler.events.take()
    assert isinstance(refused, TaskRefused) and (refused.stream, refused.task_id) == (STREAM, task_id(1))
    # Requeued and met again: a fresh grace, not an instant dead letter.
    clock.now += 5
    assert isinstance(scheduler.prepare(granted(), step, "r"), Deferred)


def test_grace_memory_is_forgotten_once_the_task_runs() -> None:
    clock = FakeClock()
    directory = Directory()
    scheduler = scheduler_of(directory, clock=clock)
    step = run_task(1)
    assert isinstance(scheduler.prepare(granted(), step, "r"), Deferred)
    clock.now += 10
    directory.names.add("app.charge")
    assert isinstance(scheduler.prepare(granted(), step, "r"), Prepared)
    directory.names.clear()  # a rollback removed it again, long after the first meeting
    clock.now += SETTINGS.unknown_task_grace * 2
    assert isinstance(scheduler.prepare(granted(), step, "r"), Deferred)
    assert scheduler.events.take() == [], "deferring is said once the lease ends, not per meeting"


def test_a_stream_handed_back_for_an_unknown_function_is_said_once_per_grace_naming_the_function() -> None:
    """A rolling deploy that removed a function: every replica hands its stream back about once
    a second; the log says so once per stream per grace period, with the missing name."""
    from types import SimpleNamespace

    from pyfiq.engine.events import TaskDeferred
    from pyfiq.engine.stream import Finished

    clock = FakeClock()
    scheduler = scheduler_of(Directory(), clock=clock)

    def handed_back(stream: str) -> list[object]:
        lease = SimpleNamespace(stream=stream, revoked=False, fence=1, lost_reason="")
        run = SimpleNamespace(lease=lease, deferred=task_id(1), deferred_name="app.removed")
        scheduler.ended(run, Finished("released"))  # type: ignore[arg-type]
        return scheduler.events.take()

    (said,) = handed_back(STREAM)
    assert isinstance(said, TaskDeferred) and (said.stream, said.name) == (STREAM, "app.removed")
    for _ in range(5):
        clock.now += 1
        assert handed_back(STREAM) == [], "not again within the grace"
    assert len(handed_back("orders#other")) == 1, "another stream is said on its own"
    clock.now += SETTINGS.unknown_task_grace
    assert len(handed_back(STREAM)) == 1, "and again once the grace has passed"


# -- claims -----------------------------------------------------------------------------------------


def idle_scheduler(now: float) -> Scheduler:
    """A scheduler that has just looked at every shard and found nothing due."""
    scheduler = scheduler_of(Directory("app.charge"), concurrency=2, queues=["orders"], clock=FakeClock(now))
    shards, calls = scheduler.due_calls(now)
    assert shards == list(range(KEYS.shards)) and all(c.script == "due" for c in calls)
    scheduler.candidates(shards, [[-1, 0]] * len(shards), now)
    assert scheduler.idle_wait(now) == SETTINGS.poll_interval
    return scheduler


def test_acquire_not_claimable_changes_nothing() -> None:
    scheduler = idle_scheduler(100.0)
    assert scheduler.on_acquired(SK.shard, STREAM, [0], threading.Event(), 100.0) is None
    assert scheduler.free() == 2 and scheduler.idle_wait(100.0) == SETTINGS.poll_interval


def test_acquire_still_leased_for_a_moment_looks_again_when_it_lapses() -> None:
    scheduler = idle_scheduler(100.0)
    assert scheduler.on_acquired(SK.shard, STREAM, [0, 250], threading.Event(), 100.0) is None
    assert scheduler.idle_wait(100.0) == pytest.approx(0.25)
    shards, _ = scheduler.due_calls(100.25)
    assert shards == [SK.shard]


def test_acquire_granted_holds_the_lease_counted_from_the_send_time() -> None:
    scheduler = idle_scheduler(100.0)
    sent = 97.0  # the reply took three seconds to arrive
    lease = scheduler.on_acquired(SK.shard, STREAM, [1, TOKEN, FENCE, 4_242, entry(1), 2], threading.Event(), sent)
    assert lease is not None and scheduler.held_leases() == [lease] and scheduler.free() == 1
    assert (lease.token, lease.fence, lease.redis_ms) == (TOKEN, FENCE, 4_242)
    assert [(e.id, d) for e, d in lease.initial] == [(task_id(1), 2)]
    assert lease.valid_until == pytest.approx(sent + SETTINGS.lease_ttl - lease_margin(SETTINGS.lease_ttl))
    assert scheduler.candidates([SK.shard], [[-1, 0, STREAM, 1.0]], 100.0) == [], "a held stream is no candidate"


def test_a_lease_gets_its_gate_from_the_lock_the_driver_gave() -> None:
    made: list[threading.Lock] = []

    def lock() -> threading.Lock:
        made.append(threading.Lock())
        return made[-1]

    scheduler = Scheduler(OPS, 1, None, Directory(), clock=FakeClock(), lock=lock)
    lease = scheduler.on_acquired(SK.shard, STREAM, [1, TOKEN, FENCE, 1], threading.Event(), START)
    assert lease is not None and lease.gate is made[-1] and len(made) == 2, "the scheduler's own, then the gate"


def test_first_take_is_zero_for_a_rate_limited_queue() -> None:
    plain = scheduler_of(Directory())
    limited = scheduler_of(Directory(limits={"orders": RateLimit(2)}))
    assert plain.first_take(STREAM) == SETTINGS.effective_prefetch
    assert limited.first_take(STREAM) == 0


def test_a_layout_of_another_shard_count_is_said_and_the_shard_skipped() -> None:
    scheduler = scheduler_of(Directory("app.charge"), queues=["orders"])
    shards, _ = scheduler.due_calls(START)
    replies: list[object] = [[-1, 0]] * len(shards)
    replies[1] = RuntimeError("PYFIQLAYOUT written with 8 shards")
    assert scheduler.candidates(shards, replies, START) == []
    assert scheduler.events.take() == [LayoutMismatch(1, KEYS.shards, "written with 8 shards")]


def test_a_failed_claim_backs_off_doubling_and_says_so() -> None:
    scheduler = scheduler_of()
    assert scheduler.claim_failed(ConnectionError("refused")) == 0.1
    assert scheduler.claim_failed(ConnectionError("refused")) == 0.2
    assert scheduler.events.take() == [
        ClaimFailed("ConnectionError: refused", 0.1),
        ClaimFailed("ConnectionError: refused", 0.2),
    ]


# -- heartbeats -----------------------------------------------------------------------------------


def holding(valid_for: float, clock: FakeClock | None = None) -> tuple[Scheduler, Lease]:
    """A scheduler holding one lease that stays valid ``valid_for`` seconds past the clock's now."""
    clock = clock or FakeClock()
    scheduler = scheduler_of(Directory(), clock=clock)
    sent = clock.now + valid_for - SETTINGS.lease_ttl + lease_margin(SETTINGS.lease_ttl)
    reply = [1, TOKEN, FENCE, 1]
    lease = scheduler.on_acquired(SK.shard, STREAM, reply, threading.Event(), sent)
    assert lease is not None
    return scheduler, lease


def test_renewed_extends_validity_from_the_round_send_time() -> None:
    scheduler, lease = holding(valid_for=1.0)
    before = lease.valid_until
    leases, calls = scheduler.renew_calls()
    assert calls == [Call("renew", stream_keys("renew"), [TOKEN, SETTINGS.lease_ttl_ms, STREAM, ""])]
    sent = START
    assert scheduler.on_renewed(leases, [1], sent) == []
    assert lease.valid_until == pytest.approx(sent + SETTINGS.lease_ttl - lease_margin(SETTINGS.lease_ttl))
    assert lease.valid_until > before and not lease.lost


def test_renewal_refused_loses_the_lease_unless_it_was_ending() -> None:
    scheduler, lease = holding(valid_for=5.0)
    lease.ending = True  # a release is in flight: its refusal means "released"
    assert scheduler.on_renewed([lease], [0], START) == [] and not lease.lost
    lease.ending = False
    assert scheduler.on_renewed([lease], [0], START) == [lease]
    assert lease.lost and lease.abort.is_set() and "renewal refused" in lease.lost_reason
    assert scheduler.renew_calls() == ([], []), "a lost lease is not renewed again"
    assert scheduler.events.take() == [LeaseLost(STREAM, FENCE, lease.lost_reason)]


def test_renewal_error_loses_the_lease_only_once_it_may_have_lapsed() -> None:
    clock = FakeClock()
    scheduler, lease = holding(valid_for=5.0, clock=clock)
    assert scheduler.on_renewed([lease], [ConnectionError("reset")], START) == []
    assert not lease.lost
    clock.now += 5.0  # the reply (an error) came when the lease may have lapsed
    assert scheduler.on_renewed([lease], [ConnectionError("reset")], START) == [lease]
    assert lease.lost and "ConnectionError: reset" in lease.lost_reason
    assert kinds(scheduler.events.take()) == ["LeaseLost"]


def test_a_heartbeat_round_later_than_an_interval_is_said() -> None:
    clock = FakeClock()
    scheduler = scheduler_of(clock=clock)
    interval = SETTINGS.effective_heartbeat
    assert scheduler.heartbeat_wait(START) == interval
    scheduler.heartbeat_round(START + interval)
    assert scheduler.events.take() == [], "on time"
    scheduler.heartbeat_round(START + 4 * interval)
    assert scheduler.events.take() == [HeartbeatLate(round(2 * interval, 3), interval)]
