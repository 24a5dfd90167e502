"""The lean path: pyfiq's script calls on plain redis-py connections, without the client's
per-command bookkeeping.

Taken only where the backend made the client itself from a URL (no cluster, no Sentinel, no
client of the application's), so nothing the client would record is read by anyone: its
retries are off in such a pool, and pyfiq retries on its own. Measured on a single enqueue, the
client's checkout and return of a pooled connection (locks, a readiness poll, observability
counters) and its command packer (which copies every argument through a generator) cost about
a sixth of the enqueue's CPU time; a coalesced round trip through the client's pipeline costs
more still.

Also what an enqueue needs to know when a call fails: whether its request may have reached
Redis (``Attempt``). A request whose bytes may have been written can have run, whatever error
follows, and is never sent again blindly; one that failed before (while connecting) certainly
did not run and may be retried.
"""

from __future__ import annotations

import math
import os
import select
import socket
from collections import deque
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import redis

pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis

    pack_command = hiredis.pack_command
except ImportError:  # redis-py without hiredis: the connection's own packer
    pack_command = None


class Attempt:
    """One try of a call. ``sent`` turns true right before the first byte of its request is
    written (after connecting): a failure while it is still false ran nothing; after it, the
    call may have run, whatever the error says."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


def send(conn: Any, command: tuple[Any, ...]) -> None:
    if pack_command is None:
        conn.send_command(*command)
    else:
        conn.send_packed_command([pack_command(command)])


def send_many(conn: Any, commands: Sequence[tuple[Any, ...]]) -> None:
    if pack_command is None:
        conn.send_packed_command(conn.pack_commands(commands))
    else:
        conn.send_packed_command([pack_command(c) for c in commands])


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

    def checked(self) -> Any:
        """An idle (or new) connection, connected, for a call that must know whether its request
        could have run. One that the server closed while it was idle (a restart) reads as
        readable: it is reconnected here, before anything is written, so that only a failure
        after the write leaves the outcome unknown. Costs a poll of about a microsecond."""
        conn = self.get()
        try:
            if conn._sock is not None and self._readable(conn):
                conn.disconnect()
            if conn._sock is None:
                conn.connect()
            else:
                conn.check_health()  # due every health_check_interval: a PING, before the write
        except BaseException:
            self.put(conn)
            raise
        return conn

    @staticmethod
    def _readable(conn: Any) -> bool:
        # The poll object is kept on the connection with the socket it watches: making one and
        # registering the socket on every call would cost three times the poll.
        sock = conn._sock
        watched = getattr(conn, "_pyfiq_poll", None)
        if watched is None or watched[0] is not sock:
            if not hasattr(select, "poll"):  # pragma: no cover - platforms without poll()
                return bool(select.select([sock], [], [], 0)[0])
            watched = conn._pyfiq_poll = (sock, select.poll())
            watched[1].register(sock, select.POLLIN)
        return bool(watched[1].poll(0))

    def put(self, conn: Any) -> None:
        self._idle.append(conn)

    def call(self, command: tuple[Any, ...], connection: Any = None, attempt: Attempt | None = None) -> Any:
        """Send one command and read its reply, on ``connection`` or an idle one; ``attempt``
        records whether the request may have been written."""
        conn = connection
        if conn is None:
            conn = self.get() if attempt is None else self.checked()
        try:
            if attempt is not None:
                attempt.sent = True
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
        exception in place (a pipeline, not a transaction). On a checked connection, as the
        client's pipeline would take: a poll or a heartbeat after a restart does not fail."""
        conn = self.checked()
        try:
            send_many(conn, commands)
            return [_reply(conn) for _ in commands]
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self.put(conn)

    def exchange(self, commands: Sequence[tuple[Any, ...]]) -> Exchange:
        return Exchange(self, commands)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.disconnect()


def _reply(conn: Any, **options: Any) -> Any:
    try:
        return conn.read_response(**options)
    except redis.exceptions.ResponseError as exc:
        return exc


