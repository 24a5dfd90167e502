"""Plain event hooks: what workers and enqueues report, for metrics, tracing or audit logs.

``pyfiq.hooks.add(listener)`` registers any object with some of these methods (a missing one
is simply not called); ``pyfiq.hooks.remove(listener)`` unregisters it:

- ``before_execution(ctx)``: an attempt of a task starts (``ctx``: its ``TaskContext``).
- ``on_failure(ctx, error)``: that attempt raised ``error`` (reported right before its
  ``after_execution``, whose outcome is ``failed``, or ``fenced`` if the lease was lost).
- ``after_execution(ctx, outcome, duration)``: that attempt ended after ``duration`` seconds,
  ``outcome`` being ``"succeeded"``, ``"failed"`` (it raised), ``"fenced"`` (the lease was
  lost meanwhile, so its result is dropped and the next holder runs the task again) or
  ``"cancelled"`` (an ``AsyncWorker`` stop cancelled it past its deadline).
- ``on_retry(ctx, error, wait)``: the attempt failed with ``error``; the task runs again in
  place after ``wait`` seconds (also each new round of an ``on_exhausted="block"`` task).
- ``on_dead_letter(stream, reason, ctx_or_none)``: Redis confirmed that a worker dead-lettered
  the head task of ``stream`` for ``reason`` (as in the record): ``exhausted`` with the last
  attempt's context, or ``undecodable``, ``expired``, ``unknown-task`` with None (the task
  never started). Dead letters made inside Redis's scripts (``poison``, ``lease-lost``, tasks
  expired or malformed at hand-out) and by operators are not reported: ``pyfiq exporter``
  counts every dead letter.
- ``on_lease(stream, event)``: ``acquired``; ``taken_over`` (acquired, and the first task
  handed was handed to an earlier holder before: it crashed, lost its lease or stopped
  mid-retry); ``released`` (handed back: drained, yielded, parked, paused or stopped); or
  ``lost`` (fenced: another holder may run the stream now). A worker's ``abandon()`` reports
  no end, as a dead process would not. A claim that takes no task with the lease (a
  rate-limited queue's) reports ``acquired``.
- ``before_enqueue(queue, headers)``: an enqueue call (or an ``enqueue_many`` batch) is about
  to encode its tasks; string entries the listener puts in the dict ``headers`` travel with
  each of them and reach the running task as ``ctx.headers`` (how a trace context crosses
  from the enqueuing code to the execution).
- ``on_enqueue(queue, count)``: ``count`` new tasks were stored (a deduplicated call is none).

Listeners run synchronously in the thread or event loop that reports, so they must be quick
and must not block (an ``AsyncWorker``'s loop waits for them). A listener that raises is
logged as ``pyfiq.hook_failed`` (warning, with its error) and is otherwise ignored: it never
breaks a worker or an enqueue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .engine.outcomes import describe_error
from .errors import ConfigurationError
from .logs import log

if TYPE_CHECKING:
    from .engine.lease import Lease

EVENTS = (
    "before_execution",
    "on_failure",
    "after_execution",
    "on_retry",
    "on_dead_letter",
    "on_lease",
    "before_enqueue",
    "on_enqueue",
)

_lock = threading.Lock()
_listeners: list[object] = []
# Per event, the (listener, method) pairs to call. Rebuilt whole under the lock and read
# without it, so an event nobody listens to costs a dict lookup on the hot path.
_handlers: dict[str, tuple[tuple[object, Callable[..., Any]], ...]] = {}


def add(listener: object) -> None:
    """Register ``listener``: an object with any of the methods the module doc lists. Adding
    the same object again changes nothing."""
    if not any(callable(getattr(listener, name, None)) for name in EVENTS):
        raise ConfigurationError(f"{listener!r} has none of the hook methods {', '.join(EVENTS)}")
    with _lock:
        if not any(known is listener for known in _listeners):
            _listeners.append(listener)
        _rebuild()


def remove(listener: object) -> None:
    """Unregister ``listener``; one that was never added is ignored."""
    with _lock:
        _listeners[:] = [known for known in _listeners if known is not listener]
        _rebuild()


def _rebuild() -> None:
    global _handlers
    handlers: dict[str, tuple[tuple[object, Callable[..., Any]], ...]] = {}
    for name in EVENTS:
        found = [(listener, getattr(listener, name, None)) for listener in _listeners]
        handlers[name] = tuple((listener, method) for listener, method in found if callable(method))
    _handlers = handlers


def emit(event: str, *args: Any) -> None:
    """Call every listener's ``event`` method with ``args``. Only ``Exception`` is caught: a
    ``BaseException`` (a time limit's interruption, asyncio's cancellation) is the worker's
    own control flow passing through."""
    handlers = _handlers.get(event)
    if not handlers:
        return
    for listener, method in handlers:
        try:
            method(*args)
        except Exception as exc:
            log.warning(
                "pyfiq.hook_failed", hook=event, listener=type(listener).__qualname__, error=describe_error(exc)
            )


def enqueue_headers(queue: str) -> dict[str, str] | None:
    """The headers ``before_enqueue`` listeners give tasks enqueued on ``queue`` now, or None
    (nobody listens, or they added nothing). An entry that is not a string pair is dropped
    with a warning: it could not be stored in every serializer's format."""
    if not _handlers.get("before_enqueue"):
        return None
    headers: dict[str, str] = {}
    emit("before_enqueue", queue, headers)
    bad = [name for name, value in headers.items() if not (isinstance(name, str) and isinstance(value, str))]
    for name in bad:
        log.warning("pyfiq.hook_header_dropped", header=repr(name), hint="headers are str: str pairs")
        del headers[name]
    return headers or None


def lease_started(lease: Lease) -> None:
    """Report a lease just granted: a take-over when the first task handed with it had been
    handed before (its deliveries count is above 1), which costs no extra read."""
    taken_over = bool(lease.initial) and lease.initial[0][1] > 1
    emit("on_lease", lease.stream, "taken_over" if taken_over else "acquired")


def lease_ended(lease: Lease) -> None:
    """Report how a lease this worker held ended."""
    emit("on_lease", lease.stream, "lost" if lease.lost else "released")
