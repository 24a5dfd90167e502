"""The sans-I/O engine without Redis: ``StreamRun``, ``Scheduler``, ``TaskRun``, ``prepare``
and ``Lease`` are fed exact reply shapes and task outcomes, and each test asserts the next
step (the script call with its keys and args, a task to run, a pause, or how the lease ended).
No Redis, no threads, no sleeps: time is a fake clock or a send time placed in the past."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from pyfiq.config import MAX_PREFETCH, Settings
from pyfiq.engine import scheduler as scheduler_module
from pyfiq.engine.keys import KeySchema
from pyfiq.engine.lease import Lease, lease_margin
from pyfiq.engine.outcomes import (
    Aborted,
    Acked,
    DeadLettered,
    Deferred,
    Fenced,
    Prepared,
    dead_letter_header,
    prepare,
    safe_text,
)
from pyfiq.engine.protocol import KEY_NAMES, PARK_AFTER_MS, Call, RateLimit, ScriptCalls
from pyfiq.engine.scheduler import Scheduler
from pyfiq.engine.stream import Await, Finished, Pause, RunTask, StreamRun
from pyfiq.engine.task_run import BLOCK_MIN_PAUSE, TaskRun
from pyfiq.functions import RetryPolicy
from pyfiq.task import Entry, TaskRecord

STREAM = "orders#c-1"
SETTINGS = Settings(
    prefix="core", shards=4, lease_ttl=10.0, ack_mode="inline", prefetch=2, batch_limit=4, max_deliveries=3
)
KEYS = KeySchema("core", 4)
OPS = ScriptCalls(KEYS, SETTINGS)
SK = KEYS.stream(STREAM)
TOKEN = "1700000000000000:00ff00ff00ff00ff"
FENCE = 1700000000000000


def task_id(n: int) -> str:
    return f"{n:032x}"


def entry(n: int, *, expires_ms: int = 0, name: str = "app.charge", payload: bytes | None = None) -> bytes:
    body = payload if payload is not None else TaskRecord(name, [n], {}, key="c-1").encode(SETTINGS.serializer)
    return f"{task_id(n)}|1000|{expires_ms}|".encode() + body


def stream_keys(script: str) -> list[str]:
    return [getattr(SK, name) for name in KEY_NAMES[script]]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def granted(*tasks: tuple[bytes, int], redis_ms: int = 5_000, sent_at: float | None = None) -> Lease:
    """A lease as ``parse_acquire`` makes it from a successful acquire reply."""
    reply: list[Any] = [1, TOKEN.encode(), FENCE, redis_ms]
    for raw, deliveries in tasks:
        reply += [raw, deliveries]
    lease = OPS.parse_acquire(STREAM, reply, threading.Event(), time.monotonic() if sent_at is None else sent_at)
    assert lease is not None
    return lease


def run_of(
    lease: Lease,
    *,
    settings: Settings = SETTINGS,
    stopping: Callable[[], bool] = lambda: False,
    abandoned: Callable[[], bool] = lambda: False,
    rate_limit: RateLimit | None = None,
    clock: Clock | None = None,
) -> StreamRun:
    return StreamRun(
        ScriptCalls(KEYS, settings),
        lease,
        stopping=stopping,
        abandoned=abandoned,
        rate_limit=rate_limit,
        clock=clock or Clock(),
    )


def take_call(acks: list[str], want: int, settings: Settings = SETTINGS, ahead: bool = False) -> Call:
    argv = [TOKEN, STREAM, len(acks), want, settings.max_deliveries, 1 if ahead else 0, *acks]
    return Call("take", stream_keys("take"), argv)


def release_call(acks: list[str], started: list[str], delay_ms: int = 0) -> Call:
    args = [TOKEN, STREAM, len(acks), len(started), KEYS.wake_channel, SK.shard, delay_ms, *acks, *started]
    return Call("release", stream_keys("release"), args)


def run_task(n: int, deliveries: int = 1) -> RunTask:
    return RunTask(Entry.parse(entry(n)), deliveries)


# -- StreamRun: the hot path and the take replies ----------------------------------------------


def test_the_first_batch_runs_and_its_acks_ride_on_the_next_take() -> None:
    run = run_of(granted((entry(1), 1), (entry(2), 2)))
    assert run.start() == run_task(1, 1)
    assert run.feed(Acked()) == run_task(2, 2)
    # Two of the batch_limit of four are done: the take asks for at most two more.
    assert run.feed(Acked()) == take_call([task_id(1), task_id(2)], 2)


def test_take_reply_with_tasks_runs_them_and_sets_the_redis_clock_from_the_send_time() -> None:
    clock = Clock(50.0)
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


# -- prepare -----------------------------------------------------------------------------------


def lookup_of(*names: str) -> Callable[[str], Any]:
    funcs = {n: SimpleNamespace(name=n) for n in names}
    return funcs.get


def header_of(result: Any) -> dict[str, Any]:
    assert isinstance(result, DeadLettered)
    parsed: dict[str, Any] = json.loads(result.header)
    return parsed


def test_prepare_dead_letters_a_malformed_entry() -> None:
    result = prepare(Entry.load(b"not an entry"), 2, granted(), lookup_of("app.charge"), SETTINGS, "r")
    h = header_of(result)
    assert h["reason"] == "undecodable" and h["deliveries"] == 2 and "malformed task entry" in h["error"]


def test_prepare_dead_letters_an_undecodable_payload() -> None:
    raw = entry(1, payload=b"\xff not json")
    h = header_of(prepare(Entry.parse(raw), 1, granted(), lookup_of("app.charge"), SETTINGS, "r"))
    assert h["reason"] == "undecodable" and "cannot decode" in h["error"]


def test_prepare_dead_letters_a_task_expired_by_redis_clock_estimate() -> None:
    # Redis said 5,000 ms two seconds ago: its clock is now about 7,000 ms.
    lease = granted(redis_ms=5_000, sent_at=time.monotonic() - 2.0)
    expired = prepare(Entry.parse(entry(1, expires_ms=6_500)), 1, lease, lookup_of("app.charge"), SETTINGS, "r")
    h = header_of(expired)
    assert h["reason"] == "expired" and h["name"] == "app.charge" and "6500" in h["error"]
    later = prepare(Entry.parse(entry(1, expires_ms=60_000)), 1, lease, lookup_of("app.charge"), SETTINGS, "r")
    assert isinstance(later, Prepared)


def test_prepare_gives_the_task_its_context() -> None:
    lease = granted()
    prepared = prepare(Entry.parse(entry(7, expires_ms=99_000)), 3, lease, lookup_of("app.charge"), SETTINGS, "rep")
    assert isinstance(prepared, Prepared)
    ctx = prepared.context
    assert (ctx.id, ctx.name, ctx.queue, ctx.stream, ctx.key) == (task_id(7), "app.charge", "orders", STREAM, "c-1")
    assert (ctx.attempt, ctx.deliveries, ctx.fencing_token, ctx.replica) == (1, 3, FENCE, "rep")
    assert (ctx.enqueued_ms, ctx.expires_ms) == (1000, 99_000)
    assert prepared.record.args == [7]


def test_prepare_defers_an_unknown_task_within_its_grace_then_dead_letters_it() -> None:
    e = Entry.parse(entry(1, name="not.here"))
    within = prepare(e, 1, granted(), lookup_of(), SETTINGS, "r", unknown_for=lambda t: 29.9)
    assert within == Deferred(task_id(1))
    h = header_of(prepare(e, 1, granted(), lookup_of(), SETTINGS, "r", unknown_for=lambda t: 30.0))
    assert h["reason"] == "unknown-task" and h["name"] == "not.here"


class Directory:
    """The scheduler's view of the application's tasks."""

    def __init__(self, *names: str, limits: dict[str, RateLimit] | None = None) -> None:
        self.names = set(names)
        self.limits = limits or {}

    def registered_queues(self) -> list[str]:
        return ["orders"]

    def lookup(self, name: str) -> Any:
        return SimpleNamespace(name=name) if name in self.names else None

    def rate_limit_of(self, queue: str) -> RateLimit | None:
        return self.limits.get(queue)


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The scheduler's monotonic clock, and nothing else's."""
    clock = Clock(100.0)
    monkeypatch.setattr(scheduler_module, "time", SimpleNamespace(monotonic=clock))
    return clock


