"""Running one task under its retry policy: the decisions both drivers share.

The drivers keep only the loop itself (tenacity's ``for attempt in Retrying`` or
``async for attempt in AsyncRetrying``) and how the function is invoked; what an attempt,
a failure, an exhausted policy or an interruption means is decided here.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import structlog
from tenacity import RetryCallState, stop_when_event_set

from .core import Aborted, Acked, DeadLettered, Fenced, Lease, Outcome, Prepared, dead_letter_header
from .task import TaskContext

log = structlog.get_logger("pyfiq")

#: Pause between exhausted rounds of an ``on_exhausted="block"`` task whose policy has no wait.
BLOCK_MIN_PAUSE = 0.1


class Interrupted(BaseException):
    """Raised inside a retry loop when the lease was lost or the worker stops; a
    BaseException so no retry predicate ever retries it."""


class TaskExit(Exception):
    """A task raised SystemExit or another BaseException: recorded as its failure."""


def call_hook(hook: Any, *args: Any, event: str, ctx: TaskContext) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("pyfiq.callback_failed", callback=event, task_id=ctx.id, queue=ctx.queue)


class TaskRun:
    def __init__(self, prepared: Prepared, lease: Lease) -> None:
        self.fn = prepared.func
        self.record = prepared.record
        self.ctx = prepared.context
        self.lease = lease
        self.policy = self.fn.policy
        self.attempts = 0
        self.state: RetryCallState | None = None
        self.logger = log.bind(
            queue=self.ctx.queue,
            stream=self.ctx.stream,
            task_id=self.ctx.id,
            task=self.ctx.name,
            deliveries=self.ctx.deliveries,
            fencing_token=self.ctx.fencing_token,
        )

    def retrying_kwargs(self, sleep: Any) -> dict[str, Any]:
        """Arguments for tenacity's Retrying/AsyncRetrying: the task's policy, stopped early by
        the lease's abort flag, sleeping with ``sleep`` so a stop ends a back-off at once."""
        return {
            "stop": self.policy.stop | stop_when_event_set(self.lease.abort),  # type: ignore[arg-type]
            "wait": self.policy.wait,
            "retry": self.policy.retry,
            "sleep": sleep,
            "before_sleep": self._before_sleep,
            "reraise": True,
        }

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        self.logger.warning("pyfiq.task_retry_scheduled", attempt=self.attempts, wait=wait, error=repr(exc))

    def begin(self, state: RetryCallState) -> TaskContext:
        """Start an attempt: the context the function runs with."""
        self.state = state
        if self.lease.abort.is_set():
            raise Interrupted
        self.attempts += 1
        self.ctx = replace(self.ctx, attempt=self.attempts)
        return self.ctx

    def failed(self, exc: BaseException) -> BaseException:
        """Record a failed attempt; returns what the retry loop should see. SystemExit and
        friends from a task are the task's failure: they must not end the worker."""
        if isinstance(exc, Interrupted | asyncio.CancelledError):
            return exc  # the worker's own control flow, not the task's failure
        call_hook(self.fn.on_error, exc, self.ctx, self.fn, event="on_error", ctx=self.ctx)
        return exc if isinstance(exc, Exception) else TaskExit(repr(exc))

    def exhausted(self, exc: Exception) -> Outcome | float:
        """The policy gave up: an outcome, or (``on_exhausted="block"``) seconds to pause
        before another round."""
        if self.lease.abort.is_set():
            return self.interrupted()
        if self.fn.on_exhausted == "block":
            pause = max(float(self.policy.wait(self.state)) if self.state else 0.0, BLOCK_MIN_PAUSE)
            self.logger.error("pyfiq.task_blocking_queue", attempts=self.attempts, error=repr(exc), retry_in=pause)
            return pause
        self.logger.error("pyfiq.task_dead_lettered", reason="exhausted", attempts=self.attempts, error=repr(exc))
        return DeadLettered(
            dead_letter_header(
                "exhausted",
                replica=self.ctx.replica,
                deliveries=self.ctx.deliveries,
                attempts=self.attempts,
                name=self.ctx.name,
                error=exc,
            )
        )

    def interrupted(self) -> Outcome:
        if self.lease.lost:
            self.logger.error("pyfiq.result_dropped", reason=self.lease.lost_reason)
            return Fenced()
        self.logger.info("pyfiq.task_interrupted_by_stop")
        return Aborted()

    def succeeded(self, result: Any) -> Outcome:
        if self.lease.lost:
            self.logger.error("pyfiq.result_dropped", reason=self.lease.lost_reason)
            return Fenced()
        call_hook(self.fn.on_success, result, self.ctx, self.fn, event="on_success", ctx=self.ctx)
        return Acked()
