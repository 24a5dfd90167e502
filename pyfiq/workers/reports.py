"""What both drivers do with the engine's events: log them, hand them to hooks, run a task's own
callbacks; and the real clock they give the engine.

The engine decides and keeps events (``pyfiq.engine.events``); the driver that made a call
takes them right after it and passes them to ``report`` in the same thread or task, so hooks
and callbacks run where they always did: ``before_execution`` before the function starts (a
tracer's span is current in it), ``on_success`` before the task is acknowledged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..engine.events import (
    AttemptEnded,
    AttemptFailed,
    AttemptStarted,
    CallbackDue,
    ClaimFailed,
    DeadLetterConfirmed,
    Event,
    HeartbeatLate,
    LayoutMismatch,
    LeaseChange,
    LeaseLost,
    LeaseRevoked,
    LimitReached,
    Outbox,
    RetryScheduled,
    RunningLong,
    StreamHalted,
    TaskDeferred,
    TaskExhausted,
    TaskFenced,
    TaskInterrupted,
    TaskRefused,
)
from ..engine.keys import queue_of
from ..engine.lease import Lease
from ..engine.outcomes import describe_error
from ..hooks import dispatcher
from ..logs import debug_enabled, log
from ..task import TaskContext


class SystemClock:
    """The process's clocks, as the engine's ``Clock`` protocol asks for them. ``monotonic`` is
    the builtin itself: the engine reads it several times per task."""

    monotonic = staticmethod(time.monotonic)

    def wall_ms(self) -> int:
        return int(time.time() * 1000)


#: One for the process: it holds no state.
SYSTEM_CLOCK = SystemClock()


def report(events: Iterable[Event]) -> None:
    """Log each event, hand it to the hooks and run the callbacks it asks for, in order."""
    for event in events:
        _REPORTERS[type(event)](event)


def report_kept(outbox: Outbox) -> None:
    """Report what ``outbox`` holds, if anything (off the per-task path, where drivers test the
    outbox inline to spare the call)."""
    if outbox:
        report(outbox.take())


def lease_started(lease: Lease) -> None:
    """Report a lease just granted: a take-over when the first task handed with it had been
    handed before (its deliveries count is above 1), which costs no extra read."""
    taken_over = bool(lease.initial) and lease.initial[0][1] > 1
    change: LeaseChange = "taken_over" if taken_over else "acquired"
    dispatcher.on_lease(lease.stream, change)


def lease_ended(lease: Lease) -> None:
    """Report how a lease this worker held ended."""
    dispatcher.on_lease(lease.stream, "lost" if lease.lost else "released")


def task_log(ctx: TaskContext) -> Any:
    """The logger of one task's events, with what identifies its execution bound."""
    return log.bind(
        queue=ctx.queue,
        stream=ctx.stream,
        task_id=ctx.id,
        task=ctx.name,
        deliveries=ctx.deliveries,
        fencing_token=ctx.fencing_token,
    )


def _attempt_started(event: AttemptStarted) -> None:
    if dispatcher.active:
        dispatcher.before_execution(event.ctx)


def _attempt_ended(event: AttemptEnded) -> None:
    if dispatcher.active:
        dispatcher.after_execution(event.ctx, event.outcome, event.duration)
    if event.outcome == "succeeded" and debug_enabled():  # binding costs more than a no-op task
        task_log(event.ctx).debug("pyfiq.task_succeeded", attempt=event.ctx.attempt, duration=round(event.duration, 6))


def _callback(event: CallbackDue) -> None:
    try:
        event.callback(*event.args)
    except Exception:
        log.exception("pyfiq.callback_failed", callback=event.name, task_id=event.ctx.id, queue=event.ctx.queue)


def _retry(event: RetryScheduled) -> None:
    error = describe_error(event.error)
    if event.blocking:
        task_log(event.ctx).error(
            "pyfiq.task_blocking_queue", attempts=event.attempts, error=error, retry_in=event.wait
        )
    else:
        task_log(event.ctx).info("pyfiq.task_retry_scheduled", attempt=event.attempts, wait=event.wait, error=error)
    dispatcher.on_retry(event.ctx, event.error, event.wait)


