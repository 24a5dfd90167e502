"""``pyfiq_lifespan``: a worker that lives and dies with an ASGI app. In process (Starlette's
test client): the app's own lifespan around the worker, both worker kinds, the dashboard behind
a guard. Under a real ``uvicorn --workers 2``: both processes consume, each stream keeps its
order, and a SIGTERM stops both workers with their leases handed over."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient

from pyfiq import AsyncWorker, RedisQueueBackend, Registry, ThreadedWorker
from pyfiq.contrib.asgi import pyfiq_lifespan
from pyfiq.errors import ConfigurationError
from pyfiq_harness.servers import free_port, popen
from tests.contrib.apps.steps import read_journal
from tests.support.frameworks import APP_SETTINGS, APPS, app_env, children, per_stream, python, take_over
from tests.support.helpers import unique_prefix, wait_until

# -- in process ----------------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[RedisQueueBackend]:
    backend = RedisQueueBackend(f"memory://{uuid.uuid4().hex}", prefix=unique_prefix(), lease_ttl=1.5)
    yield backend
    backend.close()


def test_the_worker_runs_inside_the_apps_own_lifespan_and_stops_before_it_ends(memory: RedisQueueBackend) -> None:
    registry, ran, events = Registry(), [], []

    @registry.fifo(queue="asgi-unit", name="asgi.unit.record")
    async def record(i: int) -> None:
        ran.append(i)

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("app started")
        yield {"db": "pool"}
        # The worker has stopped by now: its tasks never outlive what they use.
        events.append(f"app stopping, worker {lifespan.worker}")

    lifespan = pyfiq_lifespan(memory, registry=registry, lifespan=own)
    app = FastAPI(lifespan=lifespan)

    @app.post("/record/{i}")
    async def post(i: int, request: Request) -> dict[str, str]:
        await record.aenqueue(i)
        return {"db": request.state.db}  # the app's own lifespan state reaches requests

    assert registry.get_backend() is memory, "the backend is the registry's at once"
    with TestClient(app) as client:
        assert events == ["app started"]
        running = lifespan.worker
        assert isinstance(running, AsyncWorker) and running.healthy
        for i in range(5):
            assert client.post(f"/record/{i}").json() == {"db": "pool"}
        wait_until(lambda: len(ran) == 5, message="the five tasks")
    assert ran == [0, 1, 2, 3, 4]
    assert events == ["app started", "app stopping, worker None"]
    assert not running.healthy and lifespan.worker is None


def test_a_threaded_worker_and_a_guarded_dashboard_mounted_once(memory: RedisQueueBackend) -> None:
    registry, ran = Registry(), []

    @registry.fifo(queue="asgi-threads", name="asgi.unit.thread")
    def record(i: int) -> None:
        ran.append((i, threading.current_thread().name))

    def operators_only(request: Request) -> None:
        if request.headers.get("x-operator") != "yes":
            raise HTTPException(403, "operators only")

    lifespan = pyfiq_lifespan(
        memory, worker="threaded", registry=registry, dashboard="/ops/pyfiq", guard=operators_only, read_only=True
    )
    app = FastAPI(lifespan=lifespan)

    @app.get("/{anything:path}")
    async def catch_all(anything: str) -> dict[str, str]:
        return {"caught": anything}

    for _ in range(2):  # a second startup (a restart, another test client) mounts nothing more
        with TestClient(app) as client:
            assert isinstance(lifespan.worker, ThreadedWorker)
            record(1)
            wait_until(lambda: len(ran) == 1, message="the task, in a worker thread")
            assert client.get("/ops/pyfiq/").status_code == 403
            page = client.get("/ops/pyfiq/", headers={"x-operator": "yes"})
            assert page.status_code == 200 and "pyfiq" in page.text, "mounted ahead of the catch-all route"
            assert client.get("/elsewhere").json() == {"caught": "elsewhere"}
        ran.clear()
    assert sum(getattr(r, "app", None) is lifespan._dashboard for r in app.router.routes) == 1


def test_each_run_of_one_lifespan_stops_the_worker_it_started(memory: RedisQueueBackend) -> None:
    """One lifespan object serving one app twice at once (nested test clients): the second
    startup's worker must not take the place of the first in what the first shutdown stops."""
    registry = Registry()

    @registry.fifo(queue="asgi-twice", name="asgi.unit.twice")
    def noop() -> None: ...

    lifespan = pyfiq_lifespan(memory, worker="threaded", concurrency=1, registry=registry)
    app = FastAPI(lifespan=lifespan)
    with TestClient(app):
        outer = lifespan.worker
        with TestClient(app):
            inner = lifespan.worker
            assert inner is not outer and outer is not None and inner is not None
        assert not inner.healthy, "the inner shutdown stopped the inner worker"
        assert outer.healthy, "the inner shutdown left the outer worker alone"
    assert not outer.healthy, "the outer shutdown stopped the worker it started"


