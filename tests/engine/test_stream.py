"""``StreamRun`` without Redis: fed exact reply shapes and task outcomes, each test asserts
the next step (the script call with its keys and args, a task to run, a pause, or how the lease
ended) and the events kept for the driver. No threads, no sleeps: time is a ``FakeClock``."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pyfiq.config import MAX_PREFETCH
from pyfiq.engine.events import DeadLetterConfirmed
from pyfiq.engine.outcomes import Aborted, Acked, DeadLettered, Deferred, Fenced, dead_letter_header
from pyfiq.engine.protocol import PARK_AFTER_MS, Call, RateLimit
from pyfiq.engine.stream import Await, Finished, Pause, RunTask, StreamRun
from pyfiq.task import Entry
from tests.engine.helpers import (
    KEYS,
    SETTINGS,
    STREAM,
    TOKEN,
    FakeClock,
    entry,
    granted,
    release_call,
    run_of,
    run_task,
    stream_keys,
    take_call,
    task_id,
)

# -- StreamRun: the hot path and the take replies ----------------------------------------------


def test_the_first_batch_runs_and_its_acks_ride_on_the_next_take() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 2)))
    assert run.start() == run_task(1, 1)
    assert run.feed(Acked()) == run_task(2, 2)
    # Two of the batch_limit of four are done: the take asks for at most two more.
    assert run.feed(Acked()) == take_call([task_id(1), task_id(2)], 2)


def test_take_reply_with_tasks_runs_them_and_sets_the_redis_clock_from_the_send_time() -> None:
    clock = FakeClock(50.0)
    lease = granted()
    run = run_of(lease, clock=clock)
    assert run.start() == take_call([], 2)
    assert lease.ending, "a take may release an empty stream: a refused renewal meanwhile is no loss"
    clock.now = 51.5  # the reply arrives later; Redis ran the call at some point in between
    assert run.feed([1, 7_777, entry(3), 1, entry(4), 3]) == run_task(3, 1)
    assert (lease.redis_ms, lease.redis_at) == (7_777, 50.0)
    assert not lease.ending
    assert run.feed(Acked()) == run_task(4, 3)


def test_take_reply_fenced_ends_the_run_and_marks_the_lease_lost() -> None:
    lease = granted()
    run = run_of(lease)
    run.start()
    assert run.feed([-1]) == Finished("fenced")
    assert lease.lost and lease.abort.is_set() and "take refused" in lease.lost_reason


def test_take_reply_empty_means_the_stream_was_drained_and_forgotten() -> None:
    run = run_of(granted((entry(1), 1)))
    run.start()
    assert run.feed(Acked()) == take_call([task_id(1)], 2)
    assert run.feed([0]) == Finished("empty")
    assert run.acks == [], "the take applied the acknowledgements"


def test_take_reply_with_no_tasks_hands_the_stream_back() -> None:
    run = run_of(granted((entry(1), 1)))
    run.start()
    run.feed(Acked())
    # Acknowledged, lease still held, nothing handed: give it back without resending acks.
    assert run.feed([1, 9_000]) == release_call([], [])
    assert run.feed(1) == Finished("released")


def test_take_never_asks_for_zero_tasks_up_to_the_batch_limit() -> None:
    settings = SETTINGS.replace(prefetch=3, batch_limit=4)
    run = run_of(granted(), settings=settings)
    wants = []
    step = run.start()
    n = 0
    while isinstance(step, Call) and step.script == "take":
        wants.append(step.args[3])
        n += 1
        step = run.feed([1, 1, entry(n), 1])
        while isinstance(step, RunTask):
            step = run.feed(Acked())
    # One task per take here: the ask shrinks to what is left of the batch, never to zero.
    assert wants == [3, 3, 2, 1]
    assert step == release_call([task_id(4)], []) and run.yielded


def test_take_reply_acked_only_keeps_the_lease_and_asks_again() -> None:
    run = run_of(granted((entry(1), 1)))
    run.start()
    run.feed(Acked())
    assert run.feed([2]) == take_call([], 2)


# -- StreamRun: group commit (ack_mode="group") -------------------------------------------------

GROUP = SETTINGS.replace(ack_mode="group", prefetch=3, batch_limit=6)


def group_run(*tasks: tuple[bytes, int], **kw: Any) -> StreamRun:
    return run_of(granted(*tasks), settings=GROUP, **kw)


def ahead(acks: list[str], want: int) -> Call:
    return take_call(acks, want, GROUP, ahead=True)


def test_group_acks_go_in_the_background_while_the_next_task_runs() -> None:
    run = group_run((entry(1), 1), (entry(2), 1), (entry(3), 1))
    assert run.start() == run_task(1), "a full buffer and nothing to acknowledge: no call"
    assert run.feed(Acked()) == RunTask(Entry.parse(entry(2)), 1, ahead([task_id(1)], 1))
    run.collect([1, 9_000, entry(4), 1])
    assert [e.id for e, _ in run.buffer] == [task_id(2), task_id(3), task_id(4)]
    assert run.feed(Acked()) == RunTask(Entry.parse(entry(3)), 1, ahead([task_id(2)], 1))


def test_group_sends_what_finished_behind_the_call_in_flight_and_then_lets_acks_gather() -> None:
    run = group_run((entry(1), 1), (entry(2), 1), (entry(3), 1), (entry(4), 1))
    run.start()
    assert run.feed(Acked()).send == ahead([task_id(1)], 0)  # type: ignore[union-attr]
    # Its reply is not in yet: 2's acknowledgement queues behind it (a long task 3 must not hold
    # it back), and with two calls outstanding 3's waits for the next one.
    assert run.feed(Acked()).send == ahead([task_id(2)], 1)  # type: ignore[union-attr]
    assert run.feed(Acked()) == run_task(4)
    assert run.feed(Acked()) == Await(), "out of tasks: wait for the oldest reply"
    assert run.feed([2]) == Await(), "and the next"
    assert run.feed([1, 9_000]) == take_call([task_id(3), task_id(4)], 2, GROUP)


def test_group_a_drained_stream_sends_no_background_call_without_acks() -> None:
    run = group_run((entry(1), 1))  # fewer than asked: the stream had no more
    assert run.start() == run_task(1)
    assert run.feed(Acked()) == take_call([task_id(1)], 3, GROUP)
    assert run.feed([0]) == Finished("empty")


def test_group_a_dead_letter_waits_for_the_background_call() -> None:
    run = group_run((entry(1), 1), (entry(2), 1), (entry(3), 1))
    run.start()
    run.feed(Acked())  # sends ahead([1])
    header = dead_letter_header("exhausted", replica="r", deliveries=1)
    assert run.feed(DeadLettered(header)) == Await(), "one call at a time per lease"
    call = run.feed([1, 9_000])
    assert call == Call("dead_letter", stream_keys("dead_letter"), [TOKEN, STREAM, 0, task_id(2), header])


def test_group_a_stop_waits_for_the_background_call_then_releases_with_every_ack() -> None:
    stopping = threading.Event()
    run = group_run((entry(1), 1), (entry(2), 1), (entry(3), 1), stopping=stopping.is_set)
    run.start()
    run.feed(Acked())  # sends ahead([1])
    stopping.set()
    assert run.feed(Acked()) == Await()
    assert run.feed([1, 9_000, entry(4), 1]) == release_call([task_id(2)], [])
    assert run.feed(1) == Finished("released")


def test_group_a_fenced_background_reply_drops_the_result_of_the_task_beside_it() -> None:
    lease = granted((entry(1), 1), (entry(2), 1), (entry(3), 1))
    run = run_of(lease, settings=GROUP)
    run.start()
    run.feed(Acked())
    run.collect([-1])
    assert lease.lost and "take refused" in lease.lost_reason
    assert run.feed(Acked()) == Finished("fenced"), "task 2 is not acknowledged: the next holder runs it"


def test_group_a_paused_background_reply_hands_back_what_was_not_started() -> None:
    run = group_run((entry(1), 1), (entry(2), 1), (entry(3), 1))
    run.start()
    run.feed(Acked())
    run.collect([3])
    assert run.feed(Acked()) == release_call([task_id(2)], [])
    assert run.feed(1) == Finished("paused")


def test_group_a_lost_background_reply_fails_after_the_outcome_and_resends_every_ack() -> None:
    run = group_run((entry(1), 1), (entry(2), 1), (entry(3), 1))
    run.start()
    run.feed(Acked())  # sends ahead([1]); its reply is lost
    run.collect(ConnectionError("reset"))
    assert run.feed(Acked()) == Finished("failed"), "nothing more starts"
    assert isinstance(run.broken, ConnectionError)
    # Task 3 was never started; 1's acknowledgement may or may not have landed (tolerated).
    assert run.fail() == release_call([task_id(1), task_id(2)], [])


def test_group_takes_up_to_the_batch_limit_then_yields() -> None:
    settings = GROUP.replace(prefetch=2, batch_limit=4)
    run = run_of(granted((entry(1), 1), (entry(2), 1)), settings=settings)
    step, sent, n = run.start(), [], 2
    while isinstance(step, (RunTask, Await)):
        if isinstance(step, RunTask) and step.send is not None:
            sent.append(step.send.args[3])  # want
            n += 1
            run.collect([1, 9_000, entry(n), 1] if step.send.args[3] else [2])
        step = run.feed(Acked()) if isinstance(step, RunTask) else run.feed([2])
    assert sent == [1, 1, 0], "never more than the batch limit taken; the last ack rides on the release"
    assert step == release_call([task_id(4)], []) and run.yielded


def test_a_rate_limited_stream_acknowledges_inline_in_group_mode() -> None:
    run = run_of(granted(), settings=GROUP, rate_limit=RateLimit(per_second=5, burst=1))
    assert not run.group


# -- StreamRun: outcomes -----------------------------------------------------------------------


def test_dead_lettered_outcome_carries_the_acks_and_names_the_task() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 1)))
    run.start()
    run.feed(Acked())
    header = dead_letter_header("exhausted", replica="r", deliveries=1)
    call = run.feed(DeadLettered(header))
    assert call == Call("dead_letter", stream_keys("dead_letter"), [TOKEN, STREAM, 1, task_id(2), header, task_id(1)])
    assert run.feed(1) == take_call([], 2), "the dead letter applied the acks"


def test_dead_letter_of_a_malformed_entry_names_its_first_32_bytes() -> None:
    raw = b"x" * 40
    run = run_of(granted((raw, 1)))
    assert run.start() == RunTask(Entry.load(raw), 1)
    call = run.feed(DeadLettered('{"reason":"undecodable"}'))
    assert isinstance(call, Call) and call.args[3] == raw[:32]


def test_dead_letter_refused_means_fenced() -> None:
    lease = granted((entry(1), 1))
    run = run_of(lease)
    run.start()
    run.feed(DeadLettered("{}"))
    assert run.feed(-1) == Finished("fenced") and lease.lost


def test_aborted_outcome_releases_naming_the_head_as_started() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 1), (entry(3), 1)))
    run.start()
    run.feed(Acked())
    assert run.feed(Aborted()) == release_call([task_id(1)], [task_id(2)])
    assert run.feed(1) == Finished("released")


def test_deferred_outcome_hands_the_stream_over_with_nothing_started() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 1)))
    run.start()
    assert run.feed(Deferred(task_id(1))) == release_call([], [])
    assert run.deferred == task_id(1)


def test_fenced_after_running_reports_the_task_outlived_its_lease() -> None:
    raw = entry(1)
    run = run_of(granted((raw, 2)))
    run.start()
    call = run.feed(Fenced(ran=True))
    assert call == Call("lost", stream_keys("lost"), [raw, MAX_PREFETCH + 1])
    assert run.feed(1) == Finished("fenced")


def test_fenced_before_running_reports_nothing() -> None:
    run = run_of(granted((entry(1), 1)))
    run.start()
    assert run.feed(Fenced(ran=False)) == Finished("fenced")


def test_an_outcome_after_the_heartbeat_lost_the_lease_is_dropped() -> None:
    lease = granted((entry(1), 1), (entry(2), 1))
    run = run_of(lease)
    run.start()
    lease.mark_lost("renewal refused")
    assert run.feed(Acked()) == Finished("fenced")
    assert run.acks == [], "a success on a lost lease is never acknowledged"


def test_release_refused_means_fenced() -> None:
    lease = granted((entry(1), 1))
    run = run_of(lease, stopping=lambda: True)
    assert run.start() == release_call([], [])
    assert run.feed(-1) == Finished("fenced") and lease.lost


def test_stop_releases_with_the_acks_and_nothing_started() -> None:
    stop = False
    run = run_of(granted((entry(1), 1), (entry(2), 1)), stopping=lambda: stop)
    run.start()
    stop = True
    assert run.feed(Acked()) == release_call([task_id(1)], [])
    assert not run.yielded
    assert run.feed(1) == Finished("released")


def test_yield_after_batch_limit_even_with_work_waiting() -> None:
    settings = SETTINGS.replace(prefetch=2, batch_limit=2)
    run = run_of(granted((entry(1), 1), (entry(2), 1)), settings=settings)
    run.start()
    run.feed(Acked())
    assert run.feed(Acked()) == release_call([task_id(1), task_id(2)], [])
    assert run.yielded
    assert run.feed(1) == Finished("released")


@pytest.mark.parametrize("when", ["at a step", "on an outcome"])
def test_abandoned_ends_without_any_call(when: str) -> None:
    gone = when == "at a step"
    run = run_of(granted((entry(1), 1), (entry(2), 1)), abandoned=lambda: gone)
    if gone:
        assert run.start() == Finished("abandoned")
        return
    run.start()
    gone = True
    assert run.feed(Acked()) == Finished("abandoned")


def test_feeding_a_run_that_waits_for_nothing_is_a_bug() -> None:
    run = run_of(granted((entry(1), 1)))
    run.start()
    run.feed(Fenced())
    with pytest.raises(RuntimeError, match="fed while waiting"):
        run.feed(1)


# -- StreamRun: rate limits --------------------------------------------------------------------


def test_rate_limited_stream_asks_a_permit_before_each_take_and_each_start() -> None:
    limit = RateLimit(per_second=4, burst=2)
    run = run_of(granted(), rate_limit=limit)
    rate = Call("rate", [KEYS.rate("orders")], [250.0, 2])
    assert run.start() == rate
    # The permit comes before the take, so the task it hands starts at once (Redis marks it
    # started): one permit, one take of one task, one start.
    assert run.feed(0) == take_call([], 1)
    assert run.feed([1, 1, entry(1), 1]) == run_task(1)
    assert run.feed(Acked()) == rate
    assert run.feed(0) == take_call([task_id(1)], 1)


def test_a_short_rate_wait_pauses_and_asks_again() -> None:
    run = run_of(granted((entry(1), 1)), rate_limit=RateLimit(10))
    run.start()
    assert run.feed(PARK_AFTER_MS) == Pause(PARK_AFTER_MS / 1000)
    assert run.feed(None) == Call("rate", [KEYS.rate("orders")], [100.0, 1])
    assert run.feed(0) == run_task(1)


def test_a_long_rate_wait_parks_the_stream_with_a_delay() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 1)), rate_limit=RateLimit(1))
    run.start()
    run.feed(0)
    run.feed(Acked())
    assert run.feed(PARK_AFTER_MS + 1) == release_call([task_id(1)], [], delay_ms=PARK_AFTER_MS + 1)
    assert run.parked
    assert run.feed(1) == Finished("parked")


# -- StreamRun: fail() after an I/O error -------------------------------------------------------


def test_fail_while_waiting_for_a_take_names_nothing_started() -> None:
    lease = granted((entry(1), 1))
    run = run_of(lease)
    run.start()
    run.feed(Acked())  # take sent with the ack; its reply never came
    assert run.fail() == release_call([task_id(1)], [])
    assert lease.ending and not run.buffer
    assert run.feed(1) == Finished("released")


def test_fail_while_a_task_runs_names_it_started() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 1)))
    run.start()  # RunTask(1) handed to the driver, which then failed
    assert run.fail() == release_call([], [task_id(1)])


def test_fail_while_waiting_for_a_dead_letter_names_the_head_started() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 1)))
    run.start()
    run.feed(Acked())
    run.feed(DeadLettered("{}"))
    # Unknown whether the dead letter was applied: if not, the task did run here.
    assert run.fail() == release_call([task_id(1)], [task_id(2)])


def test_fail_while_waiting_for_a_permit_names_nothing_started() -> None:
    run = run_of(granted((entry(1), 1)), rate_limit=RateLimit(1))
    run.start()  # rate call before the head starts
    assert run.fail() == release_call([], [])


def test_fail_while_waiting_for_a_release_sends_it_again() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 1)))
    run.start()
    run.feed(Acked())
    first = run.feed(Aborted())
    assert first == release_call([task_id(1)], [task_id(2)])
    assert run.fail() == first


def test_fail_while_handing_over_a_deferred_task_resends_the_same_release() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 1)))
    run.start()
    first = run.feed(Deferred(task_id(1)))
    assert first == release_call([], [])
    assert run.fail() == first


def test_fail_while_reporting_an_outlived_lease_sends_nothing() -> None:
    lease = granted((entry(1), 1))
    run = run_of(lease)
    run.start()
    lease.mark_lost("renewal refused")  # what makes TaskRun return Fenced(ran=True)
    assert isinstance(run.feed(Fenced(ran=True)), Call)
    assert run.fail() is None


def test_fail_after_the_lease_was_lost_sends_nothing() -> None:
    lease = granted((entry(1), 1))
    run = run_of(lease)
    run.start()
    lease.mark_lost("renewal refused")
    assert run.fail() is None


# -- events kept for the driver -----------------------------------------------------------------


def test_a_dead_letter_is_kept_for_the_hooks_once_redis_confirms_it() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 1)))
    run.start()
    header = dead_letter_header("exhausted", replica="r", deliveries=1)
    run.feed(DeadLettered(header))
    assert run.events.take() == [], "not before Redis has confirmed it"
    run.feed(1)
    assert run.events.take() == [DeadLetterConfirmed(STREAM, "exhausted", None)]


def test_a_refused_dead_letter_is_not_reported() -> None:
    run = run_of(granted((entry(1), 1)))
    run.start()
    run.feed(DeadLettered(dead_letter_header("expired", replica="r", deliveries=1)))
    assert run.feed(-1) == Finished("fenced")
    assert run.events.take() == []


def test_send_times_come_from_the_clock_the_driver_gave() -> None:
    clock = FakeClock(7.0)
    lease = granted()
    run = run_of(lease, clock=clock)
    run.start()
    clock.now = 8.0
    run.feed([1, 4_000, entry(1), 1])
    assert lease.redis_at == 7.0
    assert lease.running is not None and lease.running[1] == 4_000 + 1_000, "Redis's clock, a second on"
