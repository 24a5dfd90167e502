"""What a backend connects to, described once: a URL (one server, ``redis://``, ``rediss://``,
``unix://``), a Redis Cluster reached through a startup node, or a primary found through
Sentinel. The sync and the asyncio client are both built from that description, so the threaded
and the asyncio side of one backend always reach the same servers.

Also the wake-up subscriptions: one Pub/Sub channel on a single server, one sharded channel per
shard (``SSUBSCRIBE``) on a cluster, both read as plain wake-up messages.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.connection
import redis.retry
import redis.sentinel
from redis.backoff import NoBackoff

from ..config import Redacted, SecretURL, redact_url
from ..engine.keys import KeySchema
from ..errors import BackendUnavailableError, ConfigurationError


def redact(url: str) -> str:
    """``url`` with any password (in the authority, or a query parameter named like a secret such
    as ``password=``) replaced by ``***``."""
    return redact_url(url)


#: Every command pyfiq sends: the ones its scripts run (a test checks the scripts use no other)
#: and the ones workers, producers and the operator tools send themselves.
ACL_COMMANDS = (
    # scripts
    "evalsha", "script|load",
    # inside the scripts
    "del", "exists", "get", "hdel", "hexists", "hget", "hincrby", "hrandfield", "hset", "incr", "lindex", "llen",
    "lmove", "lpop", "lpos", "lpush", "lrange", "lrem", "ltrim", "pexpire", "pttl", "publish", "rpop", "rpush", "sadd",
    "set", "sismember", "spublish", "srem", "time", "zadd", "zcard", "zrange", "zrangebyscore", "zrem",
    "zremrangebyrank", "zrevrangebyscore", "zscore",
    # sent directly: wake-ups, inspection, operator actions, connection checks
    "subscribe", "unsubscribe", "ssubscribe", "sunsubscribe", "hgetall", "hmget", "smembers", "smismember", "unlink",
    "rename",
    "multi", "exec", "discard", "ping",
)  # fmt: skip


def acl_rules(prefix: str = "pyfiq") -> str:
    """The least a Redis user of pyfiq under ``prefix`` needs, as ``ACL SETUSER`` rules: its
    keys (``~prefix:*``), its wake-up channels (``&prefix:*``) and ``ACL_COMMANDS``."""
    return f"resetkeys ~{prefix}:* resetchannels &{prefix}:* -@all " + " ".join(f"+{c}" for c in ACL_COMMANDS)


def redact_text(text: str, url: str) -> str:
    """``text`` (an error message from redis-py) without the password of ``url`` in it."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    return text.replace(password, "***") if password else text


def default_options(asynchronous: bool) -> dict[str, Any]:
    """Client options pyfiq starts from; ``Settings.redis_options`` override them."""
    kind: Any = redis.asyncio.retry.Retry if asynchronous else redis.retry.Retry
    return {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 15,
        # A script re-sent after a lost reply could apply twice (take twice, ack twice): pyfiq
        # retries, with back-off, only where the operation tolerates it. Cluster redirections
        # (MOVED, ASK, TRYAGAIN) are followed by redis-py whatever this says.
        "retry": kind(NoBackoff(), 0),
        "max_connections": 64,
    }


@dataclass(frozen=True)
class Topology:
    """Where Redis is: ``kind`` is ``url``, ``cluster`` or ``sentinel``.

    ``options`` are redis-py client options (credentials, TLS files, timeouts); with Sentinel
    they apply to the primary's connections and ``sentinel_options`` to the sentinels'."""

    kind: str
    url: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    sentinel_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Its repr (a debugger's, an error tracker's) then says *** for every password it holds.
        object.__setattr__(self, "url", SecretURL(self.url))
        object.__setattr__(self, "options", Redacted(self.options))
        object.__setattr__(self, "sentinel_options", Redacted(self.sentinel_options))

    @property
    def sharded_pubsub(self) -> bool:
        return self.kind == "cluster"

    @property
    def address(self) -> str:
        """Where this connects, without credentials (for messages and repr)."""
        if self.kind == "sentinel":
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel://{hosts}/{self.service_name}"
        if self.kind == "cluster":
            return f"{redact(self.url)} (cluster)"
        return redact(self.url)

    def client(self, *, asynchronous: bool = False) -> Any:
        options = Redacted({**default_options(asynchronous), **self.options})
        try:
            if self.kind == "cluster":
                return _cluster_client(self.url, options, asynchronous)
            if self.kind == "sentinel":
                return self._sentinel_client(options, asynchronous)
            return (redis.asyncio.Redis if asynchronous else redis.Redis).from_url(self.url, **options)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigurationError):
                raise
            side = "redis.asyncio" if asynchronous else "redis"
            raise ConfigurationError(f"cannot build a {side} client for {self.address}: {exc}") from None
        except (redis.exceptions.RedisClusterException, redis.RedisError) as exc:
            # A sync cluster client reads the slot map as it is built: the cluster must answer.
            raise BackendUnavailableError(
                f"cannot reach the cluster at {self.address}: {type(exc).__name__}: {redact_text(str(exc), self.url)}"
            ) from None

    def _sentinel_client(self, options: dict[str, Any], asynchronous: bool) -> Any:
        module: Any = redis.asyncio.sentinel if asynchronous else redis.sentinel
        # Sentinels get their own options (their password, TLS), not the primary's; only the
        # socket timeouts carry over unless sentinel_options say otherwise.
        sentinel_kwargs = Redacted({k: v for k, v in options.items() if k.startswith("socket_")})
        sentinel_kwargs.update(self.sentinel_options)
        sentinel = module.Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_kwargs, **options)
        return sentinel.master_for(self.service_name)


