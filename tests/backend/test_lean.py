"""The lean path's own idle connections (``pyfiq.backend.lean``), against a real Redis: what the
client's pool guarded against must still hold without it."""

from __future__ import annotations

import os
import time

import pytest
import redis

from pyfiq import RedisQueueBackend
from pyfiq.backend.lean import Attempt
from tests.support.helpers import unique_prefix
from tests.support.servers import RedisServer

# Replies "late" after keeping the server busy for half a second.
SLOW = """
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1e6 + tonumber(t[2]) + 500000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1e6 + tonumber(t[2]) >= stop
return 'late'
"""


def _connections(backend: RedisQueueBackend):  # type: ignore[no-untyped-def]
    connections = backend.transport.lean
    assert connections is not None, "a backend made from a redis:// URL takes the lean path"
    return connections


def test_a_call_cut_off_mid_reply_never_leaves_its_reply_for_the_next_call(redis_server: RedisServer) -> None:
    """A reply that arrives after its caller gave up (a read timeout) must not be read as the
    reply of the next call on that connection: the interrupted connection goes back to the idle
    list disconnected (the client's pool would have polled it for stray data instead)."""
    backend = RedisQueueBackend(f"{redis_server.url}?socket_timeout=0.2", prefix=unique_prefix())
    lean = _connections(backend)
    try:
        with pytest.raises(redis.TimeoutError):
            lean.call(("EVAL", SLOW, 0))
        time.sleep(0.6)  # the late reply has arrived by now
        # The connection went back disconnected; reused, it reconnects and reads its own reply.
        for i in range(3):
            assert lean.call(("ECHO", f"call-{i}")) == f"call-{i}".encode()
    finally:
        backend.close()


def test_error_replies_come_back_in_place_and_keep_the_connection(redis_server: RedisServer) -> None:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix())
    lean = _connections(backend)
    try:
        replies = lean.call_many([("ECHO", "a"), ("NOSUCHCOMMAND",), ("ECHO", "b")])
        assert replies[0] == b"a" and replies[2] == b"b"
        assert isinstance(replies[1], redis.ResponseError)
        with pytest.raises(redis.ResponseError):
            lean.call(("NOSUCHCOMMAND",))
        assert lean.call(("ECHO", "after")) == b"after"
        assert len(lean._idle) == 1, "one connection served every call, sequentially"
    finally:
        backend.close()


def test_a_forked_child_opens_its_own_connections(redis_server: RedisServer) -> None:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix())
    lean = _connections(backend)
    try:
        assert lean.call(("CLIENT", "SETNAME", "parent")) == b"OK"
        pid = os.fork()
        if pid == 0:  # the child: its calls must not go out on the parent's socket
            try:
                name = lean.call(("CLIENT", "GETNAME"))
                os._exit(0 if name is None else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child talked on the parent's connection"
        assert lean.call(("CLIENT", "GETNAME")) == b"parent", "the child closed the parent's connection"
    finally:
        backend.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_before_anything_is_written(
    redis_server: RedisServer,
) -> None:
    """An idle connection the server closed (a restart, a timeout, CLIENT KILL) is found closed
    before the write, and replaced: the call then runs once, and a failure after the write is
    left to mean what it says (the request may have run)."""
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix())
    lean = _connections(backend)
    admin = redis_server.client()
    try:
        assert lean.call(("CLIENT", "SETNAME", "idle-one")) == b"OK"
        (idle,) = [c for c in admin.client_list() if c.get("name") == "idle-one"]
        admin.client_kill_filter(_id=idle["id"])
        time.sleep(0.1)
        attempt = Attempt()
        assert lean.call(("INCR", f"{backend.keys.prefix}:n"), attempt=attempt) == 1
        assert attempt.sent
        assert admin.get(f"{backend.keys.prefix}:n") == b"1"
    finally:
        admin.close()
        backend.close()


def test_polls_and_heartbeats_go_on_the_lean_path_with_errors_in_place(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``call_many`` (an idle worker's poll: the first hop of a task's start) skips the
    client's pipeline, sync and async, and still answers an error reply in its place."""
    import asyncio

    prefix = unique_prefix()
    backend = RedisQueueBackend(redis_server.url, prefix=prefix, shards=4)
    stray = RedisQueueBackend(redis_server.url, prefix=prefix, shards=8)
    backend.call_many([backend.ops.due(s, 1, None) for s in range(4)])  # lays the shards out
    client, _ = backend.transport.async_side()

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the client's pipeline was used")

    monkeypatch.setattr(backend.client, "pipeline", refused)
    monkeypatch.setattr(client, "pipeline", refused)
    monkeypatch.setattr(stray.client, "pipeline", refused)
    calls = [backend.ops.due(0, 1, None), backend.ops.due(1, 1, None)]
    assert backend.call_many(calls) == [[-1, 0], [-1, 0]]
    assert asyncio.run(backend.transport.acall_many(calls)) == [[-1, 0], [-1, 0]]
    replies = stray.call_many([stray.ops.due(1, 1, None), stray.ops.due(5, 1, None)])
    assert isinstance(replies[0], redis.ResponseError) and "PYFIQLAYOUT" in str(replies[0])
    assert replies[1] == [-1, 0]  # shard 5 was never laid out: the stray lays it out
    backend.close()
    stray.close()


def test_a_poll_after_the_server_closed_its_idle_connection_runs_at_once(redis_server: RedisServer) -> None:
    """A restart closes every idle connection: the next poll and heartbeat must not fail for
    it (a failed poll waits a back-off; a failed heartbeat brings a lease closer to lapsing)."""
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=1)
    lean = _connections(backend)
    admin = redis_server.client()
    try:
        assert backend.call_many([backend.ops.due(0, 1, None)]) == [[-1, 0]]
        assert lean.call(("CLIENT", "SETNAME", "idle-poller")) == b"OK"
        (idle,) = [c for c in admin.client_list() if c.get("name") == "idle-poller"]
        admin.client_kill_filter(_id=idle["id"])
        time.sleep(0.1)
        assert backend.call_many([backend.ops.due(0, 1, None)]) == [[-1, 0]]
    finally:
        admin.close()
        backend.close()