def test_grace_memory_is_forgotten_once_the_task_is_dead_lettered(fake_time: Clock) -> None:
    directory = Directory()
    scheduler = Scheduler(OPS, 1, None, directory)
    step = run_task(1)
    assert isinstance(scheduler.prepare(granted(), step, "r"), Deferred)
    fake_time.now += SETTINGS.unknown_task_grace
    assert header_of(scheduler.prepare(granted(), step, "r"))["reason"] == "unknown-task"
    # Requeued and met again: a fresh grace, not an instant dead letter.
    fake_time.now += 5
    assert isinstance(scheduler.prepare(granted(), step, "r"), Deferred)


def test_grace_memory_is_forgotten_once_the_task_runs(fake_time: Clock) -> None:
    directory = Directory()
    scheduler = Scheduler(OPS, 1, None, directory)
    step = run_task(1)
    assert isinstance(scheduler.prepare(granted(), step, "r"), Deferred)
    fake_time.now += 10
    directory.names.add("app.charge")
    assert isinstance(scheduler.prepare(granted(), step, "r"), Prepared)
    directory.names.clear()  # a rollback removed it again, long after the first meeting
    fake_time.now += SETTINGS.unknown_task_grace * 2
    assert isinstance(scheduler.prepare(granted(), step, "r"), Deferred)