def test_what_cannot_work_is_refused_when_made_or_at_startup(memory: RedisQueueBackend) -> None:
    with pytest.raises(ConfigurationError, match="'async', 'threaded' or None"):
        pyfiq_lifespan(memory, worker="thread")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="a path such as '/pyfiq'"):
        pyfiq_lifespan(memory, dashboard="pyfiq")
    with pytest.raises(ConfigurationError, match=r"not \['theme'\]"):
        pyfiq_lifespan(memory, dashboard="/pyfiq", dashboard_options={"theme": "dark"})
    with pytest.raises(ConfigurationError, match="at least 1"):
        pyfiq_lifespan(memory, concurrency=0)

    async def bare_asgi(scope: Any, receive: Any, send: Any) -> None: ...

    async def start() -> None:
        async with pyfiq_lifespan(memory, worker=None, dashboard="/pyfiq")(bare_asgi):
            pass

    with pytest.raises(ConfigurationError, match="Starlette or FastAPI app"):
        asyncio.run(start())


# -- under uvicorn --workers 2 -------------------------------------------------------------------------


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, prefix: str, base: str) -> None:
        self.proc, self.url, self.prefix, self.base = proc, url, prefix, base
        self.backend = RedisQueueBackend(url, prefix=prefix, **APP_SETTINGS)  # type: ignore[arg-type]

    def worker_pids(self) -> set[int]:
        return {int(r["pid"]) for r in self.backend.admin.replicas()}


@pytest.fixture(scope="module")
def uvicorn(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    prefix, port = unique_prefix(), free_port()
    argv = [python(), "-m", "uvicorn", "asgi_app:app", "--workers", "2", "--host", "127.0.0.1", "--port", str(port)]
    env = app_env(redis_server.url, prefix, APP_STEP_SECONDS="0.02")
    log = (tmp_path_factory.mktemp("uvicorn") / "uvicorn.log").open("wb")
    proc = popen([*argv, "--log-level", "warning"], cwd=APPS, env=env, stdout=log, stderr=subprocess.STDOUT)
    served = Served(proc, redis_server.url, prefix, f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: len(served.worker_pids()) == 2, timeout=30, message="both processes' workers")
        yield served
    finally:
        proc.kill()
        proc.wait(10)
        served.backend.close()
        log.close()


STREAMS = [f"s{i}" for i in range(6)]


def test_both_processes_consume_and_every_stream_keeps_its_order(uvicorn: Served) -> None:
    pids = uvicorn.worker_pids()
    # Its children are the two serving processes (and multiprocessing's resource tracker).
    assert len(pids) == 2 and pids <= set(children(uvicorn.proc.pid)), "a worker per serving process"
    assert uvicorn.proc.pid not in pids, "none in the supervisor"

    def post_stream(stream: str) -> None:
        with httpx.Client(base_url=uvicorn.base, timeout=10) as client:
            for seq in range(10):
                assert client.post(f"/steps/{stream}/{seq}").status_code == 200

    threads = [threading.Thread(target=post_stream, args=(s,)) for s in STREAMS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wait_until(lambda: len(read_journal(uvicorn.url, uvicorn.prefix)) == 60, timeout=20, message="60 steps")
    rows = read_journal(uvicorn.url, uvicorn.prefix)
    assert per_stream(rows) == {s: list(range(10)) for s in STREAMS}
    assert {pid for _, _, pid in rows} == pids, "both processes ran steps"
    assert httpx.get(f"{uvicorn.base}/pyfiq/").status_code == 200, "the dashboard is mounted"


def test_a_sigterm_stops_both_workers_and_hands_their_leases_over(uvicorn: Served) -> None:
    registry = Registry()
    registry.configure(uvicorn.backend)
    step = registry.fifo(queue="jobs", name="apps.step", key=lambda stream, seq: stream)(lambda stream, seq: None)
    for stream in STREAMS:
        step.enqueue_many([(stream, seq) for seq in range(10, 40)])
    wait_until(lambda: len(read_journal(uvicorn.url, uvicorn.prefix)) >= 80, message="the fleet is busy")
    started = time.monotonic()
    uvicorn.proc.send_signal(signal.SIGTERM)
    assert uvicorn.proc.wait(15) == 0
    stopped = time.monotonic() - started
    streams = [f"jobs#{s}" for s in STREAMS]
    assert all(uvicorn.backend.admin.stream_status(s).holder is None for s in streams), "every lease released"
    took = take_over(uvicorn.url, uvicorn.prefix, expected=240)
    assert took < 1.5, f"the next worker waited {took:.2f}s: a lease was left to lapse (TTL 6 s)"
    assert stopped < 6
    assert per_stream(read_journal(uvicorn.url, uvicorn.prefix)) == {s: list(range(40)) for s in STREAMS}
