"""What a worker's heartbeat tells operators: the task each held stream runs and since when, and
the worker's rate; against a real redis-server. Redis itself knows when a task started only for
the first task of each hand-out, so status and the dashboard read the rest from the heartbeat."""

from __future__ import annotations

import threading
import time

from pyfiq import RedisQueueBackend, ThreadedWorker, fifo
from tests.support.helpers import wait_until
from tests.workers.test_worker import qname


def test_a_head_taken_ahead_shows_as_running_and_blocked(redis_backend: RedisQueueBackend) -> None:
    q, gate, started = qname(), threading.Event(), threading.Event()

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        if i == 2:
            started.set()
            gate.wait(10)

    handles = [work.send_with_options(args=(i,), backend=redis_backend) for i in range(3)]
    worker = ThreadedWorker(redis_backend, queues=[q]).start()
    try:
        assert started.wait(10)
        blocked_id = handles[2].id
        meta = redis_backend.keys.stream(q).meta
        assert redis_backend.client.hget(meta, f"s:{blocked_id}") is None, "taken ahead: Redis has no start mark"

        def said() -> list[dict[str, object]]:
            return [r for r in redis_backend.replicas() if q in r.get("running", {})]

        wait_until(lambda: bool(said()), message="a heartbeat naming the running task")
        (replica,) = said()
        task_id, since_ms = replica["running"][q]  # type: ignore[index]
        assert task_id == blocked_id
        assert 0 <= redis_backend.admin.redis_now_ms() - since_ms < 10_000, "on Redis's clock"
        time.sleep(0.3)
        wait_until(lambda: redis_backend.admin.read_streams([q])[0].head.id == blocked_id)  # type: ignore[union-attr]
        detail = redis_backend.admin.read_streams([q], blocked_after=0.2)[0]
        assert detail.running_s is not None and detail.running_s >= 0.2
        assert detail.blocked and detail.holder == worker.replica
        assert redis_backend.admin.stream_status(q).as_dict()["running_s"] is not None
    finally:
        gate.set()
        worker.stop(timeout=10)


def test_the_heartbeat_counts_the_tasks_a_worker_ended(redis_backend: RedisQueueBackend) -> None:
    q = qname()

    @fifo(queue=q, name=f"{q}.work")
    def work(i: int) -> None:
        pass

    work.enqueue_many([(i,) for i in range(40)], backend=redis_backend)
    with ThreadedWorker(redis_backend, queues=[q]) as worker:

        def mine() -> dict[str, object]:
            return next((r for r in redis_backend.replicas() if r["replica"] == worker.replica), {})

        wait_until(lambda: mine().get("done") == 40, message="a heartbeat counting all 40 tasks")
        assert float(mine()["tasks_per_s"]) > 0  # type: ignore[arg-type]
        assert mine()["running"] == {}
