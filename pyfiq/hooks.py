"""Event hooks: what workers and enqueues report, for metrics, tracing or audit logs.

Subclass ``Hooks``, override the methods you need (the others stay no-ops), and register an
instance with ``pyfiq.hooks.add(listener)``; ``pyfiq.hooks.remove(listener)`` unregisters it.
``add`` takes only ``Hooks`` instances: an object that merely has some methods of the same
names is refused with ``ConfigurationError``, so that a misspelt method (which would never be
called) is a type error a checker catches rather than a silent gap.

Listeners run synchronously in the thread or event loop that reports, so they must be quick
and must not block (an ``AsyncWorker``'s loop waits for them). A listener that raises is
logged as ``pyfiq.hook_failed`` (warning, with its error) and is otherwise ignored: it never
breaks a worker or an enqueue. The workers and enqueues report through ``dispatcher``, a
``Hooks`` itself whose every method calls the registered listeners that override it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .engine.events import LeaseChange, TaskOutcome
from .engine.outcomes import describe_error
from .errors import ConfigurationError
from .logs import log

if TYPE_CHECKING:
    from .task import TaskContext

__all__ = ["EVENTS", "Dispatcher", "Hooks", "LeaseChange", "TaskOutcome", "add", "dispatcher", "remove"]


class Hooks:
    """A listener of pyfiq's events: every method is a no-op until a subclass overrides it."""

    def before_execution(self, ctx: TaskContext) -> None:
        """An attempt of a task starts (``ctx``: its ``TaskContext``)."""

    def on_failure(self, ctx: TaskContext, error: BaseException) -> None:
        """That attempt raised ``error`` (reported right before its ``after_execution``, whose
        outcome is ``failed``, or ``fenced`` if the lease was lost)."""

    def after_execution(self, ctx: TaskContext, outcome: TaskOutcome, duration: float) -> None:
        """That attempt ended after ``duration`` seconds: ``succeeded``, ``failed`` (it raised),
        ``fenced`` (the lease was lost meanwhile, so its result is dropped and the next holder
        runs the task again) or ``cancelled`` (an ``AsyncWorker`` stop cancelled it past its
        deadline)."""

    def on_retry(self, ctx: TaskContext, error: BaseException, wait: float) -> None:
        """The attempt failed with ``error``; the task runs again in place after ``wait``
        seconds (also each new round of an ``on_exhausted="block"`` task)."""

    def on_dead_letter(self, stream: str, reason: str, ctx: TaskContext | None) -> None:
        """Redis confirmed that a worker dead-lettered the head task of ``stream`` for
        ``reason`` (as in the record): ``exhausted`` with the last attempt's context, or
        ``undecodable``, ``expired``, ``unknown-task`` with None (the task never started).
        Dead letters made inside Redis's scripts (``poison``, ``lease-lost``, tasks expired or
        malformed at hand-out) and by operators are not reported: ``pyfiq exporter`` counts
        every dead letter."""

    def on_lease(self, stream: str, event: LeaseChange) -> None:
        """``acquired``; ``taken_over`` (acquired, and the first task handed was handed to an
        earlier holder before: it crashed, lost its lease or stopped mid-retry); ``released``
        (handed back: drained, yielded, parked, paused or stopped); or ``lost`` (fenced: another
        holder may run the stream now). A worker's ``abandon()`` reports no end, as a dead
        process would not. A claim that takes no task with the lease (a rate-limited queue's)
        reports ``acquired``."""

    def before_enqueue(self, queue: str, headers: dict[str, str]) -> None:
        """An enqueue call (or an ``enqueue_many`` batch) is about to encode its tasks; string
        entries put in the dict ``headers`` travel with each of them and reach the running task
        as ``ctx.headers`` (how a trace context crosses from the enqueuing code to the
        execution)."""

    def on_enqueue(self, queue: str, count: int) -> None:
        """``count`` new tasks were stored (a deduplicated call stores none)."""


#: The hook methods, in the order the reference lists them.
EVENTS: tuple[str, ...] = tuple(name for name in vars(Hooks) if not name.startswith("_"))