def _packed(conn: Any, commands: Sequence[tuple[Any, ...]]) -> bytes:
    if pack_command is None:
        return b"".join(conn.pack_commands(commands))
    return b"".join([pack_command(c) for c in commands])


#: Bytes one read of an exchange asks the socket for.
_READ_SIZE = 65536


class Exchange:
    """Several commands in one write on one lean connection, and the reading of their replies,
    in a form that another thread can finish when the one running it is interrupted (a signal
    handler or an async exception raising in it: ``KeyboardInterrupt``, ``TimeLimitExceeded``).

    The commands of a shared round trip are every caller's in it: lost with the interruption of
    whoever sends them, the others could only be told their tasks may be stored. The interpreter
    runs a signal handler, or raises an async exception, only between bytecodes; a C function
    iterating over C callables runs none. So each step stores its result in the same C call that
    produced it (``list.extend(map(sock.send, ...))``, ``list.extend(iter(reader.gets, False))``):
    bytes written are counted, bytes received are fed to a hiredis reader of this exchange's own,
    and replies are recorded the moment the reader yields them, whatever instant an
    interruption falls on. ``finish`` then takes up the write and the reading where they stopped,
    and every reply it records is the right command's.

    Without hiredis (redis-py's own parser cannot promise that), or on TLS, an interrupted
    exchange's connection is dropped, and ``finish`` reports its calls as maybe run.
    """

    def __init__(self, connections: LeanConnections, commands: Sequence[tuple[Any, ...]]) -> None:
        self._connections = connections
        self._commands = commands
        self._conn: Any = None
        self._data = memoryview(b"")
        #: What each ``send`` wrote: their sum is how much of the request left.
        self._written: list[int] = []
        #: Bytes received and not yet fed to the reader, each chunk followed by None.
        self._inbox: deque[bytes | None] = deque()
        self._reader: Any = None
        #: Whether the request may have been written (see ``Attempt``).
        self.sent = False
        #: The replies read so far, in command order; an error reply as an exception.
        self.replies: list[Any] = []

    def run(self) -> list[Any]:
        conn = self._connections.checked()
        self._conn = conn
        try:
            self._data = memoryview(_packed(conn, self._commands))
            # TLS sockets send and receive in Python code, where an interruption can fall
            # between the bytes moving and their count being kept: those cannot be taken up.
            if pack_command is None or type(conn._sock) is not socket.socket:
                self.sent = True
                conn.send_packed_command([self._data.tobytes()])
                self.replies.extend(_reply(conn) for _ in self._commands)
            else:
                self._reader = hiredis.Reader(**_decoding(conn))
                self._exchange(conn)
        except Exception:
            self._drop()
            raise
        except BaseException:
            if self._reader is None:
                self._drop()
            raise
        self._release()
        return self.replies

    def _exchange(self, conn: Any) -> None:
        sock, data, written = conn._sock, self._data, self._written
        reader, inbox, replies, due = self._reader, self._inbox, self.replies, len(self._commands)
        self.sent = True
        try:
            while (done := sum(written)) < len(data):
                written.extend(map(sock.send, (data[done:],)))
            while True:
                replies.extend(iter(reader.gets, False))
                if len(replies) >= due:
                    return
                if not inbox:
                    inbox.extend(chain(map(sock.recv, (_READ_SIZE,)), (None,)))
                if not inbox[0]:
                    raise redis.ConnectionError("Connection closed by server.")
                deque(map(reader.feed, iter(inbox.popleft, None)), 0)
        except TimeoutError:
            raise redis.TimeoutError("Timeout in a round trip to Redis") from None
        except OSError as exc:
            raise redis.ConnectionError(f"Error in a round trip to Redis: {exc}") from exc
        except hiredis.ProtocolError as exc:
            raise redis.ConnectionError(f"Protocol error in a round trip to Redis: {exc}") from exc

    def _release(self) -> None:
        # Taken off before it goes back, so that no connection is ever put back twice.
        conn, self._conn = self._conn, None
        if conn is not None:
            self._connections.put(conn)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
            self._connections.put(conn)

    def finish(self) -> list[Any]:
        """After ``run`` was interrupted, from another thread: write what is left of the request,
        read the replies still due, and return them all; or raise, leaving in ``replies`` those
        read (each the right command's)."""
        if len(self.replies) >= len(self._commands):
            self._release()
            return self.replies
        if self._conn is None or self._reader is None:
            self._drop()
            raise redis.ConnectionError("interrupted, and its connection cannot be read on")
        try:
            self._exchange(self._conn)
        except BaseException:
            self._drop()
            raise
        self._release()
        return self.replies


