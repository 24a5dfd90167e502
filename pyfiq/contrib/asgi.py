"""FastAPI, Starlette and any ASGI app: ``pyfiq_lifespan`` runs a worker for as long as the app.

    app = FastAPI(lifespan=pyfiq_lifespan(backend, concurrency=16, dashboard="/pyfiq", guard=require_operator))

An ASGI server runs the lifespan in every process that serves the app, after any fork (uvicorn
``--workers``, gunicorn's ``UvicornWorker``), so each process gets a worker of its own, and a
graceful shutdown (SIGTERM to the server) stops it: running tasks finish within
``stop_timeout`` and leases are handed over at once. The app's own lifespan composes:
``pyfiq_lifespan(backend, lifespan=my_lifespan)`` runs it around the worker, so the worker
starts after the app's startup and stops before its shutdown (the resources its tasks use
outlive it).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, nullcontext
from typing import Any, Literal

from ..backend.backend import RedisQueueBackend
from ..errors import ConfigurationError
from ..functions import Registry, default_registry
from ..workers.aio import AsyncWorker
from ..workers.threaded import ThreadedWorker

__all__ = ["PyfiqLifespan", "pyfiq_lifespan"]

#: ``"async"``: an AsyncWorker on the app's event loop; ``"threaded"``: a ThreadedWorker beside it.
WorkerKind = Literal["async", "threaded"]
#: An app's lifespan: called with the app, an async context manager around its serving.
Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


class PyfiqLifespan:
    """An ASGI lifespan (``FastAPI(lifespan=...)``, ``Starlette(lifespan=...)``) that runs a
    pyfiq worker with the app; made by [`pyfiq_lifespan`][pyfiq.contrib.asgi.pyfiq_lifespan], whose arguments it keeps.
    ``worker`` is the worker running now (None outside the app's lifespan)."""

    def __init__(
        self,
        backend: RedisQueueBackend | None,
        *,
        worker: WorkerKind | None,
        concurrency: int | None,
        queues: Iterable[str] | None,
        registry: Registry | None,
        stop_timeout: float,
        lifespan: Lifespan | None,
        dashboard: str | Literal[False] | None,
        guard: Callable[[Any], Any] | None,
        read_only: bool,
        dashboard_options: Mapping[str, Any] | None,
    ) -> None:
        _check(worker, concurrency, stop_timeout, dashboard, dashboard_options)
        self.registry = default_registry if registry is None else registry
        if backend is not None:
            self.registry.configure(backend)
        self._backend = backend
        self.kind = worker
        self.concurrency = concurrency
        self.queues = None if queues is None else list(queues)
        self.stop_timeout = stop_timeout
        self.lifespan = lifespan
        self.dashboard = dashboard or None
        self.dashboard_options = {"guard": guard, "read_only": read_only, **(dashboard_options or {})}
        self.worker: AsyncWorker | ThreadedWorker | None = None
        self._dashboard: Any = None

    @property
    def backend(self) -> RedisQueueBackend:
        """The backend given, else the registry's (``pyfiq.configure``) at the app's startup."""
        return self._backend or self.registry.get_backend()

    def __call__(self, app: Any) -> AbstractAsyncContextManager[Any]:
        return self._serve(app)

    @asynccontextmanager
    async def _serve(self, app: Any) -> AsyncIterator[Any]:
        backend = self.backend
        if self.dashboard is not None:
            self._mount(app, backend)
        # Exits run in reverse: the worker stops, then the app's own shutdown, then the asyncio
        # client (bound to this loop) is closed, also if the app's shutdown enqueued.
        async with AsyncExitStack() as stack:
            stack.push_async_callback(backend.aclose)
            state = await stack.enter_async_context(self.lifespan(app) if self.lifespan else nullcontext())
            if self.kind is not None:
                # Each run of the lifespan stops the worker it started: one lifespan object
                # may serve two apps, or one app twice at once (nested test clients).
                worker = await self._start(backend)
                stack.push_async_callback(self._stop, worker)
            yield state

    async def _start(self, backend: RedisQueueBackend) -> AsyncWorker | ThreadedWorker:
        options: dict[str, Any] = {"registry": self.registry, "queues": self.queues}
        if self.concurrency is not None:
            options["concurrency"] = self.concurrency
        worker: AsyncWorker | ThreadedWorker
        if self.kind == "async":
            worker = await AsyncWorker(backend, **options).start()
        else:
            # Its start checks Redis (a round trip) and its stop waits for tasks: off the loop.
            worker = await asyncio.to_thread(ThreadedWorker(backend, **options).start)
        self.worker = worker
        return worker

    async def _stop(self, worker: AsyncWorker | ThreadedWorker) -> None:
        if self.worker is worker:
            self.worker = None
        if isinstance(worker, AsyncWorker):
            await worker.stop(self.stop_timeout)
        else:
            await asyncio.to_thread(worker.stop, self.stop_timeout)

    def _mount(self, app: Any, backend: RedisQueueBackend) -> None:
        routes = getattr(getattr(app, "router", None), "routes", None)
        if not isinstance(routes, list):
            raise ConfigurationError(
                f"dashboard= mounts the dashboard in a Starlette or FastAPI app, not in {type(app).__name__}: "
                "mount pyfiq.dashboard.create_app(backend) yourself"
            )
        if self._dashboard is not None and any(getattr(r, "app", None) is self._dashboard for r in routes):
            return  # mounted by an earlier startup of this app (a test client, a restart)
        from starlette.routing import Mount

        from ..dashboard import create_app

        assert self.dashboard is not None
        self._dashboard = self._dashboard or create_app(backend, **self.dashboard_options)
        # First: a catch-all route of the app must not shadow the path asked for. Unnamed, so
        # that the dashboard's own url_for() finds its routes by their plain names.
        routes.insert(0, Mount(self.dashboard, app=self._dashboard))


def _check(
    worker: object,
    concurrency: int | None,
    stop_timeout: float,
    dashboard: object,
    dashboard_options: Mapping[str, Any] | None,
) -> None:
    if worker not in ("async", "threaded", None):
        raise ConfigurationError(f"worker must be 'async', 'threaded' or None, got {worker!r}")
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ConfigurationError(f"concurrency must be a whole number of at least 1, got {concurrency!r}")
    if not stop_timeout >= 0:
        raise ConfigurationError(f"stop_timeout must be >= 0 seconds, got {stop_timeout!r}")
    if dashboard not in (None, False) and (not isinstance(dashboard, str) or not dashboard.startswith("/")):
        raise ConfigurationError(f"dashboard must be a path such as '/pyfiq' (or False), got {dashboard!r}")
    if dashboard == "/":
        raise ConfigurationError("dashboard must be a path of its own such as '/pyfiq', not '/'")
    from ..dashboard import create_app

    allowed = set(inspect.signature(create_app).parameters) - {"backend", "guard", "read_only"}
    unknown = set(dashboard_options or ()) - allowed
    if unknown:
        raise ConfigurationError(f"dashboard_options takes {sorted(allowed)}, not {sorted(unknown)}")


def pyfiq_lifespan(
    backend: RedisQueueBackend | None = None,
    *,
    worker: WorkerKind | None = "async",
    concurrency: int | None = None,
    queues: Iterable[str] | None = None,
    registry: Registry | None = None,
    stop_timeout: float = 30.0,
    lifespan: Lifespan | None = None,
    dashboard: str | Literal[False] | None = None,
    guard: Callable[[Any], Any] | None = None,
    read_only: bool = False,
    dashboard_options: Mapping[str, Any] | None = None,
) -> PyfiqLifespan:
    """A lifespan that runs a pyfiq worker with the app: ``FastAPI(lifespan=pyfiq_lifespan(backend))``.

    ``backend`` becomes the backend of ``registry``'s ``@fifo`` functions at once (the default
    registry's unless given), as with ``async_worker``; without it, the registry's configured
    backend is used. ``worker``: ``"async"`` (an [`AsyncWorker`][pyfiq.AsyncWorker] on the app's event
    loop; plain functions run in its thread pool), ``"threaded"`` (a
    [`ThreadedWorker`][pyfiq.ThreadedWorker], whose tasks never share the app's loop) or None (the app
    only enqueues). ``concurrency`` and ``queues`` are the worker's (default: its own). At
    shutdown the worker stops within ``stop_timeout`` seconds (running tasks finish, leases are
    handed over), then the app's own ``lifespan`` ends, then the backend's asyncio client is
    closed. ``dashboard="/pyfiq"`` mounts [`create_app`][pyfiq.dashboard.create_app] there at startup
    (ahead of the app's routes), with ``guard``, ``read_only`` and ``dashboard_options``
    (``blocked_after``, ``refresh``, ``secret``) passed on: give ``guard`` your authentication.
    """
    return PyfiqLifespan(
        backend,
        worker=worker,
        concurrency=concurrency,
        queues=queues,
        registry=registry,
        stop_timeout=stop_timeout,
        lifespan=lifespan,
        dashboard=dashboard,
        guard=guard,
        read_only=read_only,
        dashboard_options=dashboard_options,
    )