# -- Scheduler: claims and heartbeats -----------------------------------------------------------


def idle_scheduler(now: float) -> Scheduler:
    """A scheduler that has just looked at every shard and found nothing due."""
    scheduler = Scheduler(OPS, 2, ["orders"], Directory("app.charge"))
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
    sent = time.monotonic() - 3.0  # the reply took three seconds to arrive
    lease = scheduler.on_acquired(SK.shard, STREAM, [1, TOKEN, FENCE, 4_242, entry(1), 2], threading.Event(), sent)
    assert lease is not None and scheduler.held_leases() == [lease] and scheduler.free() == 1
    assert (lease.token, lease.fence, lease.redis_ms) == (TOKEN, FENCE, 4_242)
    assert [(e.id, d) for e, d in lease.initial] == [(task_id(1), 2)]
    assert lease.valid_until == pytest.approx(sent + SETTINGS.lease_ttl - lease_margin(SETTINGS.lease_ttl))
    assert scheduler.candidates([SK.shard], [[-1, 0, STREAM, 1.0]], 100.0) == [], "a held stream is no candidate"


def test_first_take_is_zero_for_a_rate_limited_queue() -> None:
    plain = Scheduler(OPS, 1, None, Directory())
    limited = Scheduler(OPS, 1, None, Directory(limits={"orders": RateLimit(2)}))
    assert plain.first_take(STREAM) == SETTINGS.effective_prefetch
    assert limited.first_take(STREAM) == 0


def holding(valid_for: float) -> tuple[Scheduler, Lease]:
    scheduler = Scheduler(OPS, 1, None, Directory())
    sent = time.monotonic() + valid_for - SETTINGS.lease_ttl + lease_margin(SETTINGS.lease_ttl)
    reply = [1, TOKEN, FENCE, 1]
    lease = scheduler.on_acquired(SK.shard, STREAM, reply, threading.Event(), sent)
    assert lease is not None
    return scheduler, lease