def _cluster_client(url: str, options: dict[str, Any], asynchronous: bool) -> Any:
    if not url.startswith(("redis://", "rediss://")):
        raise ConfigurationError(
            f"a cluster is reached through a redis:// or rediss:// startup node, not {_scheme(url)}"
        )
    kind: Any = redis.asyncio.cluster.RedisCluster if asynchronous else redis.cluster.RedisCluster
    return kind.from_url(url, **options)


def _scheme(url: str) -> str:
    """What a refused URL is, for a message: its scheme only (the rest may hold a password)."""
    scheme = url.partition("://")[0] if "://" in url else ""
    return f"a {scheme}:// URL" if scheme.isalnum() else "a URL without a scheme"


def sentinel_addresses(sentinels: Sequence[Any]) -> tuple[tuple[str, int], ...]:
    """``[("host", 26379), "host:26379", ...]`` as (host, port) pairs, or ConfigurationError."""
    out = []
    for item in sentinels:
        host, port = item.rsplit(":", 1) if isinstance(item, str) else item
        try:
            out.append((str(host), int(port)))
        except ValueError:
            raise ConfigurationError(f"a sentinel is host:port, got {item!r}") from None
    if not out:
        raise ConfigurationError("from_sentinel needs at least one sentinel address")
    return tuple(out)


def primary_options(url: str) -> dict[str, Any]:
    """The credentials, database and TLS flag of a ``redis://`` or ``rediss://`` URL, without
    its address: what a Sentinel-managed primary is reached with."""
    if not url.startswith(("redis://", "rediss://")):
        raise ConfigurationError(f"with Sentinel, a redis:// or rediss:// URL gives credentials, not {_scheme(url)}")
    parsed: dict[str, Any] = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    options = Redacted({k: parsed[k] for k in ("username", "password", "db") if parsed.get(k) is not None})
    if url.startswith("rediss://"):
        options["ssl"] = True
    return options


def is_cluster_client(client: Any) -> bool:
    return isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


# -- wake-up subscriptions -------------------------------------------------------------------

#: How long a sharded read waits on one node before looking at the next: one node's silence
#: must not delay another node's wake-up by a whole read timeout.
_NODE_SLICE = 0.02


def _normalised(message: Any) -> dict[str, Any] | None:
    if not message or message.get("type") not in ("message", "smessage"):
        return None
    return {**message, "type": "message"}


class WakeListener:
    """Wake-up messages for the threaded worker: ``get_message(timeout)`` returns a message
    dict (``type`` ``message``, ``data`` the shard number) or None; ``close()`` ends it.
    Subscribes at once; a failure raises, and the caller makes a new listener later."""

    def __init__(self, client: Any, keys: KeySchema) -> None:
        self._sharded = keys.sharded_wake
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            if self._sharded:
                self._pubsub.ssubscribe(*(keys.wake(s) for s in range(keys.shards)))
            else:
                self._pubsub.subscribe(keys.wake_channel)
        except BaseException:
            self.close()
            raise

    def get_message(self, timeout: float) -> dict[str, Any] | None:
        if not self._sharded:
            return _normalised(self._pubsub.get_message(timeout=timeout))
        deadline = time.monotonic() + timeout
        while True:
            message = _normalised(self._pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=_NODE_SLICE))
            if message is not None or time.monotonic() >= deadline:
                return message

    def close(self) -> None:
        self._pubsub.close()


class AsyncWakeListener:
    """``WakeListener`` for the asyncio worker: ``await subscribe()`` first, then
    ``await get_message(timeout)``; ``await aclose()`` ends it."""

    def __init__(self, client: Any, keys: KeySchema) -> None:
        self._keys = keys
        self._sharded = keys.sharded_wake
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)

    async def subscribe(self) -> None:
        if self._sharded:
            await self._pubsub.ssubscribe(*(self._keys.wake(s) for s in range(self._keys.shards)))
        else:
            await self._pubsub.subscribe(self._keys.wake_channel)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        if not self._sharded:
            return _normalised(await self._pubsub.get_message(timeout=timeout))
        deadline = time.monotonic() + timeout
        while True:
            message = _normalised(
                await self._pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=_NODE_SLICE)
            )
            if message is not None or time.monotonic() >= deadline:
                return message

    async def aclose(self) -> None:
        await self._pubsub.aclose()
