"""The behaviour suite again, on a real Redis Cluster (3 primaries, 3 replicas) through
``RedisQueueBackend(url, cluster=True)``: every worker test of ``tests/workers/test_worker.py``
that runs on a backend, with both drivers, the keyed-stream tests, the asyncio tests, the
results tests (a result's key and channel in its stream's slot) and the delayed and periodic
tasks' (a stream's delayed tasks and a schedule's record in the stream's slot).

Tests that take the ``backend`` (or ``rb``, ``rbackend``) fixture are collected here a second
time with that fixture bound to the cluster; tests bound to a single server (killing it,
counting its commands) stay where they are."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest

import pyfiq
from pyfiq import RedisQueueBackend
from pyfiq_harness.topologies import Cluster
from tests.support.helpers import FAST, unique_prefix
from tests.workers import test_asyncio, test_periodic, test_results, test_streams, test_worker

#: Fixtures that stand for "a backend on a real Redis" in the modules re-collected here.
BACKEND_FIXTURES = {"backend", "rb", "rbackend"}
#: Tests about one server's own counters (INFO commandstats), which a cluster spreads out.
SINGLE_SERVER_ONLY = {"test_idle_cost_does_not_grow_with_the_number_of_streams"}


def _collect(module: Any) -> None:
    for name, value in vars(module).items():
        if not name.startswith("test_") or not callable(value) or name in SINGLE_SERVER_ONLY:
            continue
        if BACKEND_FIXTURES & set(inspect.signature(value).parameters):
            globals()[name] = value


for _module in (test_worker, test_streams, test_asyncio, test_results, test_periodic):
    _collect(_module)

start_worker = test_worker.start_worker
driver = test_results.driver


def _cluster_backend(cluster: Cluster) -> RedisQueueBackend:
    return RedisQueueBackend(cluster.url, cluster=True, prefix=unique_prefix(), **FAST)


@pytest.fixture(params=["cluster"])
def backend(redis_cluster: Cluster) -> Iterator[RedisQueueBackend]:
    b = _cluster_backend(redis_cluster)
    pyfiq.configure(b)  # as test_results' own fixture does
    yield b
    b.close()


@pytest.fixture
def rb(redis_cluster: Cluster) -> Iterator[RedisQueueBackend]:
    b = _cluster_backend(redis_cluster)
    pyfiq.configure(b)  # as test_streams' own fixture does
    yield b
    b.close()


@pytest.fixture
def rbackend(redis_cluster: Cluster) -> Iterator[RedisQueueBackend]:
    b = _cluster_backend(redis_cluster)
    yield b
    b.close()


def test_the_suite_was_collected_here() -> None:
    """A rename in the re-collected modules must not silently empty this module."""
    collected = [n for n in globals() if n.startswith("test_") and n != "test_the_suite_was_collected_here"]
    assert len(collected) >= 30, collected
