"""``pyfiq exporter``: Prometheus gauges of the queues' state, read from Redis on each scrape.

Labelled by queue name (never by stream, whose number is unbounded):

- ``pyfiq_queue_depth``: tasks waiting in pending lists (not yet handed to a holder).
- ``pyfiq_queue_in_flight``: tasks handed to a lease holder and not yet acknowledged.
- ``pyfiq_queue_oldest_age_seconds``: age of the oldest unfinished task on Redis's clock (the
  head of a stream's in-flight list, which precedes its pending list, else of its pending
  list); 0 for a queue without tasks.
- ``pyfiq_dead_letters``: dead-letter records.
- ``pyfiq_queue_paused``: 1 while the queue as a whole is paused.
- ``pyfiq_paused_streams``: keyed streams of the queue paused on their own.
- ``pyfiq_streams``: live streams (with work or a lease; an unkeyed queue is one stream).

A queue is reported while it has a live stream, dead letters or a pause. The reads are
bounded by what is live, never by what existed: the shards' queue indexes, ready sets,
dead-letter and pause sets, then per live stream two list lengths and two list heads, and per
stream with dead letters one count; pipelined in batches, no KEYS or SCAN, nothing written.
Works without any worker, beside any number of them.
"""

from __future__ import annotations

import os
import socketserver
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import click

from ..backend.backend import RedisQueueBackend
from ..engine.keys import STREAM_SEPARATOR, queue_of
from ..errors import ConfigurationError, DecodeError
from ..metrics import prometheus
from ..task import Entry

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

DEFAULT_PORT = 9808
#: Items (streams, ready sets) whose reads go in one pipelined round trip: bounds each reply.
BATCH = 500


@dataclass
class QueueState:
    depth: int = 0
    in_flight: int = 0
    oldest_ms: int | None = None
    dead: int = 0
    paused: bool = False
    paused_streams: int = 0
    streams: int = 0


