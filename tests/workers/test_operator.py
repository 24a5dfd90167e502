"""Operator actions on running workers: pause / resume a queue or one keyed stream, skip a
blocked head, see who holds a lease; against a real redis-server, two workers sharing queues."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from click.testing import CliRunner

import pyfiq
from pyfiq import RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.engine.scheduler import IDLE_BEAT_ROUNDS
from pyfiq.ops.cli import main
from tests.support.helpers import FAST, unique_prefix, wait_until


def qname() -> str:
    return f"op-{uuid.uuid4().hex[:8]}"


def test_a_paused_queue_starts_nothing_anywhere_until_resumed(redis_server: Any) -> None:
    prefix = unique_prefix()
    producer = RedisQueueBackend(redis_server.url, prefix=prefix, **FAST)
    pyfiq.configure(producer)
    q, ran, gate = qname(), [], threading.Event()

    @fifo(queue=q, name=f"{q}.t", key=lambda k, i: k)
    def t(k: str, i: int) -> None:
        if i == 0:
            gate.wait(5)
        ran.append((k, i))

    t("a", 0)
    workers = [ThreadedWorker(RedisQueueBackend(redis_server.url, prefix=prefix, **FAST), queues=[q]) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: any(w.held_streams for w in workers), timeout=5)
        producer.pause(q)  # while a#0 runs: it finishes, nothing new starts
        for i in range(1, 4):
            t("a", i)
            t("b", i)
        gate.set()
        wait_until(lambda: ran == [("a", 0)], timeout=5)
        time.sleep(1.0)  # several polls of both workers
        assert ran == [("a", 0)], "a paused queue started a task"
        assert producer.paused() == [q]
        assert producer.queue_info(f"{q}#a")["paused"] and producer.queue_info(f"{q}#b")["pending"] == 3
        producer.resume(q)
        wait_until(lambda: len(ran) == 7, timeout=10)
    finally:
        for w in workers:
            w.stop(5)
    assert [i for k, i in ran if k == "a"] == [0, 1, 2, 3] and [i for k, i in ran if k == "b"] == [1, 2, 3]


def test_pausing_one_stream_leaves_the_others_running(redis_backend: RedisQueueBackend) -> None:
    pyfiq.configure(redis_backend)
    q, ran = qname(), []

    @fifo(queue=q, name=f"{q}.t", key=lambda k, i: k)
    def t(k: str, i: int) -> None:
        ran.append((k, i))

    redis_backend.pause(q, "slow")
    for i in range(3):
        t("slow", i)
        t("fast", i)
    with ThreadedWorker(redis_backend, queues=[q]):
        wait_until(lambda: len(ran) == 3, timeout=10)
        time.sleep(0.5)
        assert ran == [("fast", 0), ("fast", 1), ("fast", 2)]
        redis_backend.resume(q, "slow")
        wait_until(lambda: len(ran) == 6, timeout=10)


def test_skip_dead_letters_a_blocked_head_and_the_stream_moves_on(redis_backend: RedisQueueBackend) -> None:
    pyfiq.configure(redis_backend)
    q, ran = qname(), []

    @fifo(queue=q, name=f"{q}.t", max_retries=-1, retry_wait=0.05)
    def t(i: int) -> None:
        if i == 0:
            raise RuntimeError("the downstream rejects this one forever")
        ran.append(i)

    for i in range(3):
        t(i)
    with ThreadedWorker(redis_backend, queues=[q]) as w:
        wait_until(lambda: w.held_streams == [q], timeout=5)
        time.sleep(0.3)
        assert ran == []
        holder = redis_backend.queue_info(q)["holder"]
        assert holder == w.replica, "the lease names its holder"
        task_id = redis_backend.skip(q, "ticket OPS-12")
        wait_until(lambda: ran == [1, 2], timeout=10)
    (dead,) = redis_backend.dead_letters(q)
    assert dead.reason == "operator" and dead.task_id == task_id and "OPS-12" in dead.header["error"]
    assert redis_backend.skip(q) is None


def test_the_cli_pauses_resumes_skips_and_shows_the_holder(redis_backend: RedisQueueBackend) -> None:
    pyfiq.configure(redis_backend)
    q = qname()

    @fifo(queue=q, name=f"{q}.t")
    def t(i: int) -> None:
        pass

    t(1)
    opts = ["--redis", redis_backend.url, "--prefix", redis_backend.keys.prefix, "--shards", "4"]
    runner = CliRunner()
    result = runner.invoke(main, ["queue", "pause", *opts, q])
    assert result.exit_code == 0 and f"paused {q}" in result.output
    result = runner.invoke(main, ["status", *opts])
    assert result.exit_code == 0 and q in result.output and "paused" in result.output
    result = runner.invoke(main, ["queue", "resume", *opts, q])
    assert result.exit_code == 0 and redis_backend.paused() == []
    result = runner.invoke(main, ["queue", "skip", *opts, q])
    assert result.exit_code == 0 and "dead-lettered" in result.output
    result = runner.invoke(main, ["queue", "skip", *opts, q])
    assert result.exit_code != 0 and "holds no task" in result.output


def test_replicas_register_through_their_heartbeats_with_what_they_hold(redis_backend: RedisQueueBackend) -> None:
    pyfiq.configure(redis_backend)
    q, gate = qname(), threading.Event()

    @fifo(queue=q, name=f"{q}.t")
    def t() -> None:
        gate.wait(5)

    t()
    with ThreadedWorker(redis_backend, queues=[q]) as w:
        wait_until(lambda: w.held_streams == [q], timeout=5)
        wait_until(lambda: any(r["held"] == [q] for r in redis_backend.replicas()), timeout=5)
        (row,) = redis_backend.replicas()
        assert row["replica"] == w.replica and row["driver"] == "threaded" and row["silent_s"] < 1.5
        result = CliRunner().invoke(
            main, ["replicas", "--redis", redis_backend.url, "--prefix", redis_backend.keys.prefix]
        )
        assert result.exit_code == 0 and w.replica in result.output and q in result.output
        gate.set()
    # Listed while its last heartbeat is within 3 registry intervals (an idle replica's rhythm).
    time.sleep(3 * IDLE_BEAT_ROUNDS * redis_backend.settings.effective_heartbeat + 0.2)
    assert redis_backend.replicas() == [], "a stopped replica is no longer listed as live"
    assert [r["replica"] for r in redis_backend.replicas(include_silent=True)] == [w.replica]


def test_an_operator_action_right_after_a_redis_restart_is_carried_out(own_redis: Any) -> None:
    """A long-lived backend (a dashboard, an app) keeps idle connections; after Redis restarted
    they are dead. A skip (which may not be sent twice) must not fail on one of them."""
    backend = RedisQueueBackend(own_redis.url, prefix=unique_prefix(), **FAST)
    pyfiq.configure(backend)
    q = qname()

    @fifo(queue=q, name=f"{q}.t")
    def t(i: int) -> None: ...

    t(0)
    t(1)
    assert backend.queue_info(q)["pending"] == 2  # connections made and left idle
    backend.skip(q, "warm")
    own_redis.restart()
    assert backend.skip(q, "after the restart") is not None
    assert [d.reason for d in backend.dead_letters(q)] == ["operator", "operator"]
    backend.close()


def test_queue_skip_takes_the_stream_as_every_command_does_or_as_queue_hash_key(
    redis_backend: RedisQueueBackend,
) -> None:
    pyfiq.configure(redis_backend)
    q = qname()

    @fifo(queue=q, name=f"{q}.t", key=lambda k, i: k)
    def t(k: str, i: int) -> None:
        pass

    for i in range(3):
        t("c-11", i)
    opts = ["--redis", redis_backend.url, "--prefix", redis_backend.keys.prefix, "--shards", "4"]
    runner = CliRunner()
    result = runner.invoke(main, ["queue", "skip", *opts, q, "--stream", "c-11"])
    assert result.exit_code == 0 and "dead-lettered" in result.output, result.output
    result = runner.invoke(main, ["queue", "skip", *opts, f"{q}#c-11"])
    assert result.exit_code == 0 and "dead-lettered" in result.output, result.output
    assert redis_backend.queue_info(f"{q}#c-11")["dead"] == 2 and redis_backend.queue_info(f"{q}#c-11")["pending"] == 1
    result = runner.invoke(main, ["queue", "skip", *opts, f"{q}#c-11", "--stream", "c-12"])
    assert result.exit_code == 2 and "give it once" in result.output