def _exhausted(event: TaskExhausted) -> None:
    error = describe_error(event.error)
    # With its traceback: error trackers (Sentry's logging integration and the like) report
    # ERROR records that carry exc_info as the exception itself.
    task_log(event.ctx).error(
        "pyfiq.task_dead_lettered", reason="exhausted", attempts=event.attempts, error=error, exc_info=event.error
    )


def _running_long(event: RunningLong) -> None:
    task_log(event.ctx).warning(
        "pyfiq.task_running_long",
        attempt=event.attempt,
        elapsed=event.elapsed,
        time_warning=event.time_warning,
        time_limit=event.time_limit,
    )


def _limit_reached(event: LimitReached) -> None:
    task_log(event.ctx).error(
        "pyfiq.task_time_limit_exceeded",
        attempt=event.attempt,
        elapsed=event.elapsed,
        time_limit=event.time_limit,
        hint="interrupting it; the lease stays held until it has really ended (a plain function "
        "blocked in one C call, such as a socket read without timeout, ends only when the call returns)",
    )


def _fenced(event: TaskFenced) -> None:
    if event.skipped:
        task_log(event.ctx).info("pyfiq.task_skipped_while_running", attempts=event.attempts)
        return
    task_log(event.ctx).error(
        "pyfiq.task_outlived_lease",
        reason=event.reason,
        attempts=event.attempts,
        hint="the result is dropped and the task runs again on the new holder; if the task holds "
        "the GIL or blocks the event loop longer than lease_ttl, raise lease_ttl",
    )


def _deferred(event: TaskDeferred) -> None:
    log.warning(
        "pyfiq.task_deferred_unknown", stream=event.stream, task=event.name, task_id=event.task_id, grace=event.grace
    )


def _lease_lost(event: LeaseLost) -> None:
    log.error("pyfiq.lease_lost", stream=event.stream, fencing_token=event.fencing_token, reason=event.reason)


def _lease_revoked(event: LeaseRevoked) -> None:
    log.info("pyfiq.lease_revoked", stream=event.stream, fencing_token=event.fencing_token, skipped=event.skipped)


def _layout_mismatch(event: LayoutMismatch) -> None:
    log.error("pyfiq.layout_mismatch", shard=event.shard, shards=event.shards, error=event.error)


def _refused(event: TaskRefused) -> None:
    """In the fields of every other dead letter's line (queue, stream, task, reason, error),
    not as the record's JSON header."""
    try:
        header = json.loads(event.header)
    except ValueError:
        header = {}
    if not isinstance(header, dict):
        header = {}
    log.error(
        "pyfiq.task_dead_lettered",
        queue=queue_of(event.stream),
        stream=event.stream,
        task_id=event.task_id,
        task=header.get("name"),
        deliveries=header.get("deliveries"),
        reason=header.get("reason"),
        error=header.get("error"),
    )


#: By event type, what reporting it means; every type of ``Event`` has one (a test checks).
_REPORTERS: dict[type[Any], Callable[[Any], None]] = {
    AttemptStarted: _attempt_started,
    AttemptFailed: lambda e: dispatcher.on_failure(e.ctx, e.error),
    AttemptEnded: _attempt_ended,
    CallbackDue: _callback,
    RetryScheduled: _retry,
    TaskExhausted: _exhausted,
    RunningLong: _running_long,
    LimitReached: _limit_reached,
    TaskFenced: _fenced,
    TaskInterrupted: lambda e: task_log(e.ctx).info("pyfiq.task_interrupted_by_stop"),
    DeadLetterConfirmed: lambda e: dispatcher.on_dead_letter(e.stream, e.reason, e.ctx),
    TaskRefused: _refused,
    TaskDeferred: _deferred,
    LeaseRevoked: _lease_revoked,
    LeaseLost: _lease_lost,
    StreamHalted: lambda e: log.info("pyfiq.stream_halted", stream=e.stream, reason=e.reason),
    LayoutMismatch: _layout_mismatch,
    ClaimFailed: lambda e: log.warning("pyfiq.claim_failed", error=e.error, retry_in=e.retry_in),
    HeartbeatLate: lambda e: log.warning("pyfiq.heartbeat_late", late_by=e.late_by, interval=e.interval),
}