class Dispatcher(Hooks):
    """Hands each event to every registered listener that overrides its method, in the order
    they were added. Listeners are rebuilt per method under a lock and read without it, so an
    event nobody listens to costs a dict lookup on the hot path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Hooks] = []
        self._handlers: dict[str, tuple[tuple[Hooks, Callable[..., Any]], ...]] = {}
        #: Whether any listener is registered: the per-task events skip the dispatch without.
        self.active = False

    def add(self, listener: Hooks) -> None:
        if not isinstance(listener, Hooks) or isinstance(listener, Dispatcher):
            raise ConfigurationError(
                f"pyfiq.hooks.add takes an instance of a pyfiq.hooks.Hooks subclass, got {listener!r}: "
                "subclass Hooks and override the methods you need"
            )
        with self._lock:
            if not any(known is listener for known in self._listeners):
                self._listeners.append(listener)
            self._rebuild()

    def remove(self, listener: Hooks) -> None:
        with self._lock:
            self._listeners[:] = [known for known in self._listeners if known is not listener]
            self._rebuild()

    def _rebuild(self) -> None:
        handlers: dict[str, tuple[tuple[Hooks, Callable[..., Any]], ...]] = {}
        for name in EVENTS:
            base = getattr(Hooks, name)
            overriding = [listener for listener in self._listeners if getattr(type(listener), name) is not base]
            handlers[name] = tuple((listener, getattr(listener, name)) for listener in overriding)
        self._handlers = handlers
        self.active = bool(self._listeners)

    def listens(self, hook: Callable[..., None]) -> bool:
        """Whether a listener overrides ``hook`` (a method of ``Hooks``)."""
        return bool(self._handlers.get(hook.__name__))

    def _call(self, hook: Callable[..., None], *args: Any) -> None:
        """Call every listener's override of ``hook`` with ``args``. Only ``Exception`` is
        caught: a ``BaseException`` (a time limit's interruption, asyncio's cancellation) is the
        worker's own control flow passing through."""
        name = hook.__name__
        for listener, method in self._handlers.get(name, ()):
            try:
                method(*args)
            except Exception as exc:
                log.warning(
                    "pyfiq.hook_failed", hook=name, listener=type(listener).__qualname__, error=describe_error(exc)
                )

    def before_execution(self, ctx: TaskContext) -> None:
        self._call(Hooks.before_execution, ctx)

    def on_failure(self, ctx: TaskContext, error: BaseException) -> None:
        self._call(Hooks.on_failure, ctx, error)

    def after_execution(self, ctx: TaskContext, outcome: TaskOutcome, duration: float) -> None:
        self._call(Hooks.after_execution, ctx, outcome, duration)

    def on_retry(self, ctx: TaskContext, error: BaseException, wait: float) -> None:
        self._call(Hooks.on_retry, ctx, error, wait)

    def on_dead_letter(self, stream: str, reason: str, ctx: TaskContext | None) -> None:
        self._call(Hooks.on_dead_letter, stream, reason, ctx)

    def on_lease(self, stream: str, event: LeaseChange) -> None:
        self._call(Hooks.on_lease, stream, event)

    def before_enqueue(self, queue: str, headers: dict[str, str]) -> None:
        self._call(Hooks.before_enqueue, queue, headers)

    def on_enqueue(self, queue: str, count: int) -> None:
        self._call(Hooks.on_enqueue, queue, count)

    def enqueue_headers(self, queue: str) -> dict[str, str] | None:
        """The headers ``before_enqueue`` listeners give tasks enqueued on ``queue`` now, or
        None (nobody listens, or they added nothing). An entry that is not a string pair is
        dropped with a warning: it could not be stored in every serializer's format."""
        if not self.listens(Hooks.before_enqueue):
            return None
        headers: dict[str, str] = {}
        self.before_enqueue(queue, headers)
        bad = [name for name, value in headers.items() if not (isinstance(name, str) and isinstance(value, str))]
        for name in bad:
            log.warning("pyfiq.hook_header_dropped", header=repr(name), hint="headers are str: str pairs")
            del headers[name]
        return headers or None


#: The process's listeners; workers and enqueues report here.
dispatcher = Dispatcher()


def add(listener: Hooks) -> None:
    """Register ``listener``, an instance of a ``Hooks`` subclass (``ConfigurationError`` for
    anything else). Adding the same object again changes nothing."""
    dispatcher.add(listener)


def remove(listener: Hooks) -> None:
    """Unregister ``listener``; one that was never added is ignored."""
    dispatcher.remove(listener)


def enqueue_headers(queue: str) -> dict[str, str] | None:
    """See ``Dispatcher.enqueue_headers``."""
    return dispatcher.enqueue_headers(queue)
