"""``TaskRun`` without Redis or a worker: a task's attempts under its retry policy, what each
ends in, and the events kept for the driver (hooks to call, callbacks to run, what to log), in
the order the driver reports them. Time is a ``FakeClock``."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from pyfiq.engine.events import (
    AttemptEnded,
    AttemptFailed,
    AttemptStarted,
    CallbackDue,
    Event,
    RetryScheduled,
    TaskFenced,
)
from pyfiq.engine.lease import Lease
from pyfiq.engine.outcomes import Aborted, Acked, Fenced, Prepared, prepare
from pyfiq.engine.task_run import BLOCK_MIN_PAUSE, TaskRun
from pyfiq.functions import RetryPolicy
from pyfiq.task import Entry
from tests.engine.helpers import SETTINGS, START, WALL_MS, FakeClock, entry, granted, header_of, kinds, lookup_of
from tests.engine.test_outcomes import Unprintable


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


def task_run(lease: Lease, clock: FakeClock | None = None, **kw: Any) -> TaskRun:
    clock = clock or FakeClock()
    prepared = prepare(Entry.parse(entry(1)), 1, lease, lookup_of("app.charge"), SETTINGS, "r", clock=clock)
    assert isinstance(prepared, Prepared)
    return TaskRun(Prepared(policy_fn(**kw), prepared.record, prepared.context), lease, clock)


def reported(run: TaskRun) -> list[Event]:
    """Take the run's events as a driver does, running the callbacks they ask for."""
    events = run.events.take()
    for event in events:
        if isinstance(event, CallbackDue):
            event.callback(*event.args)
    return events


def test_begin_refuses_once_the_lease_may_have_lapsed_even_if_the_reply_just_came() -> None:
    # The acquire reply arrived only now, but its request left longer than a TTL ago.
    lease = granted(sent_at=START - SETTINGS.lease_ttl - 0.5)
    run = task_run(lease)
    assert run.begin() is None and run.attempts == 0
    assert lease.lost and "counted from when it was sent" in lease.lost_reason
    assert lease.abort.is_set()
    assert run.events.take() == [], "no attempt, nothing to report"


def test_begin_refuses_once_aborted() -> None:
    lease = granted()
    lease.abort.set()
    assert task_run(lease).begin() is None


def test_begin_refuses_a_first_attempt_once_halted_and_checks_under_the_gate() -> None:
    lease = granted()
    gate = threading.Lock()
    lease.gate = gate
    run = task_run(lease)
    lease.halt("paused")
    assert run.begin() is None and run.attempts == 0
    assert run.interrupted() == Aborted(ran=False)
    assert not gate.locked()


def test_success_acks_and_calls_the_hook() -> None:
    calls: list[Any] = []
    clock = FakeClock()
    run = task_run(granted(), clock, calls=calls)
    ctx = run.begin()
    assert ctx is not None and ctx.attempt == 1
    assert reported(run) == [AttemptStarted(ctx)]
    clock.now += 0.25
    assert run.succeeded("ok") == Acked()
    assert calls == [], "the driver runs the callback, from the event"
    events = reported(run)
    assert kinds(events) == ["AttemptEnded", "CallbackDue"] and calls == [("success", "ok")]
    assert events[0] == AttemptEnded(ctx, "succeeded", 0.25)


def test_success_after_the_lease_was_lost_is_fenced_as_having_run() -> None:
    lease = granted()
    run = task_run(lease)
    run.begin()
    lease.mark_lost("renewal refused")
    assert run.succeeded(None) == Fenced(ran=True)
    events = run.events.take()
    assert kinds(events) == ["AttemptStarted", "AttemptEnded", "TaskFenced"]
    assert isinstance(events[1], AttemptEnded) and events[1].outcome == "fenced"
    assert isinstance(events[2], TaskFenced) and not events[2].skipped and events[2].reason == "renewal refused"


def test_success_after_the_lease_lapsed_by_the_clock_is_fenced() -> None:
    clock = FakeClock()
    run = task_run(granted(), clock)
    run.begin()
    clock.now += SETTINGS.lease_ttl  # no renewal confirmed meanwhile
    assert run.succeeded(None) == Fenced(ran=True)