def test_renewed_extends_validity_from_the_round_send_time() -> None:
    scheduler, lease = holding(valid_for=1.0)
    before = lease.valid_until
    leases, calls = scheduler.renew_calls()
    assert calls == [Call("renew", stream_keys("renew"), [TOKEN, SETTINGS.lease_ttl_ms, STREAM, ""])]
    sent = time.monotonic()
    assert scheduler.on_renewed(leases, [1], sent) == []
    assert lease.valid_until == pytest.approx(sent + SETTINGS.lease_ttl - lease_margin(SETTINGS.lease_ttl))
    assert lease.valid_until > before and not lease.lost


def test_renewal_refused_loses_the_lease_unless_it_was_ending() -> None:
    scheduler, lease = holding(valid_for=5.0)
    lease.ending = True  # a release is in flight: its refusal means "released"
    assert scheduler.on_renewed([lease], [0], time.monotonic()) == [] and not lease.lost
    lease.ending = False
    assert scheduler.on_renewed([lease], [0], time.monotonic()) == [lease]
    assert lease.lost and lease.abort.is_set() and "renewal refused" in lease.lost_reason
    assert scheduler.renew_calls() == ([], []), "a lost lease is not renewed again"


def test_renewal_error_loses_the_lease_only_once_it_may_have_lapsed() -> None:
    scheduler, lease = holding(valid_for=5.0)
    assert scheduler.on_renewed([lease], [ConnectionError("reset")], time.monotonic()) == []
    assert not lease.lost
    scheduler, lease = holding(valid_for=-0.01)
    assert scheduler.on_renewed([lease], [ConnectionError("reset")], time.monotonic()) == [lease]
    assert lease.lost and "ConnectionError: reset" in lease.lost_reason


# -- Lease and TaskRun ---------------------------------------------------------------------------


def test_lease_confirm_counts_from_the_send_time_and_never_goes_back() -> None:
    lease = Lease(STREAM, SK, TOKEN, FENCE, threading.Event(), ttl=10.0)
    lease.confirm(100.0)
    assert lease.valid_until == 100.0 + 10.0 - 1.0
    lease.confirm(95.0)  # a slow reply to an older renewal
    assert lease.valid_until == 109.0
    assert lease_margin(2.0) == pytest.approx(0.2) and lease_margin(60.0) == 1.0


def policy_fn(
    *, max_retries: int = 2, retry_wait: float = 0.5, on_exhausted: str = "dead-letter", calls: list[Any] | None = None
) -> SimpleNamespace:
    record = calls if calls is not None else []
    return SimpleNamespace(
        policy=RetryPolicy.build(None, max_retries, retry_wait),
        on_error=lambda exc, ctx, fn: record.append(("error", type(exc).__name__)),
        on_success=lambda result, ctx, fn: record.append(("success", result)),
        on_exhausted=on_exhausted,
    )


def task_run(lease: Lease, **kw: Any) -> TaskRun:
    prepared = prepare(Entry.parse(entry(1)), 1, lease, lookup_of("app.charge"), SETTINGS, "r")
    assert isinstance(prepared, Prepared)
    return TaskRun(Prepared(policy_fn(**kw), prepared.record, prepared.context), lease)


def test_begin_refuses_once_the_lease_may_have_lapsed_even_if_the_reply_just_came() -> None:
    # The acquire reply arrived only now, but its request left longer than a TTL ago.
    lease = granted(sent_at=time.monotonic() - SETTINGS.lease_ttl - 0.5)
    run = task_run(lease)
    assert run.begin() is None and run.attempts == 0
    assert lease.lost and "counted from when it was sent" in lease.lost_reason
    assert lease.abort.is_set()


def test_begin_refuses_once_aborted() -> None:
    lease = granted()
    lease.abort.set()
    assert task_run(lease).begin() is None


