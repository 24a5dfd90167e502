"""The other side's client: a client handed to the backend serves one side (sync or asyncio);
the other side is built from the same connection description, so that both always reach the
same server, with the same database, credentials, TLS options, timeouts, retry policy and pool
size. A description that cannot be carried over is refused, never replaced by a guess."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.retry
import redis.connection
import redis.retry

from ..errors import ConfigurationError
from .memory import fake_twin, is_fake

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
    if is_fake(connection_class):
        return f"fakeredis://{kw.get('host') or kw.get('path')}/{db}"
    if kw.get("path"):
        return f"unix://{kw['path']}?db={db}"
    tls = issubclass(connection_class, (redis.connection.SSLConnection, redis.asyncio.connection.SSLConnection))
    return f"{'rediss' if tls else 'redis'}://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{db}"


def twin_client(client: Any, *, asynchronous: bool) -> Any:
    """A client of the other kind (``redis.asyncio`` for a sync ``client``, or the reverse)
    built from ``client``'s connection pool. Raises ``ConfigurationError`` when that
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
    if is_fake(connection_class):
        return fake_twin(kwargs, asynchronous=asynchronous)
    connections = _SYNC_TO_ASYNC_CONNECTIONS if asynchronous else _ASYNC_TO_SYNC_CONNECTIONS
    pools = _SYNC_TO_ASYNC_POOLS if asynchronous else _ASYNC_TO_SYNC_POOLS
    twin_connection = connections.get(connection_class)
    if twin_connection is None:
        raise refuse(f"its connections are {connection_class.__module__}.{connection_class.__qualname__}")
    twin_pool = pools.get(type(pool))
    if twin_pool is None:
        raise refuse(f"its pool is {type(pool).__module__}.{type(pool).__qualname__}")
    options = _twin_options(kwargs, _init_parameters(twin_connection), asynchronous, target, refuse)
    pool_options: dict[str, Any] = {"max_connections": pool.max_connections}
    if "timeout" in _init_parameters(twin_pool):
        pool_options["timeout"] = pool.timeout
    twin = twin_pool(connection_class=twin_connection, **pool_options, **options)
    return (redis.asyncio.Redis if asynchronous else redis.Redis)(connection_pool=twin)


def _twin_options(
    kwargs: dict[str, Any],
    accepted: frozenset[str],
    asynchronous: bool,
    target: str,
    refuse: Callable[[str], ConfigurationError],
) -> dict[str, Any]:
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
    return options


def _twin_retry(retry: Any, asynchronous: bool, refuse: Callable[[str], ConfigurationError]) -> Any:
    kind: type[Any] = redis.asyncio.retry.Retry if asynchronous else redis.retry.Retry
    if type(retry) is kind:
        return copy.deepcopy(retry)
    try:
        backoff, retries, errors = retry._backoff, retry.get_retries(), retry._supported_errors
    except AttributeError:
        raise refuse(f"its retry policy {type(retry).__qualname__} cannot be carried over") from None
    return kind(copy.deepcopy(backoff), retries, tuple(errors))
