"""The lean path: pyfiq's script calls on plain redis-py connections, without the client's
per-command bookkeeping.

Taken only where the backend made the client itself from a URL (no cluster, no Sentinel, no
client of the application's), so nothing the client would record is read by anyone: its
retries are off in such a pool, and pyfiq retries on its own. Measured on a single enqueue, the
client's checkout and return of a pooled connection (locks, a readiness poll, observability
counters) and its command packer (which copies every argument through a generator) cost about
a sixth of the enqueue's CPU time; a coalesced round trip through the client's pipeline costs
more still.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import redis

pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis

    pack_command = hiredis.pack_command
except ImportError:  # redis-py without hiredis: the connection's own packer
    pack_command = None


def send(conn: Any, command: tuple[Any, ...]) -> None:
    if pack_command is None:
        conn.send_command(*command)
    else:
        conn.send_packed_command([pack_command(command)])


class LeanConnections:
    """Idle connections for lean calls, in a list (``pop`` and ``append`` are atomic) rather
    than the client's pool. A connection goes back only after a complete exchange: one
    interrupted mid-reply is disconnected first and reconnects on its next command, so none is
    handed out with a stray reply waiting in it (what the pool's readiness poll guards
    against)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._idle: list[Any] = []
        self._pid = os.getpid()

    def new(self) -> Any:
        """A connection outside any pool, for one thread's calls alone."""
        return self._pool.connection_class(**self._pool.connection_kwargs)

    def get(self) -> Any:
        if self._pid != os.getpid():
            # A forked child must not talk on its parent's sockets; dropping them closes
            # nothing in the parent (a connection only shuts down sockets of its own process).
            self._idle, self._pid = [], os.getpid()
        try:
            return self._idle.pop()
        except IndexError:
            return self.new()

    def put(self, conn: Any) -> None:
        self._idle.append(conn)

    def call(self, command: tuple[Any, ...], connection: Any = None) -> Any:
        """Send one command and read its reply, on ``connection`` or an idle one."""
        conn = connection or self.get()
        try:
            send(conn, command)
            return conn.read_response()
        except redis.exceptions.ResponseError:
            raise  # an error reply: the exchange is complete, the connection fine
        except BaseException:
            conn.disconnect()
            raise
        finally:
            if connection is None:
                self.put(conn)

    def call_many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write and read every reply, an error reply as its
        exception in place (a pipeline, not a transaction)."""
        conn = self.get()
        try:
            if pack_command is None:
                conn.send_packed_command(conn.pack_commands(commands))
            else:
                conn.send_packed_command([pack_command(c) for c in commands])
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self.put(conn)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.disconnect()
