"""The Redis backend: one connection pool, the registered scripts, enqueue and operator actions."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.connection
import redis.retry
import redis.sentinel

from ..config import SecretURL, Settings, validate_seconds
from ..engine.keys import KeySchema, queue_of, stream_name, validate_queue_name
from ..engine.outcomes import dead_letter_header
from ..engine.protocol import ENQUEUE_ITEMS, Call, ScriptCalls
from ..errors import (
    AccessDeniedError,
    BackendUnavailableError,
    ConfigurationError,
    DecodeError,
    EnqueueOutcomeUnknown,
    NotReplicatedError,
)
from ..task import Entry, TaskRecord
from . import halts
from .coalesce import AsyncCoalescer, Coalescer
from .connect import (
    AsyncWakeListener,
    Topology,
    WakeListener,
    is_cluster_client,
    redact,
    sentinel_addresses,
)
from .durable import acall_durably, call_durably, waited
from .halts import HaltReport
from .lean import Attempt, LeanConnections, apooled_exchange
from .scripts import Scripts

_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()

#: Errors after which Redis may be back shortly: worth a bounded retry. A cluster says so while
#: a failover or a slot migration is under way (CLUSTERDOWN, TRYAGAIN, a slot with no node yet),
#: and a demoted primary refuses writes (READONLY) until Sentinel has moved its clients on;
#: none of these applied the command.
TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.ReadOnlyError,
)
#: Refusals no retry can fix (redis-py makes some of them ConnectionErrors).
DENIED = (redis.AuthenticationError, redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError)
_DENIED_REPLIES = ("NOAUTH", "WRONGPASS", "NOPERM")


def is_denied(exc: BaseException) -> bool:
    return isinstance(exc, DENIED) or (isinstance(exc, redis.ResponseError) and str(exc).startswith(_DENIED_REPLIES))


def redirections_exhausted(exc: BaseException) -> bool:
    """redis-py's cluster client follows MOVED, ASK and TRYAGAIN itself, 16 times (about 0.4 s),
    then gives up with ``ClusterError("TTL exhausted.")``. Every attempt was refused, none
    applied the command, so it is as transient as the TRYAGAIN behind it: during a slot
    migration a script whose keys the two nodes share out meets TRYAGAIN until the move ends."""
    return type(exc) is redis.exceptions.ClusterError and str(exc).startswith("TTL exhausted")


def is_transient(exc: BaseException) -> bool:
    """Worth a bounded retry: Redis may be back in a moment (not so a refused password)."""
    return (isinstance(exc, TRANSIENT) or redirections_exhausted(exc)) and not is_denied(exc)


#: What redis-py says when a pooled connection fails its readiness check, before any command.
_UNUSED_CONNECTION = ("Connection has data", "Connection not ready")


#: What a Sentinel-managed client raises, before sending anything, while no primary is known.
_NO_PRIMARY = (
    redis.sentinel.MasterNotFoundError,
    redis.sentinel.SlaveNotFoundError,
    redis.asyncio.sentinel.MasterNotFoundError,
    redis.asyncio.sentinel.SlaveNotFoundError,
)


def never_ran(exc: BaseException) -> bool:
    """Whether a call that failed with ``exc`` certainly did not run: Redis answered with a
    refusal (every transient one refuses before running: CLUSTERDOWN, TRYAGAIN, READONLY, a
    redirection), the client refused to send it, or the connection failed while connecting
    (redis-py's own words). Any other failure may have come after the request was written."""
    if isinstance(exc, (redis.ResponseError, AccessDeniedError, ConfigurationError)):
        return True
    if is_denied(exc) or redirections_exhausted(exc):
        return True
    if isinstance(exc, (redis.exceptions.SlotNotCoveredError, redis.exceptions.MaxConnectionsError)):
        return True
    if isinstance(exc, _NO_PRIMARY):  # Sentinel named no primary (a failover): nothing was sent
        return True
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        text = str(exc)
        return "connecting to" in text or text in _UNUSED_CONNECTION
    return False


def _memory_client(name: str, *, asynchronous: bool = False) -> Any:
    try:
        import fakeredis
    except ImportError as exc:  # pragma: no cover - fakeredis is a dependency
        raise ConfigurationError("memory:// needs fakeredis[lua]: pip install 'fakeredis[lua]'") from exc
    with _memory_lock:
        server = _memory_servers.setdefault(name, fakeredis.FakeServer())
    return fakeredis.FakeAsyncRedis(server=server) if asynchronous else fakeredis.FakeRedis(server=server)


# A client handed to the backend serves one side (sync or asyncio); the other side is built from
# the same connection description, so that both always reach the same server.
_SYNC_TO_ASYNC_CONNECTIONS: dict[type[Any], type[Any]] = {
    redis.connection.Connection: redis.asyncio.connection.Connection,
    redis.connection.SSLConnection: redis.asyncio.connection.SSLConnection,
    redis.connection.UnixDomainSocketConnection: redis.asyncio.connection.UnixDomainSocketConnection,
}
_SYNC_TO_ASYNC_POOLS: dict[type[Any], type[Any]] = {
    redis.ConnectionPool: redis.asyncio.ConnectionPool,
    redis.BlockingConnectionPool: redis.asyncio.BlockingConnectionPool,
}
_ASYNC_TO_SYNC_CONNECTIONS = {v: k for k, v in _SYNC_TO_ASYNC_CONNECTIONS.items()}
_ASYNC_TO_SYNC_POOLS = {v: k for k, v in _SYNC_TO_ASYNC_POOLS.items()}

#: Connection arguments that redis-py fills in for each pool itself (handlers bound to the
#: pool's side, the parser of its side): the twin pool makes its own.
_POOL_BOOKKEEPING = frozenset(
    {
        "command_packer",
        "encoder_class",
        "event_dispatcher",
        "himport_registry",
        "maint_notifications_config",
        "maint_notifications_pool_handler",
        "maintenance_notification_hash",
        "maintenance_state",
        "orig_host_address",
        "orig_socket_connect_timeout",
        "orig_socket_timeout",
        "oss_cluster_maint_notifications_handler",
        "parser_class",
    }
)

#: What names a fakeredis server (a client finds its server by these) and how it is spoken to.
_FAKE_KEYS = (
    "server",
    "host",
    "port",
    "path",
    "db",
    "version",
    "server_type",
    "lua_modules",
    "username",
    "password",
    "client_name",
    "decode_responses",
    "encoding",
    "encoding_errors",
)


def _init_parameters(cls: type[Any]) -> frozenset[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in list(inspect.signature(init).parameters.values())[1:]:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                names.add(p.name)
    return frozenset(names)


def _pool_of(client: Any) -> tuple[Any, type[Any], dict[str, Any]] | None:
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    connection_class = getattr(pool, "connection_class", None)
    if not isinstance(kwargs, dict) or not isinstance(connection_class, type):
        return None
    return pool, connection_class, kwargs


def describe_client(client: Any) -> str:
    """Where ``client`` connects, as a URL without credentials (for messages and repr)."""
    found = _pool_of(client)
    if found is None:
        return f"<{type(client).__name__}>"
    _, connection_class, kw = found
    db = kw.get("db", 0)
    if connection_class.__module__.startswith("fakeredis"):
        return f"fakeredis://{kw.get('host') or kw.get('path')}/{db}"
    if kw.get("path"):
        return f"unix://{kw['path']}?db={db}"
    tls = issubclass(connection_class, (redis.connection.SSLConnection, redis.asyncio.connection.SSLConnection))
    return f"{'rediss' if tls else 'redis'}://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{db}"


def twin_client(client: Any, *, asynchronous: bool) -> Any:
    """A client of the other kind (``redis.asyncio`` for a sync ``client``, or the reverse)
    built from ``client``'s connection pool: the same server, database, credentials, TLS
    options, timeouts, retry policy and pool size. Raises ``ConfigurationError`` when that
    description cannot be carried over (a cluster or Sentinel client, a custom connection
    class, a callback of the wrong kind), never guessing a server instead."""
    target = "redis.asyncio" if asynchronous else "sync redis"
    wanted = "async_client" if asynchronous else "client"

    def refuse(reason: str) -> ConfigurationError:
        return ConfigurationError(
            f"cannot derive a {target} client from {type(client).__name__} "
            f"({describe_client(client)}): {reason}; pass {wanted}= (a {target} client for the same "
            f"server) to RedisQueueBackend as well"
        )

    found = _pool_of(client)
    if found is None:
        raise refuse("it has no single connection pool to copy (a cluster client?)")
    pool, connection_class, kwargs = found
    if connection_class.__module__.startswith("fakeredis"):
        import fakeredis

        fake = fakeredis.FakeAsyncRedis if asynchronous else fakeredis.FakeRedis
        return fake(**{k: kwargs[k] for k in _FAKE_KEYS if k in kwargs})
    connections = _SYNC_TO_ASYNC_CONNECTIONS if asynchronous else _ASYNC_TO_SYNC_CONNECTIONS
    pools = _SYNC_TO_ASYNC_POOLS if asynchronous else _ASYNC_TO_SYNC_POOLS
    twin_connection = connections.get(connection_class)
    if twin_connection is None:
        raise refuse(f"its connections are {connection_class.__module__}.{connection_class.__qualname__}")
    twin_pool = pools.get(type(pool))
    if twin_pool is None:
        raise refuse(f"its pool is {type(pool).__module__}.{type(pool).__qualname__}")
    accepted = _init_parameters(twin_connection)
    options: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in _POOL_BOOKKEEPING:
            continue
        if name == "retry" and value is not None:
            value = _twin_retry(value, asynchronous, refuse)
        elif name == "redis_connect_func" and value is not None:
            raise refuse("its redis_connect_func callback cannot run on the other side")
        elif name not in accepted:
            if value is None or value is False:
                continue
            raise refuse(f"its connection option {name!r} has no {target} equivalent")
        # Connections extend some lists they are given (retry_on_error): never share one.
        options[name] = list(value) if isinstance(value, list) else value
    pool_options: dict[str, Any] = {"max_connections": pool.max_connections}
    if "timeout" in _init_parameters(twin_pool):
        pool_options["timeout"] = pool.timeout
    twin = twin_pool(connection_class=twin_connection, **pool_options, **options)
    return (redis.asyncio.Redis if asynchronous else redis.Redis)(connection_pool=twin)


def _twin_retry(retry: Any, asynchronous: bool, refuse: Callable[[str], ConfigurationError]) -> Any:
    kind: type[Any] = redis.asyncio.retry.Retry if asynchronous else redis.retry.Retry
    if type(retry) is kind:
        return copy.deepcopy(retry)
    try:
        backoff, retries, errors = retry._backoff, retry.get_retries(), retry._supported_errors
    except AttributeError:
        raise refuse(f"its retry policy {type(retry).__qualname__} cannot be carried over") from None
    return kind(copy.deepcopy(backoff), retries, tuple(errors))


def expires_in_ms(expires_in: float | None) -> int:
    """An enqueue's ``expires_in`` as the scripts take it: ms, 0 for never. Rounded up, so any
    positive value is at least the 1 ms Redis can express."""
    if expires_in is not None:
        validate_seconds("expires_in", expires_in)
    return math.ceil(expires_in * 1000) if expires_in else 0


def _layout_error(exc: redis.ResponseError) -> ConfigurationError | None:
    text = str(exc)
    if "PYFIQLAYOUT" not in text:
        return None
    return ConfigurationError(
        f"{text.split('PYFIQLAYOUT ', 1)[-1]}: give every replica and producer of this prefix the same shards setting"
    )


class _Retry:
    """The retry budget of one enqueue. Transient failures are retried with exponential back-off
    (50 ms doubling up to 1 s, plus up to 50 ms of jitter) until ``enqueue_timeout`` has passed
    since the enqueue began, or ``enqueue_attempts`` tries were made. A failure after which the
    request may have run (``never_ran`` says no, and it was sent) ends the enqueue with
    ``EnqueueOutcomeUnknown``, unless re-sending cannot store a task twice: every task has a
    dedup key, and the dedup window outlasts twice the retry window."""

    def __init__(
        self,
        backend: RedisQueueBackend,
        call: Call,
        stream: str,
        dedup_keys: Sequence[str] | None,
        started: float | None,
    ) -> None:
        self.backend, self.call, self.stream = backend, call, stream
        self.started = time.monotonic() if started is None else started
        settings = backend.settings
        every = dedup_keys is not None and len(dedup_keys) == len(call.args[ENQUEUE_ITEMS::3])
        self.resend_safe = every and settings.dedup_window > 2 * settings.enqueue_timeout
        self.tries = 0
        #: An earlier try may have stored the tasks (then re-sent with their dedup keys).
        self.maybe = False

    def failed(self, exc: BaseException | None, sent: bool, *, shared: bool = False) -> float:
        """Seconds to wait before the next try after one failed with ``exc`` (None: nothing
        failed yet); raises when there is to be none. A refusal that ran nothing is raised as
        it is, except one of a ``shared`` round trip, whose callers each try alone."""
        if exc is None:
            return 0.0
        if isinstance(exc, NotReplicatedError):
            raise exc  # stored, short of replicas: the outcome, told as it is
        if sent and not never_ran(exc):
            if not self.resend_safe:
                raise self.backend.outcome_unknown(self.stream, self.call, exc) from exc
            self.maybe = True
        elif not is_transient(exc):
            if shared:
                return 0.0
            raise exc
        self.tries += 1
        settings = self.backend.settings
        elapsed = time.monotonic() - self.started
        if elapsed >= settings.enqueue_timeout or (
            settings.enqueue_attempts is not None and self.tries >= settings.enqueue_attempts
        ):
            if self.maybe:
                raise self.backend.outcome_unknown(self.stream, self.call, exc) from exc
            raise BackendUnavailableError(
                f"could not enqueue to {self.stream!r} on {self.backend.address}: Redis unreachable after "
                f"{self.tries} attempts ({exc}); nothing was stored"
            ) from exc
        backoff = min(1.0, 0.05 * 2.0 ** (self.tries - 1)) + random.uniform(0, 0.05)
        return min(backoff, settings.enqueue_timeout - elapsed)


class _PipelineExchange:
    """``lean.Exchange`` for a client without the lean path: its own pipeline. An interruption
    drops the pipeline's connection (redis-py's choice), so ``finish`` cannot read what was
    left: the calls it carried may have run."""

    def __init__(self, client: Any, commands: Sequence[tuple[Any, ...]]) -> None:
        self._client = client
        self._commands = commands
        self.sent = False
        self.replies: list[Any] = []

    def run(self) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for command in self._commands:
            pipe.execute_command(*command)
        self.sent = True  # redis-py connects inside: never_ran() tells a failure to connect
        self.replies = list(pipe.execute(raise_on_error=False))
        return self.replies

    def finish(self) -> list[Any]:
        if len(self.replies) == len(self._commands):
            return self.replies
        raise redis.ConnectionError("the round trip was interrupted and its connection dropped")


@dataclass(frozen=True)
class TaskHandle:
    """What enqueuing returns. ``duplicate`` is true when a dedup key matched an earlier task,
    whose id is then ``id``."""

    id: str
    queue: str
    stream: str
    name: str
    duplicate: bool = False


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter record: why, when, where, and the task itself."""

    stream: str
    reason: str
    header: dict[str, Any]
    entry: Entry | None
    record: TaskRecord | None
    raw: bytes

    @property
    def task_id(self) -> str | None:
        return self.entry.id if self.entry else None


class RedisQueueBackend:
    """pyfiq's connection to Redis.

    ``url`` is any redis-py URL (``redis://``, ``rediss://``, ``unix://``), or ``memory://`` /
    ``memory://<name>`` for an embedded in-process Redis (fakeredis with Lua): backends with
    the same name share one dataset, which is enough for demos and unit tests.

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
        client: Any = None,
        async_client: Any = None,
        cluster: bool = False,
        _topology: Topology | None = None,
        **overrides: Any,
    ) -> None:
        settings = settings or Settings()
        if overrides:
            settings = settings.replace(**overrides)
        self.url = SecretURL(url)  # the URL as given; its repr hides the password
        self.settings = settings
        self.is_memory = url.startswith("memory://") and _topology is None
        if self.is_memory and settings.durable:
            raise ConfigurationError("min_replicas: memory:// has no replicas to wait for")
        if _topology is None and not self.is_memory and client is None and async_client is None:
            _topology = Topology("cluster" if cluster else "url", url, options=dict(settings.redis_options))
        #: How both clients are built; None when they were given, or for memory://.
        self.topology = _topology
        given_cluster = is_cluster_client(client or async_client)
        self.is_cluster = given_cluster or (_topology is not None and _topology.sharded_pubsub)
        self.keys = KeySchema(settings.prefix, settings.shards, sharded_wake=self.is_cluster)
        self.ops = ScriptCalls(self.keys, settings)
        self._memory_name = (urlparse(url).netloc if self.is_memory else "") or "default"
        self._given_async = async_client
        self._memory_async = client is None and async_client is None and self.is_memory
        self._owns_sync_pool = False
        self.client = self._sync_client(client, async_client)
        self.scripts = Scripts(self.client)
        self._async: tuple[Any, Scripts] | None = None
        self._layout_checked = False
        self._coalescer = Coalescer(self)
        #: A plain client this backend made from a URL: its calls may take the lean path.
        lean = type(self.client) is redis.Redis and self.topology is not None and self.topology.kind == "url"
        self._connections = LeanConnections(self.client.connection_pool) if lean else None
        self._acoalescer: AsyncCoalescer | None = None

    def _sync_client(self, client: Any, async_client: Any) -> Any:
        #: Where this backend connects, without credentials: for messages and repr.
        self.address = redact(self.url)
        if client is not None:
            self.address = describe_client(client)
            return client
        if async_client is not None:
            self.address = describe_client(async_client)
            self._owns_sync_pool = True
            return twin_client(async_client, asynchronous=False)
        if self.topology is None:
            return _memory_client(self._memory_name)
        self.address = self.topology.address
        return self.topology.client()

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

    # -- plumbing used by the workers -----------------------------------------------------

    def translate(self, exc: BaseException) -> BaseException:
        """pyfiq's own error for what Redis said, where there is one: a refusal of credentials
        or permissions (``AccessDeniedError``, never retried) or another shard layout."""
        if is_denied(exc):
            return AccessDeniedError(
                f"Redis at {self.address} refused pyfiq: {type(exc).__name__}: {exc}. Check the password and "
                "the user's ACL (pyfiq needs its key prefix, its channels and the script commands)"
            )
        if isinstance(exc, redis.ResponseError):
            return _layout_error(exc) or exc
        return exc

    @contextlib.contextmanager
    def translated(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            mine = self.translate(exc)
            if mine is exc:
                raise
            raise mine from None

    def _raise_denied(self, replies: Sequence[Any]) -> None:
        for reply in replies:
            if isinstance(reply, Exception) and is_denied(reply):
                raise self.translate(reply) from None

    def call(self, call: Call, client: Any = None, connection: Any = None) -> Any:
        """Run one script call. ``connection``: one of ``own_connection``'s, for a thread that
        makes many calls (a worker's executor); durable mode sends on the pool as it must."""
        if client is None and waited(self, call):
            return call_durably(self, call)
        script = getattr(self.scripts, call.script)
        try:  # what translated() does, without a generator's cost on every task's call
            if client is None and self._connections is not None:
                return self._lean_call(script, call, connection)
            return script(keys=call.keys, args=call.args, client=client)
        except redis.RedisError as exc:
            mine = self.translate(exc)
            if mine is exc:
                raise
            raise mine from None

    def operator_call(self, call: Call) -> Any:
        """An operator's script call (skip, requeue), which may not be sent twice: it goes on an
        idle connection checked first, so one whose server restarted meanwhile is dropped
        instead of failing the action after its request may have been written."""
        if self._connections is None or waited(self, call):
            return self.call(call)
        script = getattr(self.scripts, call.script)
        command = ("EVALSHA", script.sha, len(call.keys), *call.keys, *call.args)
        with self.translated():
            try:
                return self._connections.call(command, attempt=Attempt())
            except redis.exceptions.NoScriptError:  # Redis lost it (a restart): nothing ran
                self.client.script_load(script.script)
                return self._connections.call(command, attempt=Attempt())

    def own_connection(self) -> Any:
        """A connection outside the pool for one thread's calls alone, or None where the client
        is not a plain one this backend made; close it with ``connection.disconnect()``."""
        return None if self._connections is None else self._connections.new()

    def _lean_call(self, script: Any, call: Call, connection: Any = None) -> Any:
        """EVALSHA without the client's per-command bookkeeping (its retries are off in a pool
        pyfiq made, and it records nothing pyfiq reads): a fifth of an enqueue's cost,
        measured. A script Redis lost (a restart) is loaded and sent again."""
        try:
            return self._send(script.sha, call, connection)
        except redis.exceptions.NoScriptError:
            self.client.script_load(script.script)
            return self._send(script.sha, call, connection)

    def _send(self, sha: str, call: Call, connection: Any) -> Any:
        assert self._connections is not None
        return self._connections.call(("EVALSHA", sha, len(call.keys), *call.keys, *call.args), connection)

    def call_many(self, calls: Sequence[Call]) -> list[Any]:
        """Run several calls of idempotent scripts (``due``, ``renew``) in one round trip, not
        a transaction; errors are returned in place of their reply.

        EVALSHA goes straight into the pipeline (by name: redis-py's cluster pipeline refuses
        its ``evalsha`` method, not the command): redis-py would otherwise ask SCRIPT EXISTS
        before every pipeline, an extra round trip per poll and heartbeat. If Redis lost its
        script cache (a restart), the scripts are loaded and the batch is sent again, which
        is why only idempotent scripts belong here."""
        if not calls:
            return []
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            for c in calls:
                script = getattr(self.scripts, c.script)
                pipe.execute_command("EVALSHA", script.sha, len(c.keys), *c.keys, *c.args)
            with self.translated():
                replies = list(pipe.execute(raise_on_error=False))
            self._raise_denied(replies)
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                return replies
            for name in {c.script for c in calls}:
                self.client.script_load(getattr(self.scripts, name).script)
        return replies

    # -- the asyncio side: a redis.asyncio client and the same scripts, created on first use --

    def _async_side(self) -> tuple[Any, Scripts]:
        if self._async is None:
            if self._given_async is not None:
                client = self._given_async
            elif self._memory_async:
                client = _memory_client(self._memory_name, asynchronous=True)
            elif self.topology is not None and self.topology.kind != "url":
                # A cluster or Sentinel client has no single pool to copy: the same
                # description builds the asyncio one.
                client = self.topology.client(asynchronous=True)
            else:
                # From the sync client's pool, not from self.url: a client= given without a
                # URL must not send async work to the default localhost server.
                client = twin_client(self.client, asynchronous=True)
            self._async = (client, Scripts(client))
        return self._async

    @property
    def async_client(self) -> Any:
        return self._async_side()[0]

    async def acall(self, call: Call, client: Any = None) -> Any:
        if client is None and waited(self, call):
            return await acall_durably(self, call, *self._async_side())
        script = getattr(self._async_side()[1], call.script)
        with self.translated():
            return await script(keys=call.keys, args=call.args, client=client)

    async def acall_many(self, calls: Sequence[Call]) -> list[Any]:
        if not calls:
            return []
        # As call_many: EVALSHA straight into the pipeline, scripts reloaded if Redis lost them.
        scripts = self._async_side()[1]
        for _ in range(2):
            pipe = self.async_client.pipeline(transaction=False)
            for c in calls:
                pipe.execute_command("EVALSHA", getattr(scripts, c.script).sha, len(c.keys), *c.keys, *c.args)
            with self.translated():
                replies = list(await pipe.execute(raise_on_error=False))
            self._raise_denied(replies)
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                return replies
            for name in {c.script for c in calls}:
                await self.async_client.script_load(getattr(scripts, name).script)
        return replies

    async def aenqueue_encoded(
        self,
        stream: str,
        items: Sequence[tuple[str, int, bytes]],
        dedup_keys: Sequence[str] | None = None,
    ) -> list[tuple[str, bool]]:
        """``enqueue_encoded`` without blocking the event loop."""
        if not self._layout_checked or self.settings.durable:
            return await self.aenqueue_alone(stream, items, dedup_keys)
        coalescer = self._acoalescer
        loop = asyncio.get_running_loop()
        if coalescer is None or coalescer.loop is not loop:
            # One per loop: a turn left unfinished by a loop that ended must not hold up the next.
            coalescer = self._acoalescer = AsyncCoalescer(self, loop)
        return await coalescer.enqueue(stream, items, dedup_keys)

    async def aenqueue_once(
        self,
        stream: str,
        items: Sequence[tuple[str, int, bytes]],
        dedup_keys: Sequence[str] | None,
        attempt: Attempt,
    ) -> list[tuple[str, bool]]:
        call = self.ops.enqueue(stream, items, dedup_keys)
        return ScriptCalls.parse_enqueue(call, await self._aenqueue_call(call, attempt))

    async def aenqueue_alone(
        self,
        stream: str,
        items: Sequence[tuple[str, int, bytes]],
        dedup_keys: Sequence[str] | None,
        *,
        sent: bool = False,
        cause: BaseException | None = None,
        started: float | None = None,
    ) -> list[tuple[str, bool]]:
        """``enqueue_alone`` without blocking the event loop."""
        call = self.ops.enqueue(stream, items, dedup_keys)
        retry = _Retry(self, call, stream, dedup_keys, started)
        retry.failed(cause, sent, shared=True)
        while True:
            attempt = Attempt()
            try:
                if not self._layout_checked:
                    await self.acheck_layout()
                return self._own(call, await self._aenqueue_call(call, attempt))
            except Exception as exc:
                delay = retry.failed(exc, attempt.sent)
            await asyncio.sleep(delay)

    async def _aenqueue_call(self, call: Call, attempt: Attempt) -> Any:
        client, scripts = self._async_side()
        if self.settings.durable:
            return await acall_durably(self, call, client, scripts, attempt)
        script = scripts.enqueue
        with self.translated():
            if self._connections is None:
                attempt.sent = True
                return await script(keys=call.keys, args=call.args)
            # The asyncio twin of the lean path's client: a plain pool, checked out directly.
            command = ("EVALSHA", script.sha, len(call.keys), *call.keys, *call.args)
            (reply,) = await apooled_exchange(client.connection_pool, [command], attempt)
            if isinstance(reply, redis.exceptions.NoScriptError):  # Redis lost it: nothing ran
                attempt.sent = False
                await client.script_load(script.script)
                (reply,) = await apooled_exchange(client.connection_pool, [command], attempt)
            if isinstance(reply, Exception):
                raise reply
            return reply

    async def asend_enqueues(self, calls: Sequence[Call], attempt: Attempt) -> list[Any]:
        """The asyncio coalescer's shared round trip: several enqueue calls in one write,
        replies (an error reply as its exception) in order. A call refused for a missing
        script did not run: its caller sends it again alone, which loads the script."""
        client, scripts = self._async_side()
        sha = scripts.enqueue.sha
        commands = [("EVALSHA", sha, len(c.keys), *c.keys, *c.args) for c in calls]
        with self.translated():
            if self._connections is not None:
                return list(await apooled_exchange(client.connection_pool, commands, attempt))
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            attempt.sent = True
            return list(await pipe.execute(raise_on_error=False))

    async def acheck_layout(self) -> None:
        if self._layout_checked:
            return
        client = self.async_client
        with self.translated():
            await client.set(self.keys.layout_key, self.keys.shards, nx=True)
            stored = await client.get(self.keys.layout_key)
        self._verify_layout(stored)

    async def aclose(self) -> None:
        if self._async is not None and not self._memory_async:
            if self._given_async is not None or is_cluster_client(self._async[0]):
                await self._async[0].aclose()
            else:
                # A client made on a pool it was handed leaves the pool open on aclose().
                await self._async[0].aclose(close_connection_pool=True)
        self._async = None

    def pubsub(self) -> Any:
        return self.client.pubsub(ignore_subscribe_messages=True)

    def wake_listener(self) -> WakeListener:
        """Subscribed to the wake-up channels (one, or one per shard on a cluster)."""
        with self.translated():
            return WakeListener(self.client, self.keys)

    def async_wake_listener(self) -> AsyncWakeListener:
        """The asyncio ``wake_listener``; ``await listener.subscribe()`` before reading."""
        return AsyncWakeListener(self.async_client, self.keys)

    def check_layout(self) -> None:
        """Refuse to run beside replicas that shard the same prefix differently: their keys
        would not meet, and tasks would wait forever. Checked once per backend."""
        if self._layout_checked:
            return
        with self.translated():
            self.client.set(self.keys.layout_key, self.keys.shards, nx=True)
            stored = self.client.get(self.keys.layout_key)
        self._verify_layout(stored)

    def _verify_layout(self, stored: Any) -> None:
        if stored is not None and int(stored) != self.keys.shards:
            raise ConfigurationError(
                f"prefix {self.keys.prefix!r} on {self.address} is laid out with {int(stored)} shards, "
                f"this backend uses {self.keys.shards}: give every replica the same shards setting"
            )
        self._layout_checked = True

    def ping(self) -> bool:
        return bool(self.client.ping())

    def close(self) -> None:
        if self._connections is not None:
            self._connections.close()
        if not self.is_memory:
            self.client.close()
        if self._owns_sync_pool:
            self.client.connection_pool.disconnect()

    # -- enqueue ----------------------------------------------------------------------------

    def enqueue(
        self,
        stream: str,
        records: Sequence[tuple[str, TaskRecord]],
        *,
        expires_in: float | None = None,
        dedup_keys: Sequence[str] | None = None,
    ) -> list[tuple[str, bool]]:
        """Append tasks to a stream, atomically and in order; returns (id, new) pairs.

        Encoding happens before any I/O, so a task whose arguments cannot be serialized fails
        at once and nothing of the batch is enqueued.
        """
        return self.enqueue_encoded(stream, self.encode(records, expires_in), dedup_keys)

    def encode(
        self, records: Sequence[tuple[str, TaskRecord]], expires_in: float | None = None
    ) -> list[tuple[str, int, bytes]]:
        ttl_ms = expires_in_ms(expires_in)
        return [(task_id, ttl_ms, rec.encode(self.settings.serializer)) for task_id, rec in records]

    def enqueue_encoded(
        self,
        stream: str,
        items: Sequence[tuple[str, int, bytes]],
        dedup_keys: Sequence[str] | None = None,
    ) -> list[tuple[str, bool]]:
        """Store encoded tasks; concurrent callers share round trips (see ``coalesce``), except
        in durable mode, where each caller's enqueue waits for its own replication."""
        if not self._layout_checked or self.settings.durable:
            return self.enqueue_alone(stream, items, dedup_keys)
        return self._coalescer.enqueue(stream, items, dedup_keys)

    def enqueue_once(
        self,
        stream: str,
        items: Sequence[tuple[str, int, bytes]],
        dedup_keys: Sequence[str] | None,
        attempt: Attempt,
    ) -> list[tuple[str, bool]]:
        """One plain attempt, no retry bookkeeping (it costs a fifth of an enqueue)."""
        call = self.ops.enqueue(stream, items, dedup_keys)
        return ScriptCalls.parse_enqueue(call, self._enqueue_call(call, attempt))

    def enqueue_alone(
        self,
        stream: str,
        items: Sequence[tuple[str, int, bytes]],
        dedup_keys: Sequence[str] | None,
        *,
        sent: bool = False,
        cause: BaseException | None = None,
        started: float | None = None,
    ) -> list[tuple[str, bool]]:
        """Enqueue, retrying transient errors until ``enqueue_timeout`` after ``started`` (now
        by default): the first time (when the shard layout is checked too), in durable mode,
        or after a shared round trip failed with ``cause`` (``sent``: its request may have been
        written).

        A request that may have been written is never sent again blindly: Redis may have stored
        it, and only a retry that cannot store a task twice is made (every task has a dedup key
        that outlives the retries: a task found stored under its own id was stored by an
        earlier attempt, and is answered as new). Otherwise ``EnqueueOutcomeUnknown``."""
        call = self.ops.enqueue(stream, items, dedup_keys)
        retry = _Retry(self, call, stream, dedup_keys, started)
        retry.failed(cause, sent, shared=True)
        while True:
            attempt = Attempt()
            try:
                if not self._layout_checked:
                    self.check_layout()
                return self._own(call, self._enqueue_call(call, attempt))
            except Exception as exc:
                delay = retry.failed(exc, attempt.sent)
            time.sleep(delay)

    def _enqueue_call(self, call: Call, attempt: Attempt) -> Any:
        """One enqueue script call, ``attempt`` telling whether its request may have been
        written: exactly on the lean path and in durable mode; on the client's own path from
        the error (``never_ran``)."""
        if self.settings.durable:
            return call_durably(self, call, attempt)
        script = self.scripts.enqueue
        try:
            if self._connections is None:
                attempt.sent = True
                return script(keys=call.keys, args=call.args)
            command = ("EVALSHA", script.sha, len(call.keys), *call.keys, *call.args)
            try:
                return self._connections.call(command, attempt=attempt)
            except redis.exceptions.NoScriptError:  # Redis lost it (a restart): nothing ran
                attempt.sent = False
                self.client.script_load(script.script)
                return self._connections.call(command, attempt=attempt)
        except redis.RedisError as exc:
            mine = self.translate(exc)
            if mine is exc:
                raise
            raise mine from None

    @staticmethod
    def _own(call: Call, reply: Any) -> list[tuple[str, bool]]:
        """``ScriptCalls.parse_enqueue``, where a task a dedup key found stored under its own id (random,
        128 bits) is new: an earlier attempt whose reply was lost stored it."""
        parsed = ScriptCalls.parse_enqueue(call, reply)
        if isinstance(reply, int):
            return parsed
        ids = call.args[ENQUEUE_ITEMS::3]
        return [(task_id, new or task_id == own) for (task_id, new), own in zip(parsed, ids, strict=True)]

    def shared_enqueues(self, calls: Sequence[Call]) -> Any:
        """Several enqueue calls for one write, as an ``Exchange`` (``run``, ``finish``, ``sent``,
        ``replies``; see ``lean``): the coalescer's shared round trip. A call refused for a
        missing script did not run: its caller sends it again alone, which loads the script."""
        sha = self.scripts.enqueue.sha
        commands = [("EVALSHA", sha, len(c.keys), *c.keys, *c.args) for c in calls]
        if self._connections is not None:
            return self._connections.exchange(commands)
        return _PipelineExchange(self.client, commands)

    def enqueue_timed_out(self, stream: str, items: Sequence[tuple[str, int, bytes]], sent: bool) -> Exception:
        """For a caller whose shared round trip did not end within ``enqueue_timeout``."""
        why = f"the round trip carrying it did not end within enqueue_timeout ({self.settings.enqueue_timeout} s)"
        if sent:
            return EnqueueOutcomeUnknown(
                f"{len(items)} task(s) for {stream!r} MAY be stored on {self.address}: {why}; they are "
                "not sent again, which could store them twice",
                [task_id for task_id, _, _ in items],
            )
        return BackendUnavailableError(
            f"could not enqueue to {stream!r} on {self.address}: {why}, and nothing of it was sent: not stored"
        )

    def outcome_unknown(self, stream: str, call: Call, cause: BaseException | None) -> EnqueueOutcomeUnknown:
        ids = [str(task_id) for task_id in call.args[ENQUEUE_ITEMS::3]]
        return EnqueueOutcomeUnknown(
            f"{len(ids)} task(s) for {stream!r} MAY be stored on {self.address}: the request was written "
            f"but no reply came back ({type(cause).__name__}: {cause}); not sent again, which could store "
            "them twice. Look for the task ids before sending again; a dedup_key makes enqueues safe to re-send",
            ids,
        )

    # -- inspection and operator actions ------------------------------------------------------

    def queue_info(self, stream: str) -> dict[str, Any]:
        """Counts and lease of one stream: ``pending``, ``inflight``, ``dead``, ``lease`` (the
        token), ``holder`` (the replica id in it), ``fence``, ``lease_ttl_ms``, ``paused``."""
        k = self.keys.stream(stream)
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(k.pending).llen(k.inflight).zcard(k.dead).get(k.lease).pttl(k.lease)
        pipe.smismember(k.paused, [stream, queue_of(stream)])
        pending, inflight, dead, lease, ttl, paused = pipe.execute()
        token = lease.decode() if lease else None
        fence, _, nonce = (token or "").partition(":")
        return {
            "stream": stream,
            "pending": pending,
            "inflight": inflight,
            "dead": dead,
            "lease": token,
            "holder": nonce.rpartition("/")[0] or None,
            "fence": int(fence) if token else None,
            "lease_ttl_ms": ttl if lease else None,
            "paused": any(paused),
        }

    def replicas(self, include_silent: bool = False) -> list[dict[str, Any]]:
        """Workers of this prefix as their heartbeats describe them (id, host, pid, driver,
        concurrency, held streams), with ``silent_s``: seconds since the last heartbeat. Only
        live ones (heard within three heartbeats) unless ``include_silent``."""
        with self.translated():
            raw = self.client.hgetall(self.keys.replicas)
            seconds, micros = self.client.time()
        now_ms = seconds * 1000 + micros // 1000
        out = []
        for replica, body in raw.items():
            try:
                info: dict[str, Any] = json.loads(body)
            except ValueError:
                continue
            silent = max(0.0, (now_ms - int(info.get("seen_ms", 0))) / 1000)
            if include_silent or silent * 1000 <= 3 * int(info.get("heartbeat_ms", 2000)):
                out.append({"replica": replica.decode(), **info, "silent_s": round(silent, 3)})
        return sorted(out, key=lambda r: str(r["replica"]))

    def pause(self, queue: str, key: str | None = None, *, wait: float | None = None) -> HaltReport:
        """Pause a queue (every stream of it, across the fleet) or one keyed stream of it: a
        running task finishes, nothing new starts, enqueues are still accepted. The state is
        kept in Redis, so it survives restarts of the workers and of Redis (with AOF).

        Returns once every worker holding an affected stream has confirmed that it starts
        nothing more (tasks it took ahead go back to the stream, in order), or its lease has
        ended: from then on no task of the target starts anywhere. The wait is bounded by
        ``wait`` seconds, by default the lease TTL and a second (a holder that cannot answer
        loses its lease by then); the report says who confirmed and who did not."""
        self._set_paused(queue, key, add=True)
        target = stream_name(queue, key)
        return halts.wait_for_holders(self, target, halts.leased_streams(self, queue, key), wait)

    def resume(self, queue: str, key: str | None = None) -> None:
        """Undo ``pause``; idle workers are woken to look at once."""
        self._set_paused(queue, key, add=False)

    def _set_paused(self, queue: str, key: str | None, *, add: bool) -> None:
        validate_queue_name(queue)
        if key is None:
            targets = [(self.keys.paused(shard), queue, shard) for shard in range(self.keys.shards)]
        else:
            k = self.keys.stream(stream_name(queue, key))
            targets = [(k.paused, k.stream, k.shard)]
        pipe = self.client.pipeline(transaction=False)
        for paused_key, member, shard in targets:
            if add:
                pipe.sadd(paused_key, member)
            else:
                pipe.srem(paused_key, member)
                channel = self.keys.wake(shard)
                (pipe.spublish if self.keys.sharded_wake else pipe.publish)(channel, shard)
        with self.translated():
            pipe.execute()

    def paused(self) -> list[str]:
        """Paused queues and streams."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.smembers(self.keys.paused(shard))
        with self.translated():
            return sorted({m.decode() for members in pipe.execute() for m in members})

    def skip(self, stream: str, reason: str = "skipped by an operator") -> str | None:
        """Dead-letter the head task of a stream as ``operator`` so the stream moves on (a head
        that blocks it); the lease is revoked, which ends its holder's retries. Nobody else
        claims the stream until that holder has let go (at once if it runs only the skipped
        task, else when the task it runs now ends) or, if it died, its lease has lapsed, so
        tasks it took ahead never run twice at once. Returns the task id, or None when the
        stream holds no task."""
        header = dead_letter_header(
            "operator", replica=f"operator@{socket.gethostname()}", deliveries=0, error=RuntimeError(reason)
        )
        reply = self.operator_call(self.ops.skip(stream, header))
        return Entry.load(reply[1]).id if int(reply[0]) in (1, 2) else None

    def active_streams(self) -> list[str]:
        """Streams with work or a lease (the ready sets); idle streams are not tracked."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.zrange(self.keys.queues(shard), 0, -1)
        queues = [(shard, q.decode()) for shard, members in enumerate(pipe.execute()) for q in members]
        pipe = self.client.pipeline(transaction=False)
        for shard, queue in queues:
            pipe.zrange(self.keys.ready(shard, queue), 0, -1)
        return sorted(m.decode() for members in pipe.execute() for m in members)

    def dead_letter_streams(self) -> list[str]:
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.smembers(self.keys.dlq_index(shard))
        return sorted(m.decode() for members in pipe.execute() for m in members)

    def dead_letters(self, stream: str, limit: int = 100, offset: int = 0) -> list[DeadLetter]:
        """Dead letters of a stream, oldest first, one bounded page at a time."""
        raw_items = self.client.zrange(self.keys.stream(stream).dead, offset, offset + limit - 1)
        return [self._parse_dead_letter(stream, raw) for raw in raw_items]

    def dead_letter(self, stream: str, task_id: str) -> DeadLetter | None:
        """The dead letter of ``task_id`` in ``stream``, found through the id index."""
        k = self.keys.stream(stream)
        seq = self.client.hget(k.dead_ids, task_id)
        rows = self.client.zrangebyscore(k.dead, seq, seq) if seq is not None else []
        return self._parse_dead_letter(stream, rows[0]) if rows else None

    def _parse_dead_letter(self, stream: str, raw: bytes) -> DeadLetter:
        head, _, body = raw.partition(b"\n")
        try:
            header: dict[str, Any] = json.loads(head)
        except ValueError:
            header = {"reason": "unknown", "error": f"unreadable dead-letter header {head[:80]!r}"}
        entry = record = None
        try:
            entry = Entry.parse(body)
            record = TaskRecord.decode(entry.payload, self.settings.serializer)
        except DecodeError:
            pass
        return DeadLetter(stream, str(header.get("reason")), header, entry, record, raw)

    def requeue_dead_letters(
        self, stream: str, *, count: int | None = None, task_id: str | None = None, front: bool = False
    ) -> int:
        """Move dead letters back to pending: the one ``task_id``, or the ``count`` oldest (all
        by default); ``front`` puts them before the stream's pending work, in order. Returns
        how many moved; records whose task entry is malformed stay dead letters.

        Each script call looks at no more than ``REQUEUE_STEP`` records, so a requeue from a
        dead-letter set of any size never stalls Redis for its other clients."""
        if task_id is not None:
            moved, _, _ = self.operator_call(self.ops.requeue(stream, front=front, limit=1, task_id=task_id))
            return int(moved)
        k = self.keys.stream(stream)
        low, high = "-inf", "+inf"
        if count is not None:
            if count <= 0:
                return 0
            nth = self.client.zrange(k.dead, count - 1, count - 1, withscores=True)
            if nth:
                high = str(int(nth[0][1]))
        if front and min(count or math.inf, int(self.client.zcard(k.dead))) > REQUEUE_STEP:
            # Pages go to the front newest first: a holder taking between two calls would run
            # a later page before an earlier one. The stream is halted meanwhile, as a pause
            # does it (its holder confirms it starts nothing more), and resumed after.
            return self._halted(stream, lambda: self._requeue_pages(stream, front, low, high))
        return self._requeue_pages(stream, front, low, high)

    def _halted(self, stream: str, action: Callable[[], int]) -> int:
        k = self.keys.stream(stream)
        with self.translated():
            added = bool(self.client.sadd(k.paused, stream))
        try:
            halts.wait_for_holders(self, stream, [stream], None)
            # A halted holder lets go once its running task ends, putting what it took ahead
            # back at the head of pending: between two pages that would land in the middle of
            # the requeued block. Waiting for it (bounded) keeps the block whole.
            halts.wait_for_release(self, stream, self.settings.lease_ttl + halts.MARGIN_SECONDS)
            return action()
        finally:
            if added:  # an operator's own pause of the stream stays
                pipe = self.client.pipeline(transaction=False)
                pipe.srem(k.paused, stream)
                (pipe.spublish if self.keys.sharded_wake else pipe.publish)(self.keys.wake(k.shard), k.shard)
                with self.translated():
                    pipe.execute()

    def _requeue_pages(self, stream: str, front: bool, low: str, high: str) -> int:
        total = 0
        while True:
            call = self.ops.requeue(stream, front=front, limit=REQUEUE_STEP, low=low, high=high)
            moved, skipped, last = (int(x) for x in self.operator_call(call))
            total += moved
            if moved + skipped < REQUEUE_STEP:
                return total
            # Page on past what this call looked at: downwards for 'front', upwards otherwise.
            if front:
                high = f"({last}"
            else:
                low = f"({last}"

    def purge_dead_letters(self, stream: str) -> int:
        k = self.keys.stream(stream)
        pipe = self.client.pipeline(transaction=True)
        # UNLINK frees a large set in the background instead of blocking Redis.
        pipe.zcard(k.dead).unlink(k.dead, k.dead_ids).srem(k.dlq_index, stream)
        return int(pipe.execute()[0])


#: Dead-letter records one requeue script call looks at, at most.
REQUEUE_STEP = 500