def test_success_acks_and_calls_the_hook() -> None:
    calls: list[Any] = []
    run = task_run(granted(), calls=calls)
    ctx = run.begin()
    assert ctx is not None and ctx.attempt == 1
    assert run.succeeded("ok") == Acked() and calls == [("success", "ok")]


def test_success_after_the_lease_was_lost_is_fenced_as_having_run() -> None:
    lease = granted()
    run = task_run(lease)
    run.begin()
    lease.mark_lost("renewal refused")
    assert run.succeeded(None) == Fenced(ran=True)


def test_failures_retry_in_place_then_dead_letter_as_exhausted() -> None:
    calls: list[Any] = []
    run = task_run(granted(), max_retries=1, retry_wait=0.5, calls=calls)
    run.begin()
    assert run.after_failure(ValueError("boom")) == 0.5
    ctx = run.begin()
    assert ctx is not None and ctx.attempt == 2
    h = header_of(run.after_failure(ValueError("boom again")))
    assert (h["reason"], h["attempts"], h["deliveries"]) == ("exhausted", 2, 1)
    assert h["error_type"] == "builtins.ValueError" and h["error"] == "boom again"
    assert calls == [("error", "ValueError"), ("error", "ValueError")]


def test_system_exit_from_a_task_is_a_failed_attempt() -> None:
    run = task_run(granted(), max_retries=0)
    run.begin()
    h = header_of(run.after_failure(SystemExit(3)))
    assert h["reason"] == "exhausted" and "SystemExit" in h["error"]


def test_blocking_policy_pauses_instead_of_dead_lettering() -> None:
    run = task_run(granted(), max_retries=0, retry_wait=0, on_exhausted="block")
    run.begin()
    assert run.after_failure(ValueError("down")) == BLOCK_MIN_PAUSE


def test_stop_during_retries_aborts_and_a_lost_lease_fences() -> None:
    lease = granted()
    run = task_run(lease, max_retries=5)
    run.begin()
    lease.abort.set()  # the worker stops
    assert run.after_failure(ValueError("x")) == Aborted()
    lost = granted()
    run = task_run(lost, max_retries=5)
    run.begin()
    lost.mark_lost("renewal refused")
    assert run.after_failure(ValueError("x")) == Fenced(ran=True)


# -- hostile exceptions ------------------------------------------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class ReallyUnprintable(Exception):
    def __str__(self) -> str:
        raise KeyboardInterrupt


def test_safe_text_survives_a_str_that_raises() -> None:
    assert safe_text(Unprintable()) == "<Unprintable object: str() raised RuntimeError>"
    assert safe_text(ReallyUnprintable()) == "<ReallyUnprintable object: str() raised KeyboardInterrupt>"
    assert safe_text(ValueError("fine")) == "fine"


@pytest.mark.parametrize(
    ("exc", "raised"), [(Unprintable(), "RuntimeError"), (ReallyUnprintable(), "KeyboardInterrupt")]
)
def test_dead_letter_header_survives_a_str_that_raises(exc: Exception, raised: str) -> None:
    text = dead_letter_header("exhausted", replica="r", deliveries=2, attempts=4, name="t", error=exc)
    assert "\n" not in text, "the stored record is '<header>\\n<entry>'"
    h = json.loads(text)
    assert (h["reason"], h["deliveries"], h["attempts"], h["name"]) == ("exhausted", 2, 4, "t")
    assert h["error"] == f"<{type(exc).__qualname__} object: str() raised {raised}>"
    assert h["error_type"] == f"{__name__}.{type(exc).__qualname__}"
    assert isinstance(h["traceback"], str)


def test_task_run_dead_letters_an_exception_whose_str_raises() -> None:
    run = task_run(granted(), max_retries=0)
    run.begin()
    h = header_of(run.after_failure(Unprintable()))
    assert h["reason"] == "exhausted" and "str() raised RuntimeError" in h["error"]
