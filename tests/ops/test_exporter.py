"""pyfiq exporter: the command serves every queue's state as Redis holds it (pending, in flight,
dead, paused, keyed), scraped over HTTP; its reads are bounded by what is live."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pyfiq import RedisQueueBackend
from pyfiq.engine.keys import stream_name
from pyfiq.ops.exporter import QueueCollector, snapshot
from pyfiq.task import TaskRecord, new_task_id
from pyfiq_harness.servers import free_port
from tests.support.helpers import unique_prefix
from tests.support.servers import RedisServer

GAUGES = (
    "pyfiq_queue_depth",
    "pyfiq_queue_in_flight",
    "pyfiq_queue_oldest_age_seconds",
    "pyfiq_dead_letters",
    "pyfiq_queue_paused",
    "pyfiq_paused_streams",
    "pyfiq_streams",
)


def put(backend: RedisQueueBackend, stream: str, count: int) -> None:
    backend.enqueue(stream, [(new_task_id(), TaskRecord("exp.task", [i], {})) for i in range(count)])


def redis_ms(backend: RedisQueueBackend) -> int:
    seconds, micros = backend.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def put_old(backend: RedisQueueBackend, stream: str, age_ms: int) -> None:
    """A task written at the head of ``stream``'s pending list by hand, enqueued ``age_ms`` ago."""
    record = TaskRecord("exp.task", [], {}).encode(backend.settings.serializer)
    entry = f"{new_task_id()}|{redis_ms(backend) - age_ms}|0|".encode() + record
    backend.client.lpush(backend.keys.stream(stream).pending, entry)


def lay_out(backend: RedisQueueBackend) -> None:
    """Queues in every state the exporter tells apart."""
    put(backend, "exp.pending", 3)
    put_old(backend, "exp.pending", 90_000)  # the age must come from the head entry
    put(backend, "exp.flight", 2)
    put_old(backend, "exp.flight", 60_000)
    backend.call(backend.ops.acquire("exp.flight", 1, "test-holder"))  # hands the old one to a holder
    put(backend, "exp.dead", 2)
    backend.skip("exp.dead")
    put(backend, "exp.gone", 1)
    backend.skip("exp.gone")  # its only task: the stream is no longer live
    put(backend, "exp.paused", 1)
    backend.pause("exp.paused")
    for key, count in (("a", 2), ("b", 1), ("c", 1)):
        put(backend, stream_name("exp.keyed", key), count)
    backend.pause("exp.keyed", "b")


#: queue -> (depth, in flight, dead, paused, paused streams, streams); ages are checked apart.
EXPECTED = {
    "exp.pending": (4, 0, 0, 0, 0, 1),
    "exp.flight": (2, 1, 0, 0, 0, 1),
    "exp.dead": (1, 0, 1, 0, 0, 1),
    "exp.gone": (0, 0, 1, 0, 0, 0),
    "exp.paused": (1, 0, 0, 1, 0, 1),
    "exp.keyed": (4, 0, 0, 0, 1, 3),
}


@pytest.fixture
def exporter_url(redis_server: RedisServer) -> Iterator[tuple[str, RedisQueueBackend]]:
    """``pyfiq exporter`` as a process (shard count from Redis's layout) on a free port."""
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=4, lease_ttl=60)
    lay_out(backend)
    port = free_port()
    command = [sys.executable, "-m", "pyfiq", "exporter", "--redis", redis_server.url]
    process = subprocess.Popen(
        [*command, "--prefix", backend.keys.prefix, "--port", str(port)], stderr=subprocess.PIPE, text=True
    )
    try:
        yield f"http://127.0.0.1:{port}/metrics", backend
    finally:
        process.terminate()
        process.wait(10)
        backend.close()


def scrape(url: str) -> dict[tuple[str, str], float]:
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return {
        (sample.name, sample.labels["queue"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_exporter_serves_each_queues_state_as_redis_holds_it(exporter_url) -> None:  # type: ignore[no-untyped-def]
    url, backend = exporter_url
    before = time.monotonic()
    values = scrape(url)
    took = time.monotonic() - before
    ages = {q: values.pop(("pyfiq_queue_oldest_age_seconds", q)) for q in EXPECTED}
    got = {q: tuple(values.pop((name, q)) for name in GAUGES if "age" not in name) for q in EXPECTED}
    assert got == EXPECTED
    assert values == {}, "only the queues of this prefix, each once, labelled by queue"
    assert 90 <= ages["exp.pending"] < 91 + took
    assert 60 <= ages["exp.flight"] < 61 + took  # in flight, so older than any pending task
    assert ages["exp.gone"] == 0
    for queue in ("exp.dead", "exp.paused", "exp.keyed"):
        assert 0 <= ages[queue] < 30, queue
    # A second scrape reads Redis again: what changed shows.
    backend.resume("exp.paused")
    put(backend, stream_name("exp.keyed", "d"), 2)
    values = scrape(url)
    assert values[("pyfiq_queue_paused", "exp.paused")] == 0
    assert values[("pyfiq_streams", "exp.keyed")] == 4 and values[("pyfiq_queue_depth", "exp.keyed")] == 6


def test_a_snapshot_reads_only_what_is_live(own_redis: RedisServer) -> None:
    backend = RedisQueueBackend(own_redis.url, prefix=unique_prefix(), shards=4)
    lay_out(backend)
    client = own_redis.client()
    client.config_resetstat()
    _, states = snapshot(backend)
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): s["calls"] for name, s in stats.items()}
    calls.pop("config|resetstat", None)
    live = ["exp.pending", "exp.flight", "exp.dead", "exp.paused", *(f"exp.keyed#{k}" for k in "abc")]
    ready_sets = {(backend.keys.shard_of(s), s.split("#")[0]) for s in live}
    assert sum(state.streams for state in states.values()) == len(live)
    assert calls == {
        "time": 1,
        "get": 1,  # the layout, checked against --shards
        "zrange": 4 + len(ready_sets),  # each shard's queue index, then each ready set in it
        "smembers": 2 * 4,  # each shard's dead-letter and pause sets
        "llen": 2 * len(live),
        "lindex": 2 * len(live),
        "zcard": 2,  # each stream with dead letters
    }
    backend.close()


def test_the_collector_serves_from_an_applications_own_registry() -> None:
    backend = RedisQueueBackend(f"memory://{unique_prefix()}", shards=2)
    put(backend, stream_name("exp.mem", "a"), 2)
    put(backend, stream_name("exp.mem", "b"), 1)
    registry = CollectorRegistry()
    registry.register(QueueCollector(backend))
    assert registry.get_sample_value("pyfiq_queue_depth", {"queue": "exp.mem"}) == 3
    assert registry.get_sample_value("pyfiq_streams", {"queue": "exp.mem"}) == 2
    backend.skip(stream_name("exp.mem", "b"))
    assert registry.get_sample_value("pyfiq_streams", {"queue": "exp.mem"}) == 1
    assert registry.get_sample_value("pyfiq_dead_letters", {"queue": "exp.mem"}) == 1
