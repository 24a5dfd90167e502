"""``RedisQueueBackend``: pyfiq's connection to Redis, a thin facade over the rooms that each
hold one concern:

- ``transport``: the clients (sync and asyncio), the registered scripts and every script call
  (lean path, pipelines, durable mode), with errors translated (``failures``);
- ``enqueue``: the one enqueue path, its coalescing (``coalesce``) and its retries;
- ``admin``: the operator's actions (pause, resume, skip, dead letters) and reads (``reads``).

The workers call the transport's methods through this class; applications enqueue through
``@fifo`` and operate through the methods kept here from earlier releases, or ``admin``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from ..config import Settings
from ..engine.protocol import Call, ScriptCalls
from ..engine.status import parse_status
from ..errors import ConfigurationError
from ..task import NOW, DeadLetter, EncodedTask, TaskRecord, TaskStatus, encode_tasks
from .admin import REQUEUE_STEP, Admin
from .connect import AsyncWakeListener, Topology, WakeListener, sentinel_addresses
from .enqueue import Enqueuer, Stored
from .failures import TRANSIENT, is_transient
from .halts import HaltReport
from .scripts import Scripts
from .transport import AsyncClient, Connection, SyncClient, Transport

__all__ = ["REQUEUE_STEP", "TRANSIENT", "RedisQueueBackend", "is_transient"]


class RedisQueueBackend:
    """pyfiq's connection to Redis.

    ``url`` is any redis-py URL (``redis://``, ``rediss://``, ``unix://``), or ``memory://`` /
    ``memory://<name>`` for an embedded in-process Redis (fakeredis with Lua, the optional
    extra ``pyfiq[memory]``): backends with the same name share one dataset, which is enough
    for demos and unit tests.

    ``cluster=True``: ``url`` (``redis://`` or ``rediss://``) names one startup node of a Redis
    Cluster; the sync and the asyncio side are ``RedisCluster`` clients built from it and from
    ``Settings.redis_options``, and wake-ups use sharded Pub/Sub. ``from_sentinel`` finds the
    primary through Sentinel. TLS files, credentials and timeouts go in ``redis_options``
    (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``password``, ...), or in the URL.

    ``client`` (a ``redis.Redis``) and ``async_client`` (a ``redis.asyncio.Redis``) replace
    ``url``; given both, they must reach the same server. Given one, the other side (async
    enqueue and ``AsyncWorker``, or sync enqueue and ``ThreadedWorker``) is built from its
    connection pool: the same host, port or socket path, database, credentials, TLS options,
    timeouts and pool size. A client whose pool cannot be carried over (cluster, Sentinel, a
    custom connection class) raises ``ConfigurationError`` when that side is first needed;
    pyfiq never falls back to the default URL.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        settings: Settings | None = None,
        *,
        client: SyncClient = None,
        async_client: AsyncClient = None,
        cluster: bool = False,
        _topology: Topology | None = None,
        **overrides: Any,
    ) -> None:
        settings = settings or Settings()
        if overrides:
            settings = settings.replace(**overrides)
        self.settings = settings
        self.transport = Transport(
            url, settings, client=client, async_client=async_client, cluster=cluster, topology=_topology
        )
        self.url = self.transport.url
        self.keys = self.transport.keys
        self.ops = ScriptCalls(self.keys, settings)
        self.enqueuer = Enqueuer(self.transport, self.ops)
        self.admin = Admin(self)

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int] | str],
        service_name: str = "mymaster",
        settings: Settings | None = None,
        *,
        sentinel_options: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> RedisQueueBackend:
        """A backend on the primary that Sentinel names for ``service_name``, found again after
        every failover. ``sentinels``: ``[("host", 26379), ...]`` or ``"host:26379"`` strings.
        The primary's connection options (``password``, ``db``, ``ssl=True`` and the ``ssl_*``
        files) go in ``Settings.redis_options``; the sentinels' own (their password, TLS) in
        ``sentinel_options``. ``overrides`` are ``Settings`` fields, as for the constructor."""
        settings = settings or Settings()
        if overrides:
            settings = settings.replace(**overrides)
        topology = Topology(
            "sentinel",
            sentinels=sentinel_addresses(sentinels),
            service_name=service_name,
            options=dict(settings.redis_options),
            sentinel_options=dict(sentinel_options or {}),
        )
        return cls(topology.address, settings, _topology=topology)

    def copy(self, settings: Settings | None = None, **overrides: Any) -> RedisQueueBackend:
        """Another backend on the same servers (the same URL, cluster or Sentinel description),
        with connections of its own and ``settings`` (default: this one's) plus ``overrides``.
        A backend built on given clients cannot be copied: build the other one the same way."""
        if self.topology is None and not self.is_memory:
            raise ConfigurationError(
                f"{self!r} was built on given clients; build the other backend on clients of its own"
            )
        settings = (settings or self.settings).replace(**overrides)
        return RedisQueueBackend(self.url, settings, _topology=self.topology)

    def __repr__(self) -> str:
        return f"RedisQueueBackend({self.address!r})"

    # -- the transport, as the workers and the operator tools use it ------------------------

    @property
    def client(self) -> SyncClient:
        return self.transport.client

    @property
    def async_client(self) -> AsyncClient:
        return self.transport.async_client

    @property
    def scripts(self) -> Scripts:
        return self.transport.scripts

    @property
    def address(self) -> str:
        """Where this backend connects, without credentials: for messages and repr."""
        return self.transport.address

    @property
    def topology(self) -> Topology | None:
        return self.transport.topology

    @property
    def is_memory(self) -> bool:
        return self.transport.is_memory

    def translate(self, exc: BaseException) -> BaseException:
        return self.transport.translate(exc)

    def translated(self) -> contextlib.AbstractContextManager[None]:
        return self.transport.translated()

    def call(self, call: Call, client: SyncClient = None, connection: Connection = None) -> Any:
        return self.transport.call(call, client, connection)

    async def acall(self, call: Call, client: AsyncClient = None) -> Any:
        return await self.transport.acall(call, client)

    def call_many(self, calls: Sequence[Call]) -> list[Any]:
        return self.transport.call_many(calls)

    async def acall_many(self, calls: Sequence[Call]) -> list[Any]:
        return await self.transport.acall_many(calls)

    def operator_call(self, call: Call) -> Any:
        return self.transport.operator_call(call)

    def own_connection(self) -> Connection:
        return self.transport.own_connection()

    def check_layout(self) -> None:
        self.transport.check_layout()

    async def acheck_layout(self) -> None:
        await self.transport.acheck_layout()

    def pubsub(self) -> Any:
        return self.transport.pubsub()

    def wake_listener(self) -> WakeListener:
        return self.transport.wake_listener()

    def async_wake_listener(self) -> AsyncWakeListener:
        return self.transport.async_wake_listener()

    def ping(self) -> bool:
        return self.transport.ping()

    def close(self) -> None:
        self.transport.close()

    async def aclose(self) -> None:
        await self.transport.aclose()

    # -- enqueue -----------------------------------------------------------------------------

    def encode(
        self, records: Sequence[tuple[str, TaskRecord]], expires_in: float | None = None, when: str = NOW
    ) -> list[EncodedTask]:
        """``(task id, record)`` pairs encoded with this backend's serializer, before any I/O."""
        return encode_tasks(records, self.settings.serializer, expires_in, when, self.settings.max_payload_bytes)

    def enqueue(
        self,
        stream: str,
        records: Sequence[tuple[str, TaskRecord]],
        *,
        expires_in: float | None = None,
        dedup_keys: Sequence[str] | None = None,
    ) -> list[Stored]:
        """Append tasks to a stream, atomically and in order; returns (id, new) pairs. Every
        record is encoded first, so one that cannot be serialized enqueues nothing. Tasks
        already encoded go to ``enqueuer.enqueue``."""
        return self.enqueuer.enqueue(stream, self.encode(records, expires_in), dedup_keys)

    async def aenqueue(
        self,
        stream: str,
        records: Sequence[tuple[str, TaskRecord]],
        *,
        expires_in: float | None = None,
        dedup_keys: Sequence[str] | None = None,
    ) -> list[Stored]:
        """``enqueue`` without blocking the event loop."""
        return await self.enqueuer.aenqueue(stream, self.encode(records, expires_in), dedup_keys)

    # -- what became of a task ---------------------------------------------------------------

    def task_status(self, stream: str, task_id: str) -> TaskStatus:
        """Where task ``task_id`` of ``stream`` is now, in one read-only script call (see
        ``pyfiq.task.TaskState``); ``TaskHandle.status()`` asks this."""
        return parse_status(stream, task_id, self.call(self.ops.status(stream, task_id)))

    async def atask_status(self, stream: str, task_id: str) -> TaskStatus:
        """``task_status`` for asyncio code."""
        return parse_status(stream, task_id, await self.acall(self.ops.status(stream, task_id)))

    # -- the operator's methods of earlier releases (see ``admin``) ----------------------------

    def queue_info(self, stream: str) -> dict[str, Any]:
        return self.admin.queue_info(stream)

    def replicas(self, include_silent: bool = False) -> list[dict[str, Any]]:
        return self.admin.replicas(include_silent)

    def pause(self, queue: str, key: str | None = None, *, wait: float | None = None) -> HaltReport:
        return self.admin.pause(queue, key, wait=wait)

    def resume(self, queue: str, key: str | None = None) -> None:
        self.admin.resume(queue, key)

    def paused(self) -> list[str]:
        return self.admin.paused()

    def skip(self, stream: str, reason: str = "skipped by an operator") -> str | None:
        return self.admin.skip(stream, reason)

    def active_streams(self) -> list[str]:
        return self.admin.active_streams()

    def dead_letter_streams(self) -> list[str]:
        return self.admin.dead_letter_streams()

    def dead_letters(self, stream: str, limit: int = 100, offset: int = 0) -> list[DeadLetter]:
        return self.admin.dead_letters(stream, limit, offset)

    def dead_letter(self, stream: str, task_id: str) -> DeadLetter | None:
        return self.admin.dead_letter(stream, task_id)

    def requeue_dead_letters(
        self, stream: str, *, count: int | None = None, task_id: str | None = None, front: bool = False
    ) -> int:
        return self.admin.requeue_dead_letters(stream, count=count, task_id=task_id, front=front)

    def purge_dead_letters(self, stream: str) -> int:
        return self.admin.purge_dead_letters(stream)
