"""OpenTelemetry tracing of tasks, built on ``pyfiq.hooks``.

``pyfiq.tracing.enable(tracer_provider=None)`` registers a hooks listener that

- puts the enqueuing code's trace context (the global propagator's fields, W3C
  ``traceparent`` by default) into the headers of every task it enqueues, and
- runs every attempt of a task inside a ``process <queue>`` span of kind CONSUMER, linked to
  that context, with the queue, stream, task id and name, attempt, deliveries and fencing
  token as attributes. The span is current while the task runs, so the task's own spans (an
  instrumented HTTP call, say) are its children. A failed attempt records its exception and
  sets the span's status to error; an attempt whose lease was lost ends with status error and
  ``pyfiq.outcome=fenced``.

The link (not a parent) is how OpenTelemetry's messaging conventions join a consumer to the
producer: the execution may run long after, and many times (retries, redeliveries), for one
enqueue. It needs the ``otel`` extra (``pip install 'pyfiq[otel]'``, which brings
``opentelemetry-api``); pyfiq imports it only inside ``enable()``. Without an SDK configured
by the application, OpenTelemetry's API records nothing and costs almost nothing.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from . import hooks
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .engine.events import TaskOutcome
    from .task import TaskContext

INSTALL_HINT = "pip install 'pyfiq[otel]'"

_lock = threading.Lock()
_enabled: list[TracingListener] = []


def _otel() -> Any:
    try:
        import opentelemetry.context
        import opentelemetry.propagate
        import opentelemetry.trace
    except ImportError as exc:
        raise ConfigurationError(f"pyfiq's tracing needs the opentelemetry-api package: {INSTALL_HINT}") from exc
    return opentelemetry


class TracingListener(hooks.Hooks):
    """The hooks listener ``enable()`` registers."""

    def __init__(self, tracer_provider: Any = None) -> None:
        from . import __version__

        otel = _otel()
        self._trace = otel.trace
        self._context = otel.context
        self._propagate = otel.propagate
        self.tracer = otel.trace.get_tracer("pyfiq", __version__, tracer_provider=tracer_provider)
        # One open attempt per context: a worker thread or asyncio task runs one attempt at a
        # time, and its before/after events are reported in that same context.
        self._open: dict[int, tuple[Any, object]] = {}
        #: Cleared by ``disable()``: no new span starts, and open ones still end, after which
        #: the listener unregisters itself (a span left open would stay attached to its thread).
        self.active = True

    def before_enqueue(self, queue: str, headers: dict[str, str]) -> None:
        if self.active:
            self._propagate.inject(headers)

    def before_execution(self, ctx: TaskContext) -> None:
        if not self.active:
            return
        producer = self._trace.get_current_span(self._propagate.extract(dict(ctx.headers))).get_span_context()
        links = [self._trace.Link(producer)] if producer.is_valid else []
        span = self.tracer.start_span(
            f"process {ctx.queue}",
            context=self._context.Context(),  # a root: the enqueuer is a link, not a parent
            kind=self._trace.SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": "pyfiq",
                "messaging.operation.type": "process",
                "messaging.destination.name": ctx.queue,
                "messaging.message.id": ctx.id,
                "pyfiq.stream": ctx.stream,
                "pyfiq.task.name": ctx.name,
                "pyfiq.task.attempt": ctx.attempt,
                "pyfiq.task.deliveries": ctx.deliveries,
                "pyfiq.fencing_token": ctx.fencing_token,
            },
        )
        token = self._context.attach(self._trace.set_span_in_context(span))
        self._open[id(ctx)] = (span, token)

    def on_failure(self, ctx: TaskContext, error: BaseException) -> None:
        opened = self._open.get(id(ctx))
        if opened is not None:
            opened[0].record_exception(error, escaped=True)

    def after_execution(self, ctx: TaskContext, outcome: TaskOutcome, duration: float) -> None:
        opened = self._open.pop(id(ctx), None)
        if opened is None:
            return
        span, token = opened
        span.set_attribute("pyfiq.outcome", outcome)
        if outcome != "succeeded":
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, outcome))
        span.end()
        self._context.detach(token)
        if not self.active and not self._open:
            hooks.remove(self)


def enable(tracer_provider: Any = None) -> TracingListener:
    """Trace enqueues and executions with ``tracer_provider`` (default: OpenTelemetry's
    global one). Enabling again returns the listener already registered. Raises
    ``ConfigurationError`` without opentelemetry-api."""
    _otel()
    with _lock:
        if _enabled:
            return _enabled[0]
        listener = TracingListener(tracer_provider)
        _enabled.append(listener)
    hooks.add(listener)
    return listener


def disable() -> None:
    """Stop tracing: no new span starts; attempts running now still end theirs."""
    with _lock:
        found = list(_enabled)
        _enabled.clear()
    for listener in found:
        listener.active = False
        if not listener._open:
            hooks.remove(listener)
