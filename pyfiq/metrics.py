"""Prometheus metrics of this process's workers and enqueues, built on ``pyfiq.hooks``.

``pyfiq.metrics.enable(registry=None)`` registers a hooks listener that keeps, labelled by
queue name (never by stream: a keyed queue can have millions of streams):

- ``pyfiq_tasks_total{queue,outcome}``: attempts that ``succeeded``, ``failed``, were
  ``fenced`` (lease lost, result dropped) or ``cancelled`` (an asyncio stop past its
  deadline); retries scheduled (``retried``); dead letters confirmed (``dead_lettered``).
- ``pyfiq_task_duration_seconds{queue}``: a histogram of attempt durations.
- ``pyfiq_leases_total{queue,event}``: ``acquired``, ``taken_over``, ``released``, ``lost``.
- ``pyfiq_enqueued_total{queue}``: new tasks stored by this process.

It needs the ``metrics`` extra (``pip install 'pyfiq[metrics]'``, which brings
``prometheus-client``); pyfiq itself imports it only when ``enable()`` is called.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from . import hooks
from .engine.keys import queue_of
from .errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .engine.events import LeaseChange, TaskOutcome
    from .task import TaskContext

INSTALL_HINT = "pip install 'pyfiq[metrics]'"

#: Attempt durations, from a no-op to a slow third-party API call behind retries.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_lock = threading.Lock()
_enabled: list[tuple[CollectorRegistry, PrometheusListener]] = []


def prometheus() -> Any:
    """The ``prometheus_client`` module, or ``ConfigurationError`` naming the extra to install."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(
            f"pyfiq's Prometheus metrics need the prometheus-client package: {INSTALL_HINT}"
        ) from exc
    return prometheus_client


class PrometheusListener(hooks.Hooks):
    """The hooks listener ``enable()`` registers: one set of metrics in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        prom = prometheus()
        self.registry = registry
        self.tasks = prom.Counter(
            "pyfiq_tasks",
            "Task attempts by outcome (succeeded, failed, fenced, cancelled), retries scheduled "
            "(retried) and dead letters confirmed by Redis (dead_lettered).",
            ["queue", "outcome"],
            registry=registry,
        )
        self.duration = prom.Histogram(
            "pyfiq_task_duration_seconds",
            "Duration of task attempts.",
            ["queue"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.leases = prom.Counter(
            "pyfiq_leases",
            "Stream leases by event (acquired, taken_over, released, lost).",
            ["queue", "event"],
            registry=registry,
        )
        self.enqueued = prom.Counter("pyfiq_enqueued", "New tasks stored.", ["queue"], registry=registry)

    def after_execution(self, ctx: TaskContext, outcome: TaskOutcome, duration: float) -> None:
        self.tasks.labels(ctx.queue, outcome).inc()
        self.duration.labels(ctx.queue).observe(duration)

    def on_retry(self, ctx: TaskContext, error: BaseException, wait: float) -> None:
        self.tasks.labels(ctx.queue, "retried").inc()

    def on_dead_letter(self, stream: str, reason: str, ctx: TaskContext | None) -> None:
        self.tasks.labels(queue_of(stream), "dead_lettered").inc()

    def on_lease(self, stream: str, event: LeaseChange) -> None:
        self.leases.labels(queue_of(stream), event).inc()

    def on_enqueue(self, queue: str, count: int) -> None:
        self.enqueued.labels(queue).inc(count)

    def unregister(self) -> None:
        for collector in (self.tasks, self.duration, self.leases, self.enqueued):
            self.registry.unregister(collector)


def enable(registry: CollectorRegistry | None = None) -> PrometheusListener:
    """Count this process's task attempts, retries, dead letters, leases and enqueues into
    ``registry`` (default: prometheus-client's global ``REGISTRY``, which its
    ``start_http_server`` and framework integrations serve). Enabling the same registry again
    returns the listener it has. Raises ``ConfigurationError`` without prometheus-client."""
    prom = prometheus()
    target: CollectorRegistry = prom.REGISTRY if registry is None else registry
    with _lock:
        for known, listener in _enabled:
            if known is target:
                return listener
        listener = PrometheusListener(target)
        _enabled.append((target, listener))
    hooks.add(listener)
    return listener


def disable(registry: CollectorRegistry | None = None) -> None:
    """Stop counting into ``registry`` (default: the global one) and unregister its metrics."""
    target = prometheus().REGISTRY if registry is None else registry
    with _lock:
        found = [pair for pair in _enabled if pair[0] is target]
        for pair in found:
            _enabled.remove(pair)
    for _, listener in found:
        hooks.remove(listener)
        listener.unregister()
