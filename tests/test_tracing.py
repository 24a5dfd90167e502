"""pyfiq.tracing with the OpenTelemetry SDK's in-memory exporter: the enqueuer's trace context
travels with the task through Redis, every attempt is a consumer span linked to it (both
drivers, and an ``async def`` task on the threaded worker), and pyfiq without the API."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pyfiq import ConfigurationError, current_task, fifo, hooks, tracing
from pyfiq.task import Entry, TaskRecord
from tests.support.helpers import drained, wait_until
from tests.workers.test_worker import qname
from tests.workers.test_worker import start_worker as start_worker  # the fixture, over both drivers


@pytest.fixture
def exporter() -> Iterator[tuple[InMemorySpanExporter, Any]]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.enable(provider)
    yield spans, provider.get_tracer("tests")
    tracing.disable()


def _stored(backend: Any, stream: str) -> list[TaskRecord]:
    raw = backend.client.lrange(backend.keys.stream(stream).pending, 0, -1)
    return [TaskRecord.decode(Entry.parse(r).payload, backend.settings.serializer) for r in raw]


def _consumer_spans(spans: InMemorySpanExporter, queue: str) -> list[Any]:
    return [s for s in spans.get_finished_spans() if s.name == f"process {queue}"]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_each_attempt_is_a_span_linked_to_the_enqueuing_span(backend, start_worker, exporter, kind) -> None:  # type: ignore[no-untyped-def]
    spans, tracer = exporter
    q, seen = qname(), {}

    def body(i: int) -> None:
        ctx = current_task()
        with tracer.start_as_current_span(f"inner {ctx.attempt}"):
            seen[ctx.attempt] = ctx.fencing_token
        if ctx.attempt == 1:
            raise OSError("flaky downstream")

    if kind == "sync":
        work = fifo(queue=q, name=f"{q}.work", max_retries=1, retry_wait=0.01)(body)
    else:

        async def abody(i: int) -> None:
            body(i)

        work = fifo(queue=q, name=f"{q}.work", max_retries=1, retry_wait=0.01)(abody)

    with tracer.start_as_current_span("web request") as request_span:
        handle = work.send_with_options(args=(7,))
    start_worker([q])
    wait_until(lambda: len(_consumer_spans(spans, q)) == 2 and drained(backend, q), message="two attempts traced")

    producer = request_span.get_span_context()
    first, second = sorted(_consumer_spans(spans, q), key=lambda s: s.attributes["pyfiq.task.attempt"])
    for attempt, span in ((1, first), (2, second)):
        assert span.kind is trace.SpanKind.CONSUMER
        assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
            (producer.trace_id, producer.span_id)
        ]
        assert span.parent is None, "the enqueuer is a link, not a parent"
        assert dict(span.attributes) == {
            "messaging.system": "pyfiq",
            "messaging.operation.type": "process",
            "messaging.destination.name": q,
            "messaging.message.id": handle.id,
            "pyfiq.stream": q,
            "pyfiq.task.name": f"{q}.work",
            "pyfiq.task.attempt": attempt,
            "pyfiq.task.deliveries": 1,
            "pyfiq.fencing_token": seen[attempt],
            "pyfiq.outcome": "failed" if attempt == 1 else "succeeded",
        }
    assert first.status.status_code is trace.StatusCode.ERROR
    assert [(e.name, e.attributes["exception.type"]) for e in first.events] == [("exception", "OSError")]
    assert second.status.status_code is trace.StatusCode.UNSET and not second.events
    # The task's own spans are children of its attempt's span.
    inner = {s.name: s for s in spans.get_finished_spans() if s.name.startswith("inner")}
    assert inner["inner 1"].parent.span_id == first.context.span_id
    assert inner["inner 2"].parent.span_id == second.context.span_id


def test_the_trace_context_is_stored_with_the_task(backend, exporter) -> None:  # type: ignore[no-untyped-def]
    _spans, tracer = exporter
    q = qname()
    work = fifo(queue=q, name=f"{q}.work")(lambda: None)
    with tracer.start_as_current_span("producer") as span:
        work.send_with_options(backend=backend)
    work.send_with_options(backend=backend)  # outside any span: nothing to carry
    records = _stored(backend, q)
    sc = span.get_span_context()
    assert records[0].headers == {"traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"}
    assert records[1].headers is None


def test_a_listener_can_attach_headers_and_a_bad_one_is_dropped(backend, exporter) -> None:  # type: ignore[no-untyped-def]
    q = qname()

    class Tagger(hooks.Hooks):
        def before_enqueue(self, queue: str, headers: dict[str, str]) -> None:
            headers.update({"tenant": "acme", "bad": 3})  # type: ignore[dict-item]

    tagger = Tagger()
    hooks.add(tagger)
    try:
        work = fifo(queue=q, name=f"{q}.work")(lambda i: None)
        work.enqueue_many([(1,), (2,)], backend=backend)
    finally:
        hooks.remove(tagger)
    assert [record.headers for record in _stored(backend, q)] == [{"tenant": "acme"}] * 2


def test_disable_stops_tracing_and_enable_without_the_api_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = TracerProvider()
    listener = tracing.enable(provider)
    assert tracing.enable(provider) is listener
    tracing.disable()
    assert hooks.enqueue_headers("q-tracing-unit") is None, "nobody listens any more"
    monkeypatch.setitem(sys.modules, "opentelemetry.propagate", None)  # what an import sees when missing
    with pytest.raises(ConfigurationError, match=r"pip install 'pyfiq\[otel\]'"):
        tracing.enable()
