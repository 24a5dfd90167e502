"""Outcomes without Redis: ``prepare`` (decoding a taken task, finding its function, or the
dead letter it gets instead) and dead-letter headers built from hostile exceptions."""

from __future__ import annotations

import json

import pytest

from pyfiq.engine.outcomes import DeadLettered, Deferred, Prepared, dead_letter_header, prepare, safe_text
from pyfiq.task import Entry
from tests.engine.helpers import (
    FENCE,
    SETTINGS,
    START,
    STREAM,
    WALL_MS,
    FakeClock,
    entry,
    granted,
    header_of,
    lookup_of,
    task_id,
)

CLOCK = FakeClock()

# -- prepare -----------------------------------------------------------------------------------


def test_prepare_dead_letters_a_malformed_entry() -> None:
    result = prepare(Entry.load(b"not an entry"), 2, granted(), lookup_of("app.charge"), SETTINGS, "r", clock=CLOCK)
    h = header_of(result)
    assert h["reason"] == "undecodable" and h["deliveries"] == 2 and "malformed task entry" in h["error"]
    assert h["at_ms"] == WALL_MS, "stamped by the clock the driver gave"


def test_prepare_dead_letters_an_undecodable_payload() -> None:
    raw = entry(1, payload=b"\xff not json")
    h = header_of(prepare(Entry.parse(raw), 1, granted(), lookup_of("app.charge"), SETTINGS, "r", clock=CLOCK))
    assert h["reason"] == "undecodable" and "cannot decode" in h["error"]


def test_prepare_dead_letters_a_task_expired_by_redis_clock_estimate() -> None:
    # Redis said 5,000 ms two seconds ago: its clock is now about 7,000 ms.
    lease = granted(redis_ms=5_000, sent_at=START - 2.0)
    expired = prepare(
        Entry.parse(entry(1, expires_ms=6_500)), 1, lease, lookup_of("app.charge"), SETTINGS, "r", clock=CLOCK
    )
    h = header_of(expired)
    assert h["reason"] == "expired" and h["name"] == "app.charge" and "6500" in h["error"]
    later = prepare(
        Entry.parse(entry(1, expires_ms=60_000)), 1, lease, lookup_of("app.charge"), SETTINGS, "r", clock=CLOCK
    )
    assert isinstance(later, Prepared)


def test_prepare_gives_the_task_its_context() -> None:
    lease = granted()
    prepared = prepare(
        Entry.parse(entry(7, expires_ms=99_000)), 3, lease, lookup_of("app.charge"), SETTINGS, "rep", clock=CLOCK
    )
    assert isinstance(prepared, Prepared)
    ctx = prepared.context
    assert (ctx.id, ctx.name, ctx.queue, ctx.stream, ctx.key) == (task_id(7), "app.charge", "orders", STREAM, "c-1")
    assert (ctx.attempt, ctx.deliveries, ctx.fencing_token, ctx.replica) == (1, 3, FENCE, "rep")
    assert (ctx.enqueued_ms, ctx.expires_ms) == (1000, 99_000)
    assert prepared.record.args == [7]


def test_prepare_defers_an_unknown_task_within_its_grace_then_dead_letters_it() -> None:
    e = Entry.parse(entry(1, name="not.here"))
    within = prepare(e, 1, granted(), lookup_of(), SETTINGS, "r", clock=CLOCK, unknown_for=lambda t: 29.9)
    assert within == Deferred(task_id(1), "not.here")
    h = header_of(prepare(e, 1, granted(), lookup_of(), SETTINGS, "r", clock=CLOCK, unknown_for=lambda t: 30.0))
    assert h["reason"] == "unknown-task" and h["name"] == "not.here"


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
    assert "at_ms" not in h, "no clock read here: the caller stamps the time"


def test_a_dead_letter_header_keeps_the_time_it_is_given_in_its_place() -> None:
    text = dead_letter_header("operator", replica="op", deliveries=0, at_ms=1_234)
    assert list(json.loads(text)) == ["reason", "deliveries", "attempts", "at_ms", "replica"]
    assert DeadLettered(text).reason == "operator"
    assert DeadLettered('{"reason":"something-else"}').reason == "unknown"
    assert DeadLettered("not json").reason == "unknown"
