"""The processes every harness shares (the scenario runner, the test suite, the benchmarks):
children that die with their parent, free loopback ports, waiting for a condition, and a
redis-server of one's own (``RedisProcess``, or a bare ``Node`` of a topology).

Nothing here touches a server it did not start.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from .clock import CLOCK_SHIFT_ENV, build_clock_shim


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL the child if the runner dies, so no process outlives a crashed run."""
    with contextlib.suppress(Exception):
        import ctypes  # only in the child, between fork and exec

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _preexec() -> Callable[[], None] | None:
    return _die_with_parent if sys.platform == "linux" else None


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a child that dies with this process (Linux).

    Linux ties PR_SET_PDEATHSIG to the *thread* that forked, not to the process: every child is
    forked from one long-lived thread, so it dies with the runner and never with the fault lane
    that happened to start it.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="pyfiq-spawner")
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return _spawner.submit(_start, argv, kwargs).result()


def _start(argv: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, preexec_fn=_preexec(), **kwargs)


def require_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback address (or ``localhost``), else raise ValueError."""
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(f"FaultProxy only works on loopback addresses, not {host!r}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((require_loopback(host), 0))
        return int(s.getsockname()[1])


#: A Redis Cluster node also listens on its port + 10000 (the cluster bus).
BUS_OFFSET = 10000


def free_ports(count: int, *, bus: bool = False) -> list[int]:
    """``count`` distinct free loopback ports; with ``bus``, each one's cluster bus port is
    free too."""
    found: list[int] = []
    while len(found) < count:
        port = free_port()
        if port in found or (bus and (port + BUS_OFFSET > 65535 or not _port_free(port + BUS_OFFSET))):
            continue
        found.append(port)
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def poll_until(predicate: Callable[[], bool], timeout: float, *, interval: float = 0.05) -> bool:
    """Whether ``predicate()`` came true within ``timeout`` seconds, asking every ``interval``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_for(predicate: Callable[[], bool], timeout: float, what: str = "", *, interval: float = 0.05) -> None:
    """Return once ``predicate()`` is true; Redis and socket errors count as not yet. RuntimeError
    after ``timeout`` seconds."""

    def settled() -> bool:
        try:
            return predicate()
        except (redis.RedisError, OSError):
            return False

    if not poll_until(settled, timeout, interval=interval):
        raise RuntimeError(f"timed out after {timeout}s waiting for {what or predicate}")


class RedisProcess:
    """A redis-server the runner (and the test suite, and the benchmarks) owns: loopback, a free port, its own
    directory, AOF with ``appendfsync`` (``None``: no persistence). It keeps its port across
    restarts. ``clock_shift_ms`` runs it with its wall clock shifted (negative: behind) through
    the clock shim, as a failover to a host whose clock is wrong would."""

    def __init__(
        self,
        directory: Path,
        *,
        appendfsync: str | None = "everysec",
        port: int | None = None,
        clock_shift_ms: int = 0,
        executable: str = "redis-server",
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.clock_shift_ms = clock_shift_ms
        self.executable = executable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, appendfsync: str | None = None, *, clock_shift_ms: int | None = None) -> RedisProcess:
        if appendfsync:
            self.appendfsync = appendfsync
        if clock_shift_ms is not None:
            self.clock_shift_ms = clock_shift_ms
        argv = [
            self.executable,
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--logfile", "redis.log",
        ]  # fmt: skip
        argv += (
            ["--appendonly", "yes", "--appendfsync", self.appendfsync] if self.appendfsync else ["--appendonly", "no"]
        )
        env = None
        if self.clock_shift_ms:
            env = {**os.environ, "LD_PRELOAD": str(build_clock_shim()), CLOCK_SHIFT_ENV: str(self.clock_shift_ms)}
        self.proc = popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    if client.ping():
                        break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                    time.sleep(0.02)
                except redis.ResponseError:  # LOADING the AOF
                    time.sleep(0.02)
        finally:
            client.close()
        return self

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


class Node:
    """One redis-server process with its own directory; it keeps its port across restarts."""

    def __init__(self, directory: Path, port: int, extra: list[str], config: Path | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.extra = extra
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        # A config file must come first; sentinels rewrite theirs, so they get one.
        argv = ["redis-server", *([str(self.config)] if self.config else [])]
        argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--logfile", "redis.log"]
        argv += self.extra
        self.proc = popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self.stop(kill=True)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its connections but answers nothing (a stalled replica)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1, **kw)

    def answers(self) -> bool:
        """Whether the node answers PING now."""
        c = self.client()
        try:
            return bool(c.ping())
        finally:
            c.close()


def command(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)``, which redis-py leaves untyped."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]
