"""``Lease`` without Redis: how long it is surely held (counted from send times, never from
replies), Redis's clock estimated from the last reply, and halts under the driver's gate."""

from __future__ import annotations

import threading

import pytest

from pyfiq.engine.lease import Lease, lease_margin, release_retry_delays
from tests.engine.helpers import FENCE, SK, STREAM, TOKEN, granted


def test_lease_confirm_counts_from_the_send_time_and_never_goes_back() -> None:
    lease = Lease(STREAM, SK, TOKEN, FENCE, threading.Event(), ttl=10.0)
    lease.confirm(100.0)
    assert lease.valid_until == 100.0 + 10.0 - 1.0
    lease.confirm(95.0)  # a slow reply to an older renewal
    assert lease.valid_until == 109.0
    assert lease_margin(2.0) == pytest.approx(0.2) and lease_margin(60.0) == 1.0


def test_a_lease_lapses_at_the_time_it_is_asked_about() -> None:
    lease = granted(sent_at=100.0)  # valid until 100 + 10 - 1
    assert not lease.lapsed(108.9) and not lease.abort.is_set()
    assert lease.lapsed(109.0)
    assert lease.lost and lease.abort.is_set() and "counted from when it was sent" in lease.lost_reason
    assert lease.lapsed(0.0), "lost stays lost"


def test_redis_time_is_estimated_from_the_send_time_of_the_last_reply() -> None:
    lease = granted(redis_ms=5_000, sent_at=100.0)
    assert lease.redis_now_ms(100.0) == 5_000
    assert lease.redis_now_ms(102.5) == 7_500
    lease.clock(9_000, 104.0)
    assert lease.redis_now_ms(104.25) == 9_250


def test_a_halt_is_said_once_and_taken_under_the_gate_the_driver_gave() -> None:
    gate = threading.Lock()
    lease = granted()
    lease.gate = gate
    with gate:  # a first attempt is checking the halt right now: the halt waits for it
        halting = threading.Thread(target=lease.halt, args=("paused",))
        halting.start()
        halting.join(0.05)
        assert halting.is_alive() and not lease.halted
    halting.join(5)
    assert lease.halted == "paused"
    assert not lease.halt("skipped") and lease.halted == "paused", "the first reason stays"


def test_a_lease_without_a_driver_gate_halts_without_one() -> None:
    lease = Lease(STREAM, SK, TOKEN, FENCE, threading.Event())
    assert lease.halt("paused") and lease.halted == "paused"


def test_a_revocation_halts_the_lease_and_keeps_the_skipped_tasks() -> None:
    lease = granted()
    assert lease.revoke("a b") and not lease.revoke()
    assert (lease.revoked, lease.halted, lease.skipped) == (True, "skipped", "a b")


def test_releases_are_retried_within_half_the_ttl() -> None:
    delays = release_retry_delays(10.0)
    assert delays[0] == 0.0 and sum(delays) <= 5.0 and delays == sorted(delays)
