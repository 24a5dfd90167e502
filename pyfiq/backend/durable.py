"""Durable mode (``Settings.min_replicas``): a state-changing script call followed by ``WAIT``.

``WAIT n timeout`` counts the replicas that have what *its own connection* wrote, so it must
travel on the connection that ran the script: EVALSHA and WAIT go out in one write on one
connection checked out here (the server's, Sentinel's primary's, or on a cluster the node that
owns the call's slot; redis-py's cluster pipeline would send WAIT to every primary). Redirections
are followed here rather than by redis-py, which would re-send a redirected script alone and let
a WAIT on another connection vouch for it; they, and a script Redis lost, ran nothing.

WAIT's reply is read with ``replica_timeout`` on top of the socket timeout: WAIT blocks that long
by design, so a ``replica_timeout`` longer than the socket timeout (from ``redis_options``, the
URL or a given client) still works, and a shortfall is reported as one (``NotReplicatedError``)
rather than as a lost connection. A failure after the write may have run the script and is
raised as it is: nothing here sends it again (an enqueue's caller is told it may be stored, see
``enqueue.Enqueuer``; a worker does not repeat a failed step, it hands its
stream over with a fenced release, which a repeat cannot apply twice).
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import redis

from ..config import Settings
from ..engine.protocol import Call, ScriptCalls
from ..engine.scripts import ENQUEUE, SCRIPTS, ScriptName
from ..errors import NotReplicatedError
from ..logs import get_logger
from .connect import is_cluster_client
from .lean import Attempt, aexchange_on, apooled_exchange, exchange_on
from .scripts import Scripts

#: Scripts that change what a stream holds: each is followed by WAIT in durable mode (the table
#: says which, and why the others need not be).
WAITED: frozenset[ScriptName] = frozenset(spec.name for spec in SCRIPTS if spec.changes_stream)
#: Of those, the calls whose caller hears of a shortfall (``NotReplicatedError``): a producer's
#: and an operator's; a worker logs the shortfall and goes on rather than stop the fleet
#: whenever a replica is away.
RAISED: frozenset[ScriptName] = frozenset(spec.name for spec in SCRIPTS if spec.raises_shortfall)
#: Redirections and script reloads one call follows before it gives up.
TRIES = 4

log = get_logger()


class Durable(Protocol):
    """What durable mode needs of the transport it runs on."""

    @property
    def settings(self) -> Settings: ...

    @property
    def address(self) -> str: ...

    @property
    def client(self) -> Any: ...

    @property
    def scripts(self) -> Scripts: ...

    def translated(self) -> contextlib.AbstractContextManager[None]: ...

    def translate(self, exc: BaseException) -> BaseException: ...


class HasSettings(Protocol):
    @property
    def settings(self) -> Settings: ...


def waited(backend: HasSettings, call: Call) -> bool:
    """Whether ``call`` goes through durable mode on ``backend``."""
    return backend.settings.durable and call.script in WAITED


def _node(client: Any, call: Call, ask: redis.exceptions.AskError | None) -> Any:
    """The cluster node the call must run on (None off a cluster)."""
    if not is_cluster_client(client):
        return None
    if ask is None:
        return client.get_node_from_key(call.keys[0])
    node = client.get_node(host=ask.host, port=ask.port)
    if node is None:  # a node the slot map does not know yet: look again after a back-off
        raise redis.exceptions.TryAgainError(f"slot {ask.slot_id} is moving to an unknown node {ask.node_addr}")
    return node


def _commands(call: Call, sha: str, backend: Durable, asking: bool) -> list[tuple[Any, ...]]:
    settings = backend.settings
    commands: list[tuple[Any, ...]] = [("ASKING",)] if asking else []
    commands.append(("EVALSHA", sha, len(call.keys), *call.keys, *call.args))
    commands.append(("WAIT", settings.min_replicas, settings.replica_timeout_ms))
    return commands


def _step(reply: Any) -> str:
    """What a script reply asks for: ``done``, ``load`` (Redis lost the script), ``moved``,
    ``ask`` (the slot is migrating) or ``raise``. None of the last four ran the script."""
    if not isinstance(reply, Exception):
        return "done"
    if isinstance(reply, redis.exceptions.NoScriptError):
        return "load"
    if isinstance(reply, redis.exceptions.MovedError):
        return "moved"
    if isinstance(reply, redis.exceptions.AskError):
        return "ask"
    return "raise"


def confirm(backend: Durable, call: Call, reply: Any, replicas: Any) -> Any:
    """``reply`` once ``replicas`` (WAIT's answer) reaches ``min_replicas``; otherwise
    ``NotReplicatedError`` for a producer's or operator's call, a warning for a worker's."""
    wanted = backend.settings.min_replicas
    confirmed = replicas if isinstance(replicas, int) else 0
    if confirmed >= wanted:
        return reply
    timeout = backend.settings.replica_timeout
    lost = isinstance(replicas, (redis.ConnectionError, redis.TimeoutError))
    if lost and call.script not in RAISED:
        # A worker's step whose WAIT was cut off: raised as before, the stream handed over.
        raise replicas
    if call.script not in RAISED:
        log.warning("pyfiq.not_replicated", step=call.script, key=call.keys[0], replicas=confirmed, wanted=wanted)
        return reply
    if call.script == ENQUEUE.name:
        ids = [task_id for task_id, _ in ScriptCalls.parse_enqueue(call, reply)]
        what = f"{len(ids)} task(s) ARE stored in {call.args[0]!r} on {backend.address}"
        advice = "not re-sent, which could store them twice; re-send with a dedup_key to be sure"
    else:
        ids = []
        what = f"the {call.script} on {call.keys[0]!r} IS applied on {backend.address}"
        advice = "check the result after the failover, if one follows"
    if lost:
        # The script's reply came: it ran. Only WAIT's answer was lost with the connection.
        shortfall = f"the connection was lost before any of {wanted} replicas confirmed it ({replicas})"
    else:
        shortfall = f"only {confirmed} of {wanted} replicas confirmed within {timeout} s"
    raise NotReplicatedError(
        f"{what}, but {shortfall}, so a failover now could lose it: {advice}",
        ids,
        confirmed,
        wanted,
    )


def _refresh(client: Any) -> None:
    # A failed node's slots moved elsewhere: read the slot map again (if anyone answers).
    with contextlib.suppress(redis.RedisError, redis.exceptions.RedisClusterException):
        client.nodes_manager.initialize()


def call_durably(backend: Durable, call: Call, attempt: Attempt | None = None) -> Any:
    """Run ``call`` and WAIT for its replication on the same connection (see the module);
    ``attempt`` records whether the request may have been written."""
    attempt = attempt or Attempt()
    script = backend.scripts[call.script]
    client, ask = backend.client, None
    reply: Any = None
    for _ in range(TRIES):
        node = _node(client, call, ask)
        # A cluster node's own client: one connection, no redirections.
        target = client if node is None else client.get_redis_connection(node)
        commands = _commands(call, script.sha, backend, ask is not None)
        try:
            with backend.translated():
                replies = exchange_on(
                    target.connection_pool, commands, attempt, backend.settings.replica_timeout, last_in_place=True
                )
        except (redis.ConnectionError, redis.TimeoutError):
            if node is not None:
                _refresh(client)
            raise
        reply, ask = replies[-2], None
        step = _step(reply)
        if step == "done":
            if node is not None and isinstance(replies[-1], (redis.ConnectionError, redis.TimeoutError)):
                _refresh(client)
            return confirm(backend, call, reply, replies[-1])
        attempt.sent = False  # refused: the script did not run, and what follows is a new try
        if step == "load":
            client.script_load(script.script)
        elif step == "moved":
            client.nodes_manager.move_slot(reply)
        elif step == "ask":
            ask = reply
        else:
            break
    raise backend.translate(reply)


async def _arefresh(client: Any) -> None:
    with contextlib.suppress(redis.RedisError, redis.exceptions.RedisClusterException):
        await client.nodes_manager.initialize()


async def acall_durably(
    backend: Durable, call: Call, client: Any, scripts: Scripts, attempt: Attempt | None = None
) -> Any:
    """``call_durably`` on the backend's ``redis.asyncio`` ``client`` and its ``scripts``."""
    attempt = attempt or Attempt()
    script = scripts[call.script]
    ask = None
    reply: Any = None
    cluster = is_cluster_client(client)
    if cluster:
        await client.initialize()  # an asyncio cluster client reads its slot map on first use
    timeout = backend.settings.replica_timeout
    for _ in range(TRIES):
        node = _node(client, call, ask)
        commands = _commands(call, script.sha, backend, ask is not None)
        try:
            with backend.translated():
                if node is None:
                    replies = await apooled_exchange(
                        client.connection_pool, commands, attempt, timeout, last_in_place=True
                    )
                else:
                    conn = node.acquire_connection()
                    try:
                        replies = await aexchange_on(conn, commands, attempt, timeout, last_in_place=True)
                    finally:
                        node.release(conn)
        except (redis.ConnectionError, redis.TimeoutError):
            if cluster:
                await _arefresh(client)
            raise
        reply, ask = replies[-2], None
        step = _step(reply)
        if step == "done":
            if cluster and isinstance(replies[-1], (redis.ConnectionError, redis.TimeoutError)):
                await _arefresh(client)
            return confirm(backend, call, reply, replies[-1])
        attempt.sent = False  # refused: the script did not run, and what follows is a new try
        if step == "load":
            await client.script_load(script.script)
        elif step == "moved":
            await client.nodes_manager.move_slot(reply)
        elif step == "ask":
            ask = reply
        else:
            break
    raise backend.translate(reply)
