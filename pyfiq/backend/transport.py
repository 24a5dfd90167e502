"""The transport: one backend's clients (sync, and asyncio made on first use), its registered
scripts, and every way a script call travels: the client's own path, the lean path (plain
connections of a pool pyfiq made, see ``lean``), pipelines for idempotent batches, and durable
mode's script-then-WAIT (see ``durable``). Errors leave here translated (see ``failures``).

Both clients come from one description (a URL, a cluster, Sentinel: ``connect.Topology``), from
the client(s) an application gave (the missing side derived by ``twin``), or from the embedded
server (``memory``), so the threaded and the asyncio side always reach the same Redis.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, TypeAlias
from urllib.parse import urlparse

import redis
import redis.asyncio

from ..config import SecretURL, Settings
from ..engine.keys import KeySchema
from ..engine.protocol import Call
from ..engine.scripts import SETTLE
from ..errors import BackendUnavailableError, ConfigurationError
from . import failures
from .connect import AsyncWakeListener, Topology, WakeListener, is_cluster_client, redact
from .durable import acall_durably, call_durably, waited
from .lean import Attempt, Exchange, LeanConnections, apooled_exchange
from .memory import memory_client
from .scripts import Scripts
from .twin import describe_client, twin_client

#: A sync client: ``redis.Redis``, ``redis.cluster.RedisCluster``, a Sentinel primary's or a
#: fakeredis one. redis-py types their replies as "awaitable or not", so they stay untyped here.
SyncClient: TypeAlias = Any
#: The asyncio twin of ``SyncClient``.
AsyncClient: TypeAlias = Any
#: A connection of a redis-py pool (sync), handed out by ``own_connection``.
Connection: TypeAlias = Any


def command_of(call: Call, sha: str) -> tuple[Any, ...]:
    """``call`` as the EVALSHA command that runs it."""
    return ("EVALSHA", sha, len(call.keys), *call.keys, *call.args)


#: How many times writing a shard layout is tried when its keys vanish meanwhile (Redis
#: restarting empty, again and again).
LAYOUT_TRIES = 3


class PipelineExchange:
    """``lean.Exchange`` for a client without the lean path: its own pipeline. An interruption
    drops the pipeline's connection (redis-py's choice), so ``finish`` cannot read what was
    left: the calls it carried may have run."""

    def __init__(self, client: SyncClient, commands: Sequence[tuple[Any, ...]]) -> None:
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


class Transport:
    """Clients and script calls of one backend (see the module). ``client`` and
    ``async_client`` replace the description; given one, the other is derived from it."""

    def __init__(
        self,
        url: str,
        settings: Settings,
        *,
        client: SyncClient = None,
        async_client: AsyncClient = None,
        cluster: bool = False,
        topology: Topology | None = None,
    ) -> None:
        self.url = SecretURL(url)  # the URL as given; its repr hides the password
        self.settings = settings
        self.is_memory = url.startswith("memory://") and topology is None
        if self.is_memory and settings.durable:
            raise ConfigurationError("min_replicas: memory:// has no replicas to wait for")
        if topology is None and not self.is_memory and client is None and async_client is None:
            topology = Topology("cluster" if cluster else "url", url, options=dict(settings.redis_options))
        #: How both clients are built; None when they were given, or for memory://.
        self.topology = topology
        given_cluster = is_cluster_client(client or async_client)
        self.is_cluster = given_cluster or (topology is not None and topology.sharded_pubsub)
        self.keys = KeySchema(settings.prefix, settings.shards, sharded_wake=self.is_cluster)
        self._memory_name = (urlparse(url).netloc if self.is_memory else "") or "default"
        self._given_async = async_client
        self._memory_async = client is None and async_client is None and self.is_memory
        self._owns_sync_pool = False
        self.client: SyncClient = self._sync_client(client, async_client)
        self.scripts = Scripts(self.client)
        self._async: tuple[AsyncClient, Scripts] | None = None
        #: Whether this backend's shard layout was checked against the one Redis holds.
        self.layout_checked = False
        #: A plain client made from a URL: its calls may take the lean path.
        lean = type(self.client) is redis.Redis and topology is not None and topology.kind == "url"
        self.lean = LeanConnections(self.client.connection_pool) if lean else None

    def _sync_client(self, client: SyncClient, async_client: AsyncClient) -> SyncClient:
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
            return memory_client(self._memory_name)
        self.address = self.topology.address
        return self.topology.client()

    # -- errors ------------------------------------------------------------------------------

    def translate(self, exc: BaseException) -> BaseException:
        """``failures.translate`` for this backend's server."""
        return failures.translate(exc, self.address)

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
            if isinstance(reply, Exception) and failures.is_denied(reply):
                raise self.translate(reply) from None

    # -- the sync side -------------------------------------------------------------------------

    def call(self, call: Call, client: SyncClient = None, connection: Connection = None) -> Any:
        """Run one script call. ``connection``: one of ``own_connection``'s, for a thread that
        makes many calls (a worker's executor); durable mode sends on the pool as it must."""
        if client is None and waited(self, call):
            return call_durably(self, call)
        script = self.scripts[call.script]
        try:  # what translated() does, without a generator's cost on every task's call
            if client is None and self.lean is not None:
                return self._lean_call(script, call, connection)
            return script(keys=call.keys, args=call.args, client=client)
        except redis.RedisError as exc:
            mine = self.translate(exc)
            if mine is exc:
                raise
            raise mine from None

    def _lean_call(self, script: Any, call: Call, connection: Connection = None) -> Any:
        """EVALSHA without the client's per-command bookkeeping (its retries are off in a pool
        pyfiq made, and it records nothing pyfiq reads): a fifth of an enqueue's cost,
        measured. A script Redis lost (a restart) is loaded and sent again."""
        assert self.lean is not None
        try:
            return self.lean.call(command_of(call, script.sha), connection)
        except redis.exceptions.NoScriptError:
            self.client.script_load(script.script)
            return self.lean.call(command_of(call, script.sha), connection)

    def call_once(self, call: Call, attempt: Attempt) -> Any:
        """One call that must not be sent twice (an enqueue), ``attempt`` telling whether its
        request may have been written: exactly on the lean path and in durable mode; on the
        client's own path from the error (``failures.never_ran``)."""
        if waited(self, call):
            return call_durably(self, call, attempt)
        script = self.scripts[call.script]
        try:  # what translated() does, without a generator's cost on every enqueue
            if self.lean is None:
                attempt.sent = True
                return script(keys=call.keys, args=call.args)
            try:
                return self.lean.call(command_of(call, script.sha), attempt=attempt)
            except redis.exceptions.NoScriptError:  # Redis lost it (a restart): nothing ran
                attempt.sent = False
                self.client.script_load(script.script)
                return self.lean.call(command_of(call, script.sha), attempt=attempt)
        except redis.RedisError as exc:
            mine = self.translate(exc)
            if mine is exc:
                raise
            raise mine from None

    def operator_call(self, call: Call) -> Any:
        """An operator's script call (skip, requeue), which may not be sent twice: it goes on an
        idle connection checked first, so one whose server restarted meanwhile is dropped
        instead of failing the action after its request may have been written."""
        if self.lean is None or waited(self, call):
            return self.call(call)
        return self.call_once(call, Attempt())

    def own_connection(self) -> Connection:
        """A connection outside the pool for one thread's calls alone, or None where the client
        is not a plain one this backend made; close it with ``connection.disconnect()``."""
        return None if self.lean is None else self.lean.new()

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
            commands = [command_of(c, self.scripts[c.script].sha) for c in calls]
            with self.translated():
                if self.lean is not None:
                    # An idle worker's poll is the first hop of a task's start: the client's
                    # pipeline costs about 0.2 ms more than this per idle round trip, measured.
                    replies = self.lean.call_many(commands)
                else:
                    pipe = self.client.pipeline(transaction=False)
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = list(pipe.execute(raise_on_error=False))
            self._raise_denied(replies)
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                return replies
            for name in {c.script for c in calls}:
                self.client.script_load(self.scripts[name].script)
        return replies

    def exchange(self, calls: Sequence[Call]) -> Exchange | PipelineExchange:
        """Several calls of one script in one write, as an exchange (``run``, ``finish``,
        ``sent``, ``replies``; see ``lean.Exchange``) that another thread can finish: a shared
        round trip. A call refused for a missing script did not run: its caller sends it again
        alone (``call_once``), which loads the script."""
        commands = [command_of(c, self.scripts[c.script].sha) for c in calls]
        if self.lean is not None:
            return self.lean.exchange(commands)
        return PipelineExchange(self.client, commands)

    def _layout_keys(self) -> list[str]:
        """The keys that say how the prefix is laid out: every shard's of this backend's count
        (each poll writes its shard's again, so a shard the fleet polled since an empty restart
        is found), and the prefix's own, which earlier versions wrote."""
        return [*(self.keys.layout(shard) for shard in range(self.keys.shards)), self.keys.layout_key]

    def check_layout(self) -> None:
        """Refuse to run beside replicas that shard the same prefix differently: their keys
        would not meet, and tasks would wait forever. Checked once per backend, and again
        before a producer lays out a shard (``lay_out``). Shard 0's layout, in every count's,
        is written when missing, so the fleet hears of a backend that got there first; one
        refused writes nothing, so it locks out none of the replicas it disagrees with."""
        if self.layout_checked:
            return
        with self.translated():
            for _ in range(LAYOUT_TRIES):
                pipe = self.client.pipeline(transaction=False)
                for key in self._layout_keys():
                    pipe.get(key)
                self._verify_layout(pipe.execute())
                self.client.set(self.keys.layout(0), self.keys.shards, nx=True)
                if self._verify_layout([self.client.get(self.keys.layout(0))]):
                    self.layout_checked = True
                    return
        raise self._layout_vanishing()

    def lay_out(self, *shards: int) -> None:
        """Write the layout of ``shards``, which the enqueue script found missing and would not
        write itself: after the prefix's layout is checked again, since this backend may have
        checked it before an empty restart. Without that, a producer with more shards than the
        fleet would fill a shard no worker polls. Each is written tentative, lets no task in
        so, and is made final only once shard 0's layout, read again, is this backend's; one
        that found another's is taken back."""
        tentative = f"{self.keys.shards}?"
        try:
            for _ in range(LAYOUT_TRIES):
                self.layout_checked = False
                self.check_layout()
                with self.translated():
                    for shard in shards:
                        self.client.set(self.keys.layout(shard), tentative, nx=True)
                    if self._verify_layout([self.client.get(self.keys.layout(0))]):
                        for shard in shards:
                            self.call(self._settle(shard, final=True))
                        return
            raise self._layout_vanishing()
        except BaseException:
            self.layout_checked = False
            with contextlib.suppress(Exception), self.translated():
                for shard in shards:
                    self.call(self._settle(shard, final=False))
            raise

    def _settle(self, shard: int, *, final: bool) -> Call:
        count = str(self.keys.shards)
        return Call(SETTLE.name, [self.keys.layout(shard)], [f"{count}?", count if final else ""])

    def _verify_layout(self, stored: Sequence[Any]) -> bool:
        """Whether every layout in ``stored`` is there (None: missing); raises for another
        count's, tentative or not (a producer of that count is laying the prefix out)."""
        for count in (int(value.rstrip(b"?")) for value in stored if value is not None):
            if count != self.keys.shards:
                raise ConfigurationError(
                    f"prefix {self.keys.prefix!r} on {self.address} is laid out with {count} shards, this "
                    f"backend uses {self.keys.shards}: give every replica and producer the same shards setting"
                )
        return None not in stored

    def _layout_vanishing(self) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"the shard layout of prefix {self.keys.prefix!r} on {self.address} vanished {LAYOUT_TRIES} times "
            "while it was written (Redis restarting empty?); nothing was stored"
        )

    def pubsub(self) -> Any:
        return self.client.pubsub(ignore_subscribe_messages=True)

    def wake_listener(self) -> WakeListener:
        """Subscribed to the wake-up channels (one, or one per shard on a cluster)."""
        with self.translated():
            return WakeListener(self.client, self.keys)

    def ping(self) -> bool:
        return bool(self.client.ping())

    def close(self) -> None:
        if self.lean is not None:
            self.lean.close()
        if not self.is_memory:
            self.client.close()
        if self._owns_sync_pool:
            self.client.connection_pool.disconnect()

    # -- the asyncio side: a redis.asyncio client and the same scripts, made on first use ----

    def async_side(self) -> tuple[AsyncClient, Scripts]:
        if self._async is None:
            if self._given_async is not None:
                client = self._given_async
            elif self._memory_async:
                client = memory_client(self._memory_name, asynchronous=True)
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
    def async_client(self) -> AsyncClient:
        return self.async_side()[0]

    async def acall(self, call: Call, client: AsyncClient = None) -> Any:
        if client is None and waited(self, call):
            return await acall_durably(self, call, *self.async_side())
        script = self.async_side()[1][call.script]
        with self.translated():
            return await script(keys=call.keys, args=call.args, client=client)

    async def acall_once(self, call: Call, attempt: Attempt) -> Any:
        """``call_once`` on the asyncio client."""
        client, scripts = self.async_side()
        if waited(self, call):
            return await acall_durably(self, call, client, scripts, attempt)
        script = scripts[call.script]
        with self.translated():
            if self.lean is None:
                attempt.sent = True
                return await script(keys=call.keys, args=call.args)
            # The asyncio twin of the lean path's client: a plain pool, checked out directly.
            command = command_of(call, script.sha)
            (reply,) = await apooled_exchange(client.connection_pool, [command], attempt)
            if isinstance(reply, redis.exceptions.NoScriptError):  # Redis lost it: nothing ran
                attempt.sent = False
                await client.script_load(script.script)
                (reply,) = await apooled_exchange(client.connection_pool, [command], attempt)
            if isinstance(reply, Exception):
                raise reply
            return reply

    async def acall_many(self, calls: Sequence[Call]) -> list[Any]:
        """``call_many`` on the asyncio client."""
        if not calls:
            return []
        client, scripts = self.async_side()
        for _ in range(2):
            commands = [command_of(c, scripts[c.script].sha) for c in calls]
            with self.translated():
                if self.lean is not None:
                    replies = list(await apooled_exchange(client.connection_pool, commands, Attempt()))
                else:
                    pipe = client.pipeline(transaction=False)
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = list(await pipe.execute(raise_on_error=False))
            self._raise_denied(replies)
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                return replies
            for name in {c.script for c in calls}:
                await client.script_load(scripts[name].script)
        return replies

    async def aexchange(self, calls: Sequence[Call], attempt: Attempt) -> list[Any]:
        """``exchange`` on the asyncio client, run to its end: replies (an error reply as its
        exception) in order, ``attempt`` telling whether the request may have been written."""
        client, scripts = self.async_side()
        commands = [command_of(c, scripts[c.script].sha) for c in calls]
        with self.translated():
            if self.lean is not None:
                return list(await apooled_exchange(client.connection_pool, commands, attempt))
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            attempt.sent = True
            return list(await pipe.execute(raise_on_error=False))

    async def acheck_layout(self) -> None:
        """``check_layout`` on the asyncio client."""
        if self.layout_checked:
            return
        client = self.async_client
        with self.translated():
            for _ in range(LAYOUT_TRIES):
                pipe = client.pipeline(transaction=False)
                for key in self._layout_keys():
                    pipe.get(key)
                self._verify_layout(await pipe.execute())
                await client.set(self.keys.layout(0), self.keys.shards, nx=True)
                if self._verify_layout([await client.get(self.keys.layout(0))]):
                    self.layout_checked = True
                    return
        raise self._layout_vanishing()

    async def alay_out(self, *shards: int) -> None:
        """``lay_out`` on the asyncio client."""
        client, tentative = self.async_client, f"{self.keys.shards}?"
        try:
            for _ in range(LAYOUT_TRIES):
                self.layout_checked = False
                await self.acheck_layout()
                with self.translated():
                    for shard in shards:
                        await client.set(self.keys.layout(shard), tentative, nx=True)
                    if self._verify_layout([await client.get(self.keys.layout(0))]):
                        for shard in shards:
                            await self.acall(self._settle(shard, final=True))
                        return
            raise self._layout_vanishing()
        except BaseException:
            self.layout_checked = False
            with contextlib.suppress(Exception), self.translated():
                for shard in shards:
                    await self.acall(self._settle(shard, final=False))
            raise

    def async_wake_listener(self) -> AsyncWakeListener:
        """The asyncio ``wake_listener``; ``await listener.subscribe()`` before reading."""
        return AsyncWakeListener(self.async_client, self.keys)

    async def aclose(self) -> None:
        if self._async is not None and not self._memory_async:
            if self._given_async is not None or is_cluster_client(self._async[0]):
                await self._async[0].aclose()
            else:
                # A client made on a pool it was handed leaves the pool open on aclose().
                await self._async[0].aclose(close_connection_pool=True)
        self._async = None
