"""A deployment with tasks in every state, for the dashboard's tests and its screenshots
(``scripts/screenshots.py``), served by uvicorn on a free port.

Queues (each test gets its own key prefix):

- ``billing``: 3 pending tasks, no worker consumes it.
- ``hooks``: keyed; ``c-1`` and ``c-2`` hold 2 pending tasks each; ``c-3`` only 2 dead letters
  (expired).
- ``mail``: paused, 1 pending task.
- ``stuck``: a worker retries its head task forever, holding the stream: blocked.
- ``work``: a worker ran 4 tasks to success and dead-lettered 1 (``exhausted``, with its
  traceback); the scripts counted both.
"""

from __future__ import annotations

import linecache
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn

import pyfiq
from pyfiq import RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.dashboard import create_app
from pyfiq.task import TaskRecord, new_task_id

SETTINGS: dict[str, Any] = {"lease_ttl": 1.5, "poll_interval": 0.1, "shards": 4}
#: The stuck queue's head runs longer than this before the screenshots and tests look.
BLOCKED_AFTER = 0.5

#: Executions of the scene's tasks, in order: (queue, argument).
ran: list[tuple[str, Any]] = []
#: Arguments of ``orders`` tasks that fail on their first run only.
fail_once: set[str] = set()


# The work queue's task, compiled under an application's file name (and given to linecache, so
# tracebacks show its source): a screenshot of its traceback shows no path of the machine that
# took it.
PAYMENTS = "app/payments.py"
_SOURCE = """\
def settle(invoice):
    ran.append(("work", invoice))
    if invoice < 0:
        raise RuntimeError(f"invoice {invoice} was refused by the payment provider")
"""
linecache.cache[PAYMENTS] = (len(_SOURCE), None, _SOURCE.splitlines(True), PAYMENTS)
_namespace: dict[str, Any] = {"ran": ran}
exec(compile(_SOURCE, PAYMENTS, "exec"), _namespace)
settle = fifo(queue="work", name="scene.settle", max_retries=0)(_namespace["settle"])


@fifo(queue="stuck", name="scene.sync_crm", max_retries=-1, retry_wait=0.05)
def sync_crm(account: str) -> None:
    raise ConnectionError(f"crm.example is unreachable for {account}")


@fifo(queue="orders", name="scene.ship", max_retries=0)
def ship(order: str) -> None:
    ran.append(("orders", order))
    if order in fail_once:
        fail_once.discard(order)
        raise RuntimeError(f"warehouse rejected {order}")


@fifo(queue="jobs", name="scene.job")
def job(n: int) -> None:
    ran.append(("jobs", n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


def enqueue(backend: RedisQueueBackend, stream: str, name: str, *args: Any, expires_in: float | None = None) -> str:
    task_id = new_task_id()
    backend.enqueue(stream, [(task_id, TaskRecord(name, list(args), {}))], expires_in=expires_in)
    return task_id


@dataclass
class Scene:
    backend: RedisQueueBackend
    workers: list[ThreadedWorker] = field(default_factory=list)

    def worker(self, queues: list[str], replica: str | None = None) -> ThreadedWorker:
        w = ThreadedWorker(self.backend, queues=queues, concurrency=4, replica=replica).start()
        self.workers.append(w)
        return w

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop(timeout=10)
        self.workers.clear()


def build_scene(url: str) -> Scene:
    """Fill a fresh prefix on the Redis at ``url`` with the queues of this module's docstring."""
    backend = RedisQueueBackend(url, prefix=f"d{uuid.uuid4().hex[:10]}", **SETTINGS)
    pyfiq.configure(backend)
    ran.clear()
    scene = Scene(backend)
    for i in range(3):
        enqueue(backend, "billing", "app.charge", f"c-{i}", 1000 + i)
    for key in ("c-1", "c-2"):
        for i in range(2):
            enqueue(backend, f"hooks#{key}", "app.deliver", {"event": i})
    for i in range(2):
        enqueue(backend, "hooks#c-3", "app.deliver", {"event": i}, expires_in=0.001)
    time.sleep(0.01)
    backend.call(backend.ops.acquire("hooks#c-3", 5))  # the claim dead-letters the expired tasks
    backend.pause("mail")
    enqueue(backend, "mail", "app.send", "welcome")
    for invoice in (1, 2, -3, 4, 5):
        settle(invoice)
    sync_crm("acme")
    scene.worker(["work", "stuck"], replica="web-1")
    wait_for(lambda: len(ran) == 5 and backend.queue_info("work")["dead"] == 1, what="the work queue to drain")
    wait_for(lambda: backend.queue_info("stuck")["inflight"] == 1, what="the stuck task to start")
    time.sleep(BLOCKED_AFTER + 0.2)
    return scene


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free local port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="dashboard-server", daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def dashboard(scene: Scene, **options: Any) -> Any:
    return create_app(scene.backend, blocked_after=BLOCKED_AFTER, **options)
