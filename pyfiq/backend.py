"""The Redis backend: one connection pool, the registered scripts, enqueue and operator actions."""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import redis
import redis.asyncio
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import (
    AsyncRetrying,
    BaseRetrying,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from .config import Settings
from .core import Call, Ops
from .errors import BackendUnavailableError, ConfigurationError, DecodeError
from .keys import KeySchema
from .scripts import Scripts
from .task import Entry, TaskRecord

log = structlog.get_logger("pyfiq")
R = TypeVar("R", bound=BaseRetrying)

_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()

#: Errors after which Redis may be back shortly: worth a bounded retry.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)


def _memory_client(name: str, *, asynchronous: bool = False) -> Any:
    try:
        import fakeredis
    except ImportError as exc:  # pragma: no cover - fakeredis is a dependency
        raise ConfigurationError("memory:// needs fakeredis[lua]: pip install 'fakeredis[lua]'") from exc
    with _memory_lock:
        server = _memory_servers.setdefault(name, fakeredis.FakeServer())
    return fakeredis.FakeAsyncRedis(server=server) if asynchronous else fakeredis.FakeRedis(server=server)


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
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        settings: Settings | None = None,
        *,
        client: Any = None,
        **overrides: Any,
    ) -> None:
        settings = settings or Settings()
        if overrides:
            settings = settings.replace(**overrides)
        self.url = url
        self.settings = settings
        self.keys = KeySchema(settings.prefix, settings.shards)
        self.ops = Ops(self.keys, settings)
        self.is_memory = url.startswith("memory://")
        self._memory_name = urlparse(url).netloc or "default"
        self._client_options: dict[str, Any] = {}
        if client is not None:
            self.client = client
        elif self.is_memory:
            self.client = _memory_client(self._memory_name)
        else:
            options: dict[str, Any] = {
                "socket_timeout": 5.0,
                "socket_connect_timeout": 5.0,
                "health_check_interval": 15,
                # A script re-sent after a lost reply could apply twice (take twice, ack
                # twice): pyfiq retries only where the operation tolerates it.
                "retry": Retry(NoBackoff(), 0),
                "max_connections": 64,
            }
            options.update(settings.redis_options)
            self._client_options = options
            self.client = redis.Redis.from_url(url, **options)
        self.scripts = Scripts(self.client)
        self._async: tuple[Any, Scripts] | None = None
        self._layout_checked = False

    def __repr__(self) -> str:
        return f"RedisQueueBackend({self.url!r})"

    # -- plumbing used by the workers -----------------------------------------------------

    def call(self, call: Call, client: Any = None) -> Any:
        script = getattr(self.scripts, call.script)
        return script(keys=call.keys, args=call.args, client=client)

    def call_many(self, calls: Sequence[Call]) -> list[Any]:
        """Run several calls of idempotent scripts (``due``, ``renew``) in one round trip, not
        a transaction; errors are returned in place of their reply.

        EVALSHA goes straight into the pipeline: redis-py would otherwise ask SCRIPT EXISTS
        before every pipeline, an extra round trip per poll and heartbeat. If Redis lost its
        script cache (a restart), the scripts are loaded and the batch is sent again, which
        is why only idempotent scripts belong here."""
        if not calls:
            return []
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            for c in calls:
                script = getattr(self.scripts, c.script)
                pipe.evalsha(script.sha, len(c.keys), *c.keys, *c.args)
            replies = list(pipe.execute(raise_on_error=False))
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                return replies
            for name in {c.script for c in calls}:
                self.client.script_load(getattr(self.scripts, name).script)
        return replies

    # -- the asyncio side: a redis.asyncio client and the same scripts, created on first use --

    def _async_side(self) -> tuple[Any, Scripts]:
        if self._async is None:
            if self.is_memory:
                client = _memory_client(self._memory_name, asynchronous=True)
            else:
                client = redis.asyncio.Redis.from_url(self.url, **self._client_options)
            self._async = (client, Scripts(client))
        return self._async

    @property
    def async_client(self) -> Any:
        return self._async_side()[0]

    async def acall(self, call: Call, client: Any = None) -> Any:
        script = getattr(self._async_side()[1], call.script)
        return await script(keys=call.keys, args=call.args, client=client)

    async def acall_many(self, calls: Sequence[Call]) -> list[Any]:
        if not calls:
            return []
        # As call_many: EVALSHA straight into the pipeline, scripts reloaded if Redis lost them.
        scripts = self._async_side()[1]
        for _ in range(2):
            pipe = self.async_client.pipeline(transaction=False)
            for c in calls:
                pipe.evalsha(getattr(scripts, c.script).sha, len(c.keys), *c.keys, *c.args)
            replies = list(await pipe.execute(raise_on_error=False))
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
        call = self.ops.enqueue(stream, items, dedup_keys)
        try:
            if self._layout_checked:
                # One plain attempt first, as in enqueue_encoded.
                with contextlib.suppress(*TRANSIENT):
                    return Ops.parse_enqueue(await self.acall(call))
            else:
                await self._retrying(AsyncRetrying)(self.acheck_layout)
            reply: Any = await self._retrying(AsyncRetrying)(self.acall, call)
        except RetryError as exc:
            raise self._unavailable(stream, exc) from exc.last_attempt.exception()
        return Ops.parse_enqueue(reply)

    async def acheck_layout(self) -> None:
        if self._layout_checked:
            return
        client = self.async_client
        await client.set(self.keys.layout_key, self.keys.shards, nx=True)
        self._verify_layout(await client.get(self.keys.layout_key))

    async def aclose(self) -> None:
        if self._async is not None and not self.is_memory:
            await self._async[0].aclose()
        self._async = None

    def pubsub(self) -> Any:
        return self.client.pubsub(ignore_subscribe_messages=True)

    def check_layout(self) -> None:
        """Refuse to run beside replicas that shard the same prefix differently: their keys
        would not meet, and tasks would wait forever. Checked once per backend."""
        if self._layout_checked:
            return
        self.client.set(self.keys.layout_key, self.keys.shards, nx=True)
        self._verify_layout(self.client.get(self.keys.layout_key))

    def _verify_layout(self, stored: Any) -> None:
        if stored is not None and int(stored) != self.keys.shards:
            raise ConfigurationError(
                f"prefix {self.keys.prefix!r} on {self.url} is laid out with {int(stored)} shards, "
                f"this backend uses {self.keys.shards}: give every replica the same shards setting"
            )
        self._layout_checked = True

    def ping(self) -> bool:
        return bool(self.client.ping())

    def close(self) -> None:
        if not self.is_memory:
            self.client.close()

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
        if expires_in is not None and expires_in <= 0:
            raise ConfigurationError(f"expires_in must be positive seconds, got {expires_in!r}")
        ttl_ms = math.ceil(expires_in * 1000) if expires_in else 0
        return [(task_id, ttl_ms, rec.encode(self.settings.serializer)) for task_id, rec in records]

    def enqueue_encoded(
        self,
        stream: str,
        items: Sequence[tuple[str, int, bytes]],
        dedup_keys: Sequence[str] | None = None,
    ) -> list[tuple[str, bool]]:
        call = self.ops.enqueue(stream, items, dedup_keys)
        try:
            if self._layout_checked:
                # One plain attempt first: retry bookkeeping costs a fifth of an enqueue.
                with contextlib.suppress(*TRANSIENT):
                    return Ops.parse_enqueue(self.call(call))
            else:
                self._retrying(Retrying)(self.check_layout)
            reply = self._retrying(Retrying)(self.call, call)
        except RetryError as exc:
            raise self._unavailable(stream, exc) from exc.last_attempt.exception()
        return Ops.parse_enqueue(reply)

    def _unavailable(self, stream: str, exc: RetryError) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"could not enqueue to {stream!r} on {self.url}: Redis unreachable after "
            f"{exc.last_attempt.attempt_number} attempts ({exc.last_attempt.exception()})"
        )

    def _retrying(self, kind: type[R]) -> R:
        return kind(
            stop=stop_after_attempt(self.settings.enqueue_attempts) | stop_after_delay(self.settings.enqueue_timeout),
            wait=wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05),
            retry=retry_if_exception_type(TRANSIENT),
            reraise=False,
        )

    # -- inspection and operator actions ------------------------------------------------------

    def queue_info(self, stream: str) -> dict[str, Any]:
        k = self.keys.stream(stream)
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(k.pending).llen(k.inflight).llen(k.dlq).get(k.lease).pttl(k.lease)
        pending, inflight, dead, lease, ttl = pipe.execute()
        return {
            "stream": stream,
            "pending": pending,
            "inflight": inflight,
            "dead": dead,
            "lease": lease.decode() if lease else None,
            "lease_ttl_ms": ttl if lease else None,
        }

    def active_streams(self) -> list[str]:
        """Streams with work or a lease (the ready sets); idle streams are not tracked."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.zrange(self.keys.ready(shard), 0, -1)
        return sorted(m.decode() for members in pipe.execute() for m in members)

    def dead_letter_streams(self) -> list[str]:
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.smembers(self.keys.dlq_index(shard))
        return sorted(m.decode() for members in pipe.execute() for m in members)

    def dead_letters(self, stream: str, limit: int = 100) -> list[DeadLetter]:
        raw_items = self.client.lrange(self.keys.stream(stream).dlq, 0, limit - 1)
        return [self._parse_dead_letter(stream, raw) for raw in raw_items]

    def _parse_dead_letter(self, stream: str, raw: bytes) -> DeadLetter:
        head, _, body = raw.partition(b"\n")
        header: dict[str, Any] = json.loads(head)
        entry = record = None
        try:
            entry = Entry.parse(body)
            record = TaskRecord.decode(entry.payload, self.settings.serializer)
        except DecodeError:
            pass
        return DeadLetter(stream, str(header.get("reason")), header, entry, record, raw)

    def requeue_dead_letters(
        self, stream: str, *, count: int = 1_000_000, task_id: str | None = None, front: bool = False
    ) -> int:
        """Move dead letters (oldest first, or the one ``task_id``) back to pending; ``front``
        puts them before the stream's pending work."""
        return int(self.call(self.ops.requeue(stream, count, front, task_id)))

    def purge_dead_letters(self, stream: str) -> int:
        k = self.keys.stream(stream)
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(k.dlq).delete(k.dlq).srem(k.dlq_index, stream)
        return int(pipe.execute()[0])