def _batched(client: Any, items: Sequence[Any], add: Callable[[Any, Any], object], per: int) -> list[list[Any]]:
    """``add(pipe, item)`` queues ``per`` commands for each item; runs them in pipelines of
    ``BATCH`` items and returns each item's replies."""
    out: list[list[Any]] = []
    for start in range(0, len(items), BATCH):
        pipe = client.pipeline(transaction=False)
        for item in items[start : start + BATCH]:
            add(pipe, item)
        replies = pipe.execute()
        out += [replies[i : i + per] for i in range(0, len(replies), per)]
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _enqueued_ms(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return Entry.parse(raw).enqueued_ms
    except DecodeError:
        return None  # a malformed entry has no time; a worker dead-letters it


def read_index(backend: RedisQueueBackend) -> tuple[int, list[tuple[int, str]], list[str], set[str]]:
    """Redis's time (ms), the (shard, queue) ready sets, the streams with dead letters and the
    paused queues and streams, in one round trip."""
    keys = backend.keys
    pipe = backend.client.pipeline(transaction=False)
    pipe.time().get(keys.layout(0))
    for shard in range(keys.shards):
        pipe.zrange(keys.queues(shard), 0, -1).smembers(keys.dlq_index(shard)).smembers(keys.paused(shard))
    (seconds, micros), layout, *per_shard = pipe.execute()
    laid = None if layout is None else int(layout.rstrip(b"?"))  # "<count>?": a tentative layout
    if laid is not None and laid != keys.shards:
        raise ConfigurationError(
            f"prefix {keys.prefix!r} is laid out with {laid} shards, the exporter reads {keys.shards}: "
            "give it the deployment's --shards"
        )
    ready: list[tuple[int, str]] = []
    dead: list[str] = []
    paused: set[str] = set()
    for shard in range(keys.shards):
        queues, dlqs, pauses = per_shard[3 * shard : 3 * shard + 3]
        ready += [(shard, _text(q)) for q in queues]
        dead += [_text(s) for s in dlqs]
        paused |= {_text(m) for m in pauses}
    return int(seconds) * 1000 + int(micros) // 1000, ready, sorted(dead), paused


def snapshot(backend: RedisQueueBackend) -> tuple[int, dict[str, QueueState]]:
    """Redis's time (ms) and the state of every queue with a live stream, dead letters or a
    pause."""
    client, keys = backend.client, backend.keys
    now_ms, ready, dead_streams, paused = read_index(backend)
    states: dict[str, QueueState] = defaultdict(QueueState)
    live = _batched(client, ready, lambda pipe, r: pipe.zrange(keys.ready(*r), 0, -1), 1)
    streams = sorted({_text(s) for (members,) in live for s in members})

    def counters(pipe: Any, stream: str) -> None:
        k = keys.stream(stream)
        pipe.llen(k.pending).llen(k.inflight).lindex(k.inflight, 0).lindex(k.pending, 0)

    for stream, (pending, inflight, *heads) in zip(streams, _batched(client, streams, counters, 4), strict=True):
        state = states[queue_of(stream)]
        state.streams += 1
        state.depth += int(pending)
        state.in_flight += int(inflight)
        oldest = next((ms for ms in map(_enqueued_ms, heads) if ms is not None), None)
        if oldest is not None and (state.oldest_ms is None or oldest < state.oldest_ms):
            state.oldest_ms = oldest
    counts = _batched(client, dead_streams, lambda pipe, s: pipe.zcard(keys.stream(s).dead), 1)
    for stream, (count,) in zip(dead_streams, counts, strict=True):
        states[queue_of(stream)].dead += int(count)
    for member in paused:
        state = states[queue_of(member)]
        if STREAM_SEPARATOR in member:
            state.paused_streams += 1
        else:
            state.paused = True
    return now_ms, dict(states)


GAUGES: list[tuple[str, str, Callable[[QueueState, int], float]]] = [
    ("pyfiq_queue_depth", "Tasks waiting in pending lists.", lambda s, now: s.depth),
    ("pyfiq_queue_in_flight", "Tasks handed to a lease holder, not yet acknowledged.", lambda s, now: s.in_flight),
    (
        "pyfiq_queue_oldest_age_seconds",
        "Age of the oldest unfinished task, on Redis's clock.",
        lambda s, now: 0.0 if s.oldest_ms is None else max(0, now - s.oldest_ms) / 1000,
    ),
    ("pyfiq_dead_letters", "Dead-letter records.", lambda s, now: s.dead),
    ("pyfiq_queue_paused", "1 while the queue as a whole is paused.", lambda s, now: int(s.paused)),
    ("pyfiq_paused_streams", "Keyed streams of the queue paused on their own.", lambda s, now: s.paused_streams),
    ("pyfiq_streams", "Live streams (with work or a lease).", lambda s, now: s.streams),
]


class QueueCollector:
    """A prometheus-client collector: every scrape reads a fresh ``snapshot`` from Redis. A
    scrape while Redis is unreachable fails (HTTP 500), so Prometheus's ``up`` turns 0."""

    def __init__(self, backend: RedisQueueBackend) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        now_ms, states = snapshot(self.backend)
        for name, documentation, value in GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=["queue"])
            for queue, state in sorted(states.items()):
                family.add_metric([queue], value(state, now_ms))
            yield family


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape is noise; failures still reach stderr


def build_server(backend: RedisQueueBackend, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> WSGIServer:
    """An HTTP server exposing the queue gauges at ``/metrics``; call ``serve_forever()`` (or
    run it in a thread and ``shutdown()`` it). ``port=0`` picks a free port."""
    prom = prometheus()
    registry = prom.CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(backend))
    return make_server(host, port, prom.make_wsgi_app(registry), _Server, _QuietHandler)


@click.command()
@click.option(
    "--redis",
    "url",
    default=lambda: os.environ.get("PYFIQ_REDIS_URL", "redis://localhost:6379/0"),
    show_default="$PYFIQ_REDIS_URL or redis://localhost:6379/0",
    help="Redis URL.",
)
@click.option("--prefix", default="pyfiq", show_default=True, help="Key prefix.")
@click.option(
    "--shards",
    default=None,
    type=click.IntRange(1, 16384),
    help="Shard count of the deployment (default: as laid out in Redis, else 16).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
def exporter(url: str, prefix: str, shards: int | None, host: str, port: int) -> None:
    """Serve Prometheus gauges of every queue (depth, in flight, oldest age, dead letters,
    paused, streams), read from Redis on each scrape, at http://HOST:PORT/metrics."""
    try:
        prometheus()
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    from .cli import _backend  # here: that module registers this command when it loads

    backend = _backend(url, prefix, shards)
    server = build_server(backend, host, port)
    click.echo(f"pyfiq exporter serving http://{host}:{server.server_port}/metrics", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        backend.close()
