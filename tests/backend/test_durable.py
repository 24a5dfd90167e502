"""Durable mode (``Settings.min_replicas``) on a real primary with a real replica: each state
change is followed by WAIT on the connection that made it, so an enqueue that returns is on the
replica, one the replica cannot confirm raises ``NotReplicatedError`` saying the task is
stored, and workers wait after each step but carry on (logging) when the replica lags."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import pyfiq
from pyfiq import NotReplicatedError, RedisQueueBackend, Settings, ThreadedWorker, fifo
from pyfiq.errors import BackendUnavailableError, ConfigurationError
from pyfiq_harness.servers import Node
from pyfiq_harness.topologies import Replicated
from tests.support.helpers import FAST, unique_prefix, wait_until
from tests.workers.test_worker import AsyncWorkerInThread

DURABLE = {**FAST, "min_replicas": 1, "replica_timeout": 0.5}


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"min_replicas": -1}, "min_replicas"),
        ({"min_replicas": True}, "min_replicas"),
        ({"min_replicas": 1.5}, "min_replicas"),
        ({"min_replicas": 101}, "min_replicas"),
        ({"replica_timeout": 0}, "replica_timeout"),
        ({"replica_timeout": 0.0004}, "replica_timeout"),
        ({"replica_timeout": float("inf")}, "replica_timeout"),
        ({"replica_timeout": "1"}, "replica_timeout"),
        ({"min_replicas": 1, "lease_ttl": 1.5, "replica_timeout": 0.6}, "replica_timeout"),
    ],
)
def test_settings_refuse_a_bad_durable_mode(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        Settings(**changes)


def test_durable_mode_is_off_by_default_and_memory_has_no_replicas_to_wait_for() -> None:
    assert not Settings().durable
    assert Settings(min_replicas=2).durable
    with pytest.raises(ConfigurationError, match="memory:// has no replicas"):
        RedisQueueBackend("memory://durable", min_replicas=1)


def test_the_script_table_says_which_steps_wait_and_whose_callers_hear_of_a_shortfall() -> None:
    """Every step that changes what a stream holds waits; polls, heartbeats, halt confirmations
    and rate windows do not. Only a producer's and an operator's steps raise a shortfall."""
    from pyfiq.backend.durable import RAISED, WAITED

    operator = {"skip", "requeue", "delete_pending", "dead_letter_pending"}
    assert {"enqueue", "acquire", "take", "dead_letter", "release", "lost", "tick"} | operator == WAITED
    assert {"enqueue"} | operator == RAISED


def test_a_step_waited_for_only_in_durable_mode() -> None:
    from pyfiq.backend.durable import waited
    from pyfiq.engine.keys import KeySchema
    from pyfiq.engine.protocol import ScriptCalls

    ops = ScriptCalls(KeySchema("t", 2), Settings())
    enqueue, due = ops.enqueue("q", [("a" * 32, 0, "0", b"x")]), ops.due(0, 1, None)
    durable = SimpleNamespace(settings=Settings(min_replicas=1))
    assert waited(durable, enqueue) and not waited(durable, due)
    assert not waited(SimpleNamespace(settings=Settings()), enqueue)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicated]:
    servers = Replicated(tmp_path_factory.mktemp("replicated")).start()
    yield servers
    servers.stop()


@pytest.fixture
def healthy(replicated: Replicated) -> Iterator[Replicated]:
    """The module's servers, the replica resumed and linked again whatever the test did."""
    yield replicated
    for node in replicated.replicas:
        node.resume()
    replicated.wait_ready()