def _decoding(conn: Any) -> dict[str, Any]:
    encoder = conn.encoder
    return {"encoding": encoder.encoding, "errors": encoder.encoding_errors} if encoder.decode_responses else {}


def exchange_on(
    pool: Any,
    commands: Sequence[tuple[Any, ...]],
    attempt: Attempt,
    last_timeout: float = 0.0,
    *,
    last_in_place: bool = False,
) -> Any:
    """Send ``commands`` in one write on a connection of a redis-py ``pool`` (its own checks
    included: connected, nothing stray waiting) and read every reply, an error reply as its
    exception in place. The last reply may take ``last_timeout`` seconds more than the socket
    timeout allows (``WAIT`` blocks that long by design). ``last_in_place``: the last reply,
    if it cannot be read (a timeout, a lost connection), is that error in its place, since the
    replies before it are known (the connection is dropped)."""
    conn = pool.get_connection()
    try:
        attempt.sent = True
        send_many(conn, commands)
        replies = [_reply(conn) for _ in commands[:-1]]
        timeout = None if conn.socket_timeout is None else conn.socket_timeout + last_timeout
        try:
            replies.append(_reply(conn, timeout=timeout))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if not last_in_place:
                raise
            replies.append(exc)  # redis-py dropped the connection
        return replies
    finally:
        pool.release(conn)


async def aexchange_on(
    conn: Any,
    commands: Sequence[tuple[Any, ...]],
    attempt: Attempt,
    last_timeout: float,
    *,
    last_in_place: bool = False,
) -> Any:
    """``exchange_on`` for a ``redis.asyncio`` connection the caller checked out (and puts
    back): connected here first, so that a failure to connect is one that ran nothing."""
    try:
        await conn.connect()
        attempt.sent = True
        await conn.send_packed_command(conn.pack_commands(commands))
        replies = [await _areply(conn, None) for _ in commands[:-1]]
        if not last_timeout:
            timeout = None
        else:
            timeout = math.inf if conn.socket_timeout is None else conn.socket_timeout + last_timeout
        try:
            replies.append(await _areply(conn, timeout))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if not last_in_place:
                raise
            await conn.disconnect()
            replies.append(exc)
        return replies
    except BaseException:
        # Cancelled or failed mid-exchange: a reply may still be on its way on this socket.
        await conn.disconnect()
        raise


async def _areply(conn: Any, timeout: float | None) -> Any:
    """One reply: within the socket timeout (``timeout`` None), or ``timeout`` seconds, after
    which redis-py answers None rather than raise (the connection is then dropped by the
    caller: the reply may still come)."""
    try:
        reply = await conn.read_response(timeout=timeout)
    except redis.exceptions.ResponseError as exc:
        return exc
    if reply is None and timeout is not None and timeout != math.inf:
        raise redis.TimeoutError(f"no reply within {timeout} s")
    return reply


async def apooled_exchange(
    pool: Any,
    commands: Sequence[tuple[Any, ...]],
    attempt: Attempt,
    last_timeout: float = 0.0,
    *,
    last_in_place: bool = False,
) -> Any:
    """``aexchange_on`` on a connection of a ``redis.asyncio`` pool."""
    conn = await pool.get_connection()
    try:
        return await aexchange_on(conn, commands, attempt, last_timeout, last_in_place=last_in_place)
    finally:
        await pool.release(conn)
