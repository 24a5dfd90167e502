"""A loopback TCP proxy that injects network faults between one replica and Redis.

``FaultProxy(redis_port).start()`` listens on ``127.0.0.1`` on a free port and forwards every
connection to the target. It can then:

- ``cut()``: reset every open connection and reset every new one at once (a crashed link or
  a firewall rejecting packets); clients see "connection reset" / "connection refused";
- ``blackhole()``: keep accepting, but silently drop every byte in both directions (a network
  partition); clients see timeouts. Connections that dropped bytes are out of step with the
  protocol, so ``heal()`` resets them, as a real partition ends in timed-out connections;
- ``delay(seconds)``: deliver every chunk ``seconds`` late, in order, in each direction (a slow
  link: a request-reply round trip takes ``2 * seconds`` longer); ``direction="replies"`` delays
  only what Redis sends back, so requests (lease renewals included) still reach Redis on time
  while their replies come late, and ``"requests"`` the other way round;
- ``heal()``: back to plain forwarding.

It runs an asyncio loop in one daemon thread of the calling process; every public method is
thread-safe and returns once the change is in force. Both ends must be loopback addresses:
this is a test instrument, never a relay to another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .servers import require_loopback

T = TypeVar("T")

#: Modes of the proxy.
PASS, CUT, BLACKHOLE = "pass", "cut", "blackhole"
#: Directions a delay applies to: client to Redis, Redis to client.
REQUESTS, REPLIES = "requests", "replies"
CHUNK = 65536


@dataclass
class ProxyStats:
    accepted: int = 0
    reset_on_accept: int = 0
    cuts: int = 0
    connections_reset: int = 0
    bytes_forwarded: int = 0
    bytes_dropped: int = 0


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    #: Bytes were dropped (blackhole): the protocol stream is broken, reset on heal.
    dirty: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN: the peer sees a reset at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, listen_host: str = "127.0.0.1") -> None:
        self.target_host = require_loopback(target_host)
        self.target_port = target_port
        self.listen_host = require_loopback(listen_host)
        self.port = 0
        self.stats = ProxyStats()
        self._mode = PASS
        self._delays = {REQUESTS: 0.0, REPLIES: 0.0}
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"fault-proxy-{self.target_port}", daemon=True)
        self._thread.start()
        self._server = self._run(self._listen())
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, self.listen_host, 0)

    def close(self) -> None:
        """Stop listening, reset every connection and end the proxy's thread."""
        if self._loop is None or self._thread is None:
            return
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_links(lambda link: True)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"redis://{self.listen_host}:{self.port}/0"

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def delay_seconds(self) -> float:
        return max(self._delays.values())

    @property
    def delays(self) -> dict[str, float]:
        """Seconds of delay per direction (``requests``, ``replies``)."""
        return dict(self._delays)

    @property
    def connections(self) -> int:
        return len(self._links)

    # -- faults ---------------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every connection; new connections are reset as soon as they are accepted."""

        async def apply() -> None:
            self._mode = CUT
            self.stats.cuts += 1
            self._reset_links(lambda link: True)

        self._run(apply())

    def blackhole(self) -> None:
        """Accept, but drop every byte both ways until ``heal()``."""

        async def apply() -> None:
            self._mode = BLACKHOLE

        self._run(apply())

    def delay(self, seconds: float, *, direction: str = "both") -> None:
        """Deliver every chunk ``seconds`` after it arrived (order is kept), in ``direction``:
        ``"both"``, ``"requests"`` (to Redis) or ``"replies"`` (from Redis); the other
        direction keeps its current delay."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        if direction not in ("both", REQUESTS, REPLIES):
            raise ValueError(f"direction must be 'both', 'requests' or 'replies', not {direction!r}")

        async def apply() -> None:
            for d in (REQUESTS, REPLIES) if direction == "both" else (direction,):
                self._delays[d] = seconds

        self._run(apply())

    def heal(self) -> None:
        """Forward normally again. Connections that lost bytes in a blackhole are reset."""

        async def apply() -> None:
            self._mode = PASS
            self._delays = {REQUESTS: 0.0, REPLIES: 0.0}
            self._reset_links(lambda link: link.dirty)

        self._run(apply())

    # -- internals ------------------------------------------------------------------------

    def _run(self, coro: Awaitable[T]) -> T:
        if self._loop is None:
            raise RuntimeError("FaultProxy is not started")

        async def wrap() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result(10)

    def _reset_links(self, which: Callable[[_Link], bool]) -> None:
        for link in list(self._links):
            if which(link):
                self.stats.connections_reset += 1
                self._close(link)

    def _close(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        _reset(link.client)
        if link.upstream is not None:
            _reset(link.upstream)
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        if self._mode == CUT:
            self.stats.reset_on_accept += 1
            _reset(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self._close(link)
            return
        if link.closed:  # cut while connecting
            _reset(up_writer)
            return
        link.upstream = up_writer
        link.tasks = [
            asyncio.ensure_future(self._pump(link, reader, up_writer, REQUESTS)),
            asyncio.ensure_future(self._pump(link, up_reader, writer, REPLIES)),
        ]

    async def _pump(self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(link, outbox, dst))
        link.tasks.append(sender)
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                if self._mode != PASS:  # blackhole (a cut link is closed already)
                    link.dirty = True
                    self.stats.bytes_dropped += len(data)
                    continue
                outbox.put_nowait((loop.time() + self._delays[direction], data))
            # Deliver what is still delayed, then close both sides.
            await outbox.join()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return
        self._close(link)

    async def _send(self, link: _Link, outbox: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                at, data = await outbox.get()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self._mode == PASS:
                    dst.write(data)
                    await dst.drain()
                    self.stats.bytes_forwarded += len(data)
                else:
                    link.dirty = True
                    self.stats.bytes_dropped += len(data)
                outbox.task_done()
        except OSError:
            self._close(link)
        except asyncio.CancelledError:
            return
