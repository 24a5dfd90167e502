"""The periodic schedules' core without I/O: which ticks a replica asks to fire from what it last
heard of Redis, under each catch-up rule, and what each reply of ``tick.lua`` does to it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from pyfiq.engine.ticks import (
    MAX_CATCH_UP,
    TICK_HEADER,
    Advance,
    Cron,
    Every,
    Schedule,
    Ticker,
    TickLoop,
    make_rule,
    on_reply,
    periodic_rule,
    plan,
)
from pyfiq.errors import ConfigurationError
from pyfiq.serializers import JSONSerializer
from pyfiq.task import TaskRecord

SECOND = 1000
BASE = 1_800_000_000_000  # a whole minute of Redis time, in ms
serializer = JSONSerializer()


def encode(record: TaskRecord) -> bytes:
    return record.encode(serializer)


def schedule(**kw: Any) -> Schedule:
    kw.setdefault("rule", Every(SECOND))
    return Schedule(name="s", task="t", queue="q", stream="q", **kw)


def heard(sched: Schedule, last: int | None, redis_ms: int, at: float = 100.0) -> Ticker:
    return Ticker(sched, last=last, heard=True, redis_ms=redis_ms, at=at)


class Logged:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, level: str, event: str, **fields: Any) -> None:
        self.lines.append((level, event, fields))


def test_every_ticks_on_multiples_of_its_interval_since_the_epoch() -> None:
    rule = Every(60 * SECOND)
    assert rule.latest(BASE + 59_999) == BASE
    assert rule.latest(BASE) == BASE
    assert rule.after(BASE) == BASE + 60_000
    assert rule.after(BASE - 1) == BASE
    assert rule.text == "every 1 min"


def test_a_cron_line_names_the_same_ticks_as_the_equivalent_interval() -> None:
    cron, every = Cron("*/5 * * * *"), Every(5 * 60 * SECOND)
    for at in (BASE, BASE + 1, BASE + 299_999, BASE + 300_000, BASE + 7 * 86_400_000 + 12_345):
        assert cron.latest(at) == every.latest(at)
        assert cron.after(at) == every.after(at)
    assert Cron("*/2 * * * * *").after(BASE) == BASE + 2 * SECOND  # six fields: seconds first


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "exactly one of every= and cron="),
        ({"every": 1, "cron": "* * * * *"}, "exactly one of every= and cron="),
        ({"every": 0.05}, "at least 100 ms"),
        ({"every": 1.0005}, "whole number of ms"),
        ({"every": float("nan")}, "seconds or a timedelta"),
        ({"every": True}, "seconds or a timedelta"),
        ({"cron": "61 * * * *"}, "invalid cron line"),
    ],
)
def test_a_rule_that_cannot_tick_is_refused_at_the_decorator(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make_rule(kw.get("every"), kw.get("cron"))


def test_the_other_periodic_options_are_checked_before_anything_is_bound() -> None:
    assert periodic_rule(dt.timedelta(minutes=5), None, "all", 3, "nightly.report").text == "every 5 min"
    with pytest.raises(ConfigurationError, match="catch_up"):
        periodic_rule(1, None, "burst", 0, None)
    with pytest.raises(ConfigurationError, match="version"):
        periodic_rule(1, None, "once", -1, None)
    with pytest.raises(ConfigurationError, match="schedule name"):
        periodic_rule(1, None, "once", 0, "bad name\n")


def test_a_replica_reads_the_record_first_and_a_new_schedule_owes_only_a_tick_within_its_grace() -> None:
    sched = schedule()
    fresh = Ticker(sched)
    first = plan(fresh, 0.0, encode)
    assert first is not None and first.expected == "?" and first.items == ()
    # No record: ticks up to now are owed nothing, except one within the grace (1 s here), which
    # a replica that knew the record (forgotten by an operator, lost with Redis's data) may be
    # about to fire: recording it as done would skip it.
    long_ago = plan(heard(sched, None, BASE + 2_999), 100.0, encode)
    assert long_ago is not None and (long_ago.expected, long_ago.new_last, long_ago.items) == ("", BASE + 1_000, ())
    sched_minutes = schedule(rule=Every(60 * SECOND))
    far = plan(heard(sched_minutes, None, BASE + 90_000), 100.0, encode)
    assert far is not None and far.new_last == BASE + 60_000
    near = plan(heard(sched_minutes, None, BASE + 61_000), 100.0, encode)
    assert near is not None and near.new_last == BASE, "the tick 1 s ago is still owed"


def test_a_tick_still_ahead_is_slept_for_by_redis_time_not_fired() -> None:
    ticker = heard(schedule(), BASE, BASE + 400, at=100.0)
    assert plan(ticker, 100.1, encode) is None  # Redis now ~ BASE + 500
    assert ticker.wake == pytest.approx(100.1 + 0.5, abs=0.002)


def test_the_due_tick_is_asked_for_from_the_last_one_heard_with_its_task() -> None:
    ticker = heard(schedule(args=(7,), kwargs={"x": 1}), BASE, BASE + 1_003, at=5.0)
    advance = plan(ticker, 5.0, encode)
    assert advance is not None
    assert (advance.expected, advance.new_last, advance.ticks) == (str(BASE), BASE + 1_000, (BASE + 1_000,))
    (item,) = advance.items
    record = TaskRecord.decode(item.payload, serializer)
    assert (record.name, record.args, record.kwargs) == ("t", [7], {"x": 1})
    assert record.headers == {TICK_HEADER: str(BASE + 1_000)}
    assert item.when == "0"


@pytest.mark.parametrize(
    ("catch_up", "ticks"),
    [
        ("once", [BASE + 9_000]),
        ("all", [BASE + i * 1_000 for i in range(1, 10)]),
    ],
)
def test_ticks_missed_while_no_replica_ran_are_caught_up_once_or_all(catch_up: str, ticks: list[int]) -> None:
    ticker = heard(schedule(catch_up=catch_up), BASE, BASE + 9_400)
    advance = plan(ticker, 100.0, encode)
    assert advance is not None
    assert list(advance.ticks) == ticks and len(advance.items) == len(ticks)
    assert advance.new_last == ticks[-1]


def test_catch_up_all_moves_at_most_a_bounded_number_of_ticks_per_call() -> None:
    ticker = heard(schedule(catch_up="all"), BASE, BASE + 1_000 * (MAX_CATCH_UP + 50))
    advance = plan(ticker, 100.0, encode)
    assert advance is not None and len(advance.ticks) == MAX_CATCH_UP
    assert advance.new_last == BASE + 1_000 * MAX_CATCH_UP


def test_catch_up_skip_fires_a_tick_on_time_and_skips_one_past_its_grace() -> None:
    sched = schedule(catch_up="skip", rule=Every(60 * SECOND))
    on_time = plan(heard(sched, BASE - 60_000, BASE + 2_000), 100.0, encode)
    assert on_time is not None and on_time.ticks == (BASE,)
    late = plan(heard(sched, BASE - 600_000, BASE + 45_000), 100.0, encode)  # grace: half the gap, 30 s
    assert late is not None and late.ticks == () and late.new_last == BASE


def test_replies_move_the_ticker_as_redis_says() -> None:
    sched, log = schedule(), Logged()
    ticker = heard(sched, BASE, BASE + 1_001)
    advance = plan(ticker, 100.0, encode)
    assert advance is not None
    on_reply(advance, [b"fired", BASE + 1_002, str(BASE + 1_000).encode(), 0], 100.01, log)
    assert ticker.last == BASE + 1_000 and ticker.fired == 1 and ticker.redis_ms == BASE + 1_002
    again = plan(ticker, 100.01, encode)
    assert again is None and ticker.wake == pytest.approx(100.01 + 0.998, abs=0.002)
    # Another replica fired the next one first: this one hears where Redis is and fires nothing.
    ticker = heard(sched, BASE, BASE + 1_001)
    advance = plan(ticker, 100.0, encode)
    assert advance is not None
    on_reply(advance, [b"moved", BASE + 1_004, str(BASE + 1_000).encode(), 0], 100.01, log)
    assert ticker.last == BASE + 1_000 and ticker.fired == 0
    # A reply that is an error backs off, and says so.
    advance = Advance(ticker, "?", 0, (), ())
    on_reply(advance, ConnectionError("down"), 200.0, log)
    assert ticker.wake > 200.0 and log.lines[-1][1] == "pyfiq.schedule_call_failed"


def test_a_superseded_replica_warns_once_and_stands_down_until_the_next_tick() -> None:
    sched, log = schedule(version=1), Logged()
    ticker = heard(sched, BASE, BASE + 1_001)
    for _ in range(3):
        advance = plan(ticker, 100.0, encode)
        assert advance is not None
        on_reply(advance, [b"superseded", BASE + 1_001, str(BASE + 1_000).encode(), 2], 100.0, log)
        ticker.last = BASE  # as if it had not heard: the warning still comes once
    warnings = [line for line in log.lines if line[1] == "pyfiq.schedule_superseded"]
    assert len(warnings) == 1 and warnings[0][2]["stored_version"] == 2
    assert ticker.superseded == 2


class Source:
    def __init__(self, *schedules: Schedule) -> None:
        self.schedules = list(schedules)

    def schedules_of(self, queues: Any) -> list[Schedule]:
        return [s for s in self.schedules if queues is None or s.queue in queues]


def test_the_loop_follows_the_registry_and_a_schedule_that_fails_to_encode_does_not_stop_the_others() -> None:
    good = schedule()
    bad = Schedule(name="bad", task="t", queue="q", stream="q", rule=Every(SECOND), args=(object(),))
    log = Logged()
    loop = TickLoop(Source(good, bad), ["q"], encode, log)
    assert len(loop.due(0.0)) == 2  # each reads its record first
    for name in ("s", "bad"):
        loop.tickers[name].heard, loop.tickers[name].last = True, BASE
        loop.tickers[name].redis_ms, loop.tickers[name].at = BASE + 1_001, 0.0
    advances = loop.due(0.0)
    assert [a.ticker.schedule.name for a in advances] == ["s"]
    assert [line[1] for line in log.lines] == ["pyfiq.schedule_failed"]
    assert loop.tickers["bad"].wake == 60.0
    other = TickLoop(Source(good), ["elsewhere"], encode, log)
    assert other.due(0.0) == [] and other.wait(0.0) == 1.0