def _waits(node: Node) -> int:
    c = node.client()
    try:
        return int(c.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
    finally:
        c.close()


def _pending_on(node: Node, backend: RedisQueueBackend, stream: str) -> int:
    c = node.client()
    try:
        return int(c.llen(backend.keys.stream(stream).pending))
    finally:
        c.close()


@pytest.mark.parametrize("side", ["sync", "asyncio"])
def test_a_durable_enqueue_is_on_the_replica_when_it_returns(healthy: Replicated, side: str) -> None:
    backend = RedisQueueBackend(healthy.url, prefix=unique_prefix(), **DURABLE)
    pyfiq.configure(backend)
    q = f"durable-{side}"

    @fifo(queue=q, name=f"{q}.noop")
    def noop(i: int) -> None: ...

    @fifo(queue=q, name=f"{q}.anoop")
    async def anoop(i: int) -> None: ...

    async def enqueue_async(n: int) -> list[int]:
        seen = []
        for i in range(n):
            await anoop(i)
            seen.append(_pending_on(healthy.replicas[0], backend, q))
        await backend.aclose()
        return seen

    # The first call loads the script (NOSCRIPT, then a second EVALSHA + WAIT): not counted, nor
    # is the first call to q's shard, which lays it out (a refusal, then the call again).
    backend.enqueuer.enqueue("warm", backend.encode([("9" * 32, pyfiq.task.TaskRecord("warm", [], {}))]))
    backend.transport.lay_out(backend.keys.shard_of(q))
    waits_before = _waits(healthy.primary)
    if side == "sync":
        seen = []
        for i in range(30):
            noop(i)
            seen.append(_pending_on(healthy.replicas[0], backend, q))
    else:
        seen = asyncio.run(enqueue_async(30))
    backend.close()
    # Read from the replica right after each enqueue returned: it already had every one.
    assert seen == list(range(1, 31))
    assert _waits(healthy.primary) - waits_before == 30, "one WAIT per enqueue"


@pytest.mark.parametrize("side", ["sync", "asyncio"])
def test_a_stalled_replica_makes_a_durable_enqueue_raise_saying_the_task_is_stored(
    healthy: Replicated, side: str
) -> None:
    prefix = unique_prefix()
    durable = RedisQueueBackend(healthy.url, prefix=prefix, **DURABLE)
    plain = RedisQueueBackend(healthy.url, prefix=prefix, **FAST)
    q = f"stalled-{side}"
    items = durable.encode([(f"{i:032x}", pyfiq.task.TaskRecord(f"{q}.noop", [i], {})) for i in range(1)])
    plain.enqueuer.enqueue(q, plain.encode([("f" * 32, pyfiq.task.TaskRecord(f"{q}.noop", [0], {}))]))
    healthy.replicas[0].pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(NotReplicatedError) as caught:
            if side == "sync":
                durable.enqueuer.enqueue(q, items)
            else:
                asyncio.run(_aenqueue(durable, q, items))
        waited = time.monotonic() - t0
        t0 = time.monotonic()
        plain.enqueuer.enqueue(q, plain.encode([("e" * 32, pyfiq.task.TaskRecord(f"{q}.noop", [2], {}))]))
        unwaited = time.monotonic() - t0
    finally:
        healthy.replicas[0].resume()
    err = caught.value
    assert isinstance(err, BackendUnavailableError)  # enqueue_many reports it as maybe stored
    assert err.task_ids == ["0" * 32] and (err.replicas, err.wanted) == (0, 1)
    assert "ARE stored" in str(err) and "0 of 1 replicas" in str(err) and "dedup_key" in str(err)
    assert 0.45 < waited < 2.0, "a shortfall is reported after replica_timeout, not sooner or much later"
    # Below replica_timeout (0.5 s), which a wait would take at least.
    assert unwaited < 0.45, "without durable mode the same enqueue does not wait"
    # Stored on the primary as the message says, and the replica has it once it runs again.
    assert plain.queue_info(q)["pending"] == 3
    wait_until(lambda: _pending_on(healthy.replicas[0], plain, q) == 3, timeout=10)
    durable.close()
    plain.close()


@pytest.mark.parametrize("side", ["sync", "asyncio"])
@pytest.mark.parametrize("where", ["redis_options", "url"])
def test_a_replica_timeout_past_the_socket_timeout_reports_the_shortfall_and_stores_once(
    healthy: Replicated, side: str, where: str
) -> None:
    """``replica_timeout`` longer than the connection's socket timeout (the review's 6 s against
    5 s, scaled down to 1 s against 0.4 s): WAIT's reply is read with the replica timeout on top
    of the socket timeout, so a stalled replica is reported as what it is, and the task, stored
    on the primary, is not sent again: before, the socket gave up first, the enqueue was retried
    as a transient failure, stored twice or more, and ``BackendUnavailableError`` raised."""
    prefix = unique_prefix()
    settings: dict[str, Any] = {**DURABLE, "lease_ttl": 3.0, "replica_timeout": 1.0, "enqueue_timeout": 3.0}
    url = healthy.url
    if where == "url":
        url += "?socket_timeout=0.4"
    else:
        settings["redis_options"] = {"socket_timeout": 0.4}
    durable = RedisQueueBackend(url, prefix=prefix, **settings)
    plain = RedisQueueBackend(healthy.url, prefix=prefix, **FAST)
    q = f"outlived-{side}-{where}"
    record = pyfiq.task.TaskRecord(f"{q}.noop", [], {})
    durable.enqueuer.enqueue(q, durable.encode([("a" * 32, record)]))  # laid out, the script loaded
    task_id = uuid.uuid4().hex
    items = durable.encode([(task_id, record)])
    healthy.replicas[0].pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(NotReplicatedError) as caught:
            if side == "sync":
                durable.enqueuer.enqueue(q, items)
            else:
                asyncio.run(_aenqueue(durable, q, items))
        waited = time.monotonic() - t0
    finally:
        healthy.replicas[0].resume()
    try:
        assert caught.value.task_ids == [task_id] and (caught.value.replicas, caught.value.wanted) == (0, 1)
        assert 0.9 < waited < 2.5, f"reported after {waited:.2f} s, not after replica_timeout"
        stored = [pyfiq.task.Entry.parse(r).id for r in plain.client.lrange(plain.keys.stream(q).pending, 0, -1)]
        assert stored.count(task_id) == 1, f"the task is stored {stored.count(task_id)} times"
    finally:
        durable.close()
        plain.close()


@pytest.mark.parametrize("side", ["sync", "asyncio"])
def test_a_durable_enqueue_whose_connection_is_lost_during_wait_says_it_is_stored_and_stores_once(
    healthy: Replicated, side: str
) -> None:
    """The script ran (its reply came) and the connection is lost while WAIT waits (the primary
    killed in a failover, a proxy cutting idle-looking connections): the task IS stored on the
    primary, unconfirmed, which is what ``NotReplicatedError`` says; it is not sent again."""
    prefix = unique_prefix()
    durable = RedisQueueBackend(healthy.url, prefix=prefix, **{**DURABLE, "lease_ttl": 6.0, "replica_timeout": 2.0})
    plain = RedisQueueBackend(healthy.url, prefix=prefix, **FAST)
    q = f"cut-{side}"
    record = pyfiq.task.TaskRecord(f"{q}.noop", [], {})
    durable.enqueuer.enqueue(q, durable.encode([("a" * 32, record)]))  # laid out, the script loaded
    task_id = uuid.uuid4().hex
    items = durable.encode([(task_id, record)])
    killer = healthy.primary.client()

    def cut() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            waiting = [c for c in killer.client_list() if c.get("cmd") == "wait" and "b" in c.get("flags", "")]
            if waiting:
                killer.client_kill_filter(_id=waiting[0]["id"])
                return
            time.sleep(0.02)

    healthy.replicas[0].pause()
    cutter = threading.Thread(target=cut, daemon=True)
    try:
        cutter.start()
        with pytest.raises(BackendUnavailableError) as caught:
            if side == "sync":
                durable.enqueuer.enqueue(q, items)
            else:
                asyncio.run(_aenqueue(durable, q, items))
    finally:
        cutter.join(10)
        healthy.replicas[0].resume()
        killer.close()
    try:
        stored = [pyfiq.task.Entry.parse(r).id for r in plain.client.lrange(plain.keys.stream(q).pending, 0, -1)]
        assert stored.count(task_id) == 1, f"the task is stored {stored.count(task_id)} times"
        assert isinstance(caught.value, NotReplicatedError) and caught.value.task_ids == [task_id]
        assert "ARE stored" in str(caught.value) and "connection was lost" in str(caught.value)
    finally:
        durable.close()
        plain.close()


async def _aenqueue(backend: RedisQueueBackend, q: str, items: Any) -> None:
    try:
        await backend.enqueuer.aenqueue(q, items)
    finally:
        await backend.aclose()


@pytest.mark.parametrize("driver", ["threaded", "asyncio"])
def test_workers_wait_after_each_step_and_carry_on_logging_when_the_replica_lags(
    healthy: Replicated, driver: str, caplog: Any
) -> None:
    caplog.set_level(logging.WARNING, logger="pyfiq")
    prefix = unique_prefix()
    backend = RedisQueueBackend(healthy.url, prefix=prefix, **DURABLE)
    producer = RedisQueueBackend(healthy.url, prefix=prefix, **FAST)
    pyfiq.configure(producer)
    q, ran, lock = f"steps-{driver}", [], threading.Lock()

    @fifo(queue=q, name=f"{q}.step")
    def step(i: int) -> None:
        with lock:
            ran.append(i)

    waits_before = _waits(healthy.primary)
    worker: Any = (
        ThreadedWorker(backend, queues=[q]) if driver == "threaded" else AsyncWorkerInThread(backend, queues=[q])
    )
    worker.start()
    try:
        for i in range(20):
            step(i)
        wait_until(lambda: len(ran) == 20, timeout=20, message="20 tasks on a healthy replica")
        wait_until(lambda: producer.queue_info(q)["inflight"] == 0, timeout=10)
        # At least an acquire and a take that acknowledged the last task, each waited.
        assert _waits(healthy.primary) - waits_before >= 2
        assert not [r for r in caplog.records if "not_replicated" in r.getMessage()]
        healthy.replicas[0].pause()
        for i in range(20, 23):
            step(i)
        wait_until(lambda: len(ran) == 23, timeout=20, message="tasks run while the replica is stalled")
    finally:
        healthy.replicas[0].resume()
        worker.stop(10)
        if isinstance(worker, AsyncWorkerInThread):
            worker.close()
        backend.close()
        producer.close()
    assert ran == list(range(23))
    assert any("pyfiq.not_replicated" in r.getMessage() and "wanted=1" in r.getMessage() for r in caplog.records)


def test_a_script_redis_lost_is_loaded_again_before_the_wait(healthy: Replicated) -> None:
    backend = RedisQueueBackend(healthy.url, prefix=unique_prefix(), **DURABLE)
    record = pyfiq.task.TaskRecord("lost.noop", [], {})
    backend.enqueuer.enqueue("lost", backend.encode([("a" * 32, record)]))
    c = healthy.primary.client()
    c.script_flush()
    c.close()
    assert backend.enqueuer.enqueue("lost", backend.encode([("b" * 32, record)])) == [("b" * 32, True)]
    assert _pending_on(healthy.replicas[0], backend, "lost") == 2
    backend.close()


def test_durable_operator_actions_raise_when_not_replicated(healthy: Replicated, tmp_path: Path) -> None:
    backend = RedisQueueBackend(healthy.url, prefix=unique_prefix(), **DURABLE)
    record = pyfiq.task.TaskRecord("op.noop", [], {})
    backend.enqueuer.enqueue("op", backend.encode([("c" * 32, record)]))
    healthy.replicas[0].pause()
    try:
        with pytest.raises(NotReplicatedError, match=r"the skip on .* IS applied"):
            backend.skip("op")
    finally:
        healthy.replicas[0].resume()
    assert [d.task_id for d in backend.dead_letters("op")] == ["c" * 32]
    backend.close()


def test_stored_results_reach_the_replica(healthy: Replicated) -> None:
    """Results are written by the scripts that acknowledge, which durable mode follows with
    WAIT, so the replica holds each of them (a failover keeps it). A waiter may read a result
    on the primary a moment before the replica confirms it, as it may read any state."""
    prefix = unique_prefix()
    backend = RedisQueueBackend(healthy.url, prefix=prefix, **DURABLE)
    pyfiq.configure(backend)
    q = f"results-{prefix}"

    @fifo(queue=q, name=f"{q}.double", store_result=True)
    def double(i: int) -> int:
        return 2 * i

    worker = ThreadedWorker(backend, queues=[q]).start()
    try:
        handles = [double(i) for i in range(10)]
        assert [h.result(timeout=20) for h in handles] == [2 * i for i in range(10)]
        replica = healthy.replicas[0].client()
        try:
            wait_until(lambda: replica.get(backend.keys.stream(q).result(handles[-1].id)) is not None, timeout=5)
            assert all(replica.exists(backend.keys.stream(q).result(h.id)) for h in handles)
        finally:
            replica.close()
    finally:
        worker.stop(10)
        backend.close()