def test_failures_retry_in_place_then_dead_letter_as_exhausted() -> None:
    calls: list[Any] = []
    run = task_run(granted(), max_retries=1, retry_wait=0.5, calls=calls)
    run.begin()
    assert run.after_failure(ValueError("boom")) == 0.5
    events = reported(run)
    assert kinds(events) == ["AttemptStarted", "AttemptFailed", "AttemptEnded", "CallbackDue", "RetryScheduled"]
    retry = events[-1]
    assert isinstance(retry, RetryScheduled) and (retry.wait, retry.attempts, retry.blocking) == (0.5, 1, False)
    ctx = run.begin()
    assert ctx is not None and ctx.attempt == 2
    h = header_of(run.after_failure(ValueError("boom again")))
    assert (h["reason"], h["attempts"], h["deliveries"], h["at_ms"]) == ("exhausted", 2, 1, WALL_MS)
    assert h["error_type"] == "builtins.ValueError" and h["error"] == "boom again"
    assert kinds(reported(run)) == ["AttemptStarted", "AttemptFailed", "AttemptEnded", "CallbackDue", "TaskExhausted"]
    assert calls == [("error", "ValueError"), ("error", "ValueError")]


def test_system_exit_from_a_task_is_a_failed_attempt() -> None:
    run = task_run(granted(), max_retries=0)
    run.begin()
    h = header_of(run.after_failure(SystemExit(3)))
    assert h["reason"] == "exhausted" and "SystemExit" in h["error"]
    failed = [e for e in run.events.take() if isinstance(e, AttemptFailed)]
    assert [type(e.error) for e in failed] == [SystemExit], "hooks see what the task raised"


def test_blocking_policy_pauses_instead_of_dead_lettering() -> None:
    run = task_run(granted(), max_retries=0, retry_wait=0, on_exhausted="block")
    run.begin()
    assert run.after_failure(ValueError("down")) == BLOCK_MIN_PAUSE
    retry = run.events.take()[-1]
    assert isinstance(retry, RetryScheduled) and retry.blocking and retry.wait == BLOCK_MIN_PAUSE


def test_stop_during_retries_aborts_and_a_lost_lease_fences() -> None:
    lease = granted()
    run = task_run(lease, max_retries=5)
    run.begin()
    lease.abort.set()  # the worker stops
    assert run.after_failure(ValueError("x")) == Aborted()
    assert kinds(run.events.take())[-1] == "TaskInterrupted"
    lost = granted()
    run = task_run(lost, max_retries=5)
    run.begin()
    lost.mark_lost("renewal refused")
    assert run.after_failure(ValueError("x")) == Fenced(ran=True)


def test_a_task_skipped_by_an_operator_while_it_ran_is_fenced_as_not_run() -> None:
    lease = granted()
    run = task_run(lease)
    ctx = run.begin()
    assert ctx is not None
    lease.revoke(ctx.id)
    lease.mark_lost("let go after an operator's skip")
    assert run.succeeded(None) == Fenced(ran=False)
    fenced = run.events.take()[-1]
    assert isinstance(fenced, TaskFenced) and fenced.skipped


def test_the_running_long_warning_is_kept_once_per_attempt_with_the_elapsed_time() -> None:
    clock = FakeClock()
    run = task_run(granted(), clock)
    run.begin()
    run.events.take()
    clock.now += 1.5
    run.running_long()
    run.running_long()
    run.limit_reached()
    assert kinds(run.events.take()) == ["RunningLong", "LimitReached"]


def test_a_cancelled_attempt_is_reported_as_such() -> None:
    clock = FakeClock()
    run = task_run(granted(), clock)
    ctx = run.begin()
    assert ctx is not None
    clock.now += 2.0
    run.cancelled()
    assert run.events.take()[-1] == AttemptEnded(ctx, "cancelled", 2.0)


def test_task_run_dead_letters_an_exception_whose_str_raises() -> None:
    run = task_run(granted(), max_retries=0)
    run.begin()
    h = header_of(run.after_failure(Unprintable()))
    assert h["reason"] == "exhausted" and "str() raised RuntimeError" in h["error"]
