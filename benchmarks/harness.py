"""What every measurement shares: the processes a run owns (ended whatever happens), its
private redis-server, Redis's own command counters, the benchmark tasks, the report table, and
the machine it ran on.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import logging
import math
import os
import platform
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import IO, Any

import redis
import structlog

from pyfiq import current_task, fifo
from pyfiq.functions import FifoFunction
from pyfiq_harness.servers import RedisProcess, free_port

# -- child processes -------------------------------------------------------------------------

_children: list[subprocess.Popen[bytes]] = []
try:
    _libc: Any = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
    _libc = None


def _die_with_parent() -> None:  # runs in the child between fork and exec: nothing but prctl
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no child outlives a killed benchmark


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a process this run owns; ``cleanup`` ends it whatever happens."""
    proc = subprocess.Popen(argv, preexec_fn=_die_with_parent if _libc is not None else None, **kwargs)
    _children.append(proc)
    return proc


def end(proc: subprocess.Popen[bytes], *, kill: bool = False, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        (proc.kill if kill else proc.terminate)()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def cleanup() -> None:
    for proc in reversed(_children):
        with contextlib.suppress(Exception):
            end(proc, timeout=3)
    _children.clear()


def read_until(stream: IO[bytes], marker: bytes, timeout: float) -> bool:
    """Read a child's pipe until ``marker`` shows up, EOF, or ``timeout``."""
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                return False
            buf += chunk
            if marker in buf:
                return True
    return False


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0.0 where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# -- the private Redis -----------------------------------------------------------------------


class RedisServer(RedisProcess):
    """A redis-server this run owns: no persistence, or AOF with fsync every second, on a port
    found afresh at each start."""

    def __init__(self, executable: str, directory: Path, *, aof: bool) -> None:
        super().__init__(directory, appendfsync="everysec" if aof else None, executable=executable)

    def start(self, appendfsync: str | None = None, *, clock_shift_ms: int | None = None) -> RedisServer:
        self.port = free_port()
        super().start(appendfsync, clock_shift_ms=clock_shift_ms)
        if self.proc is not None:
            _children.append(self.proc)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def flush(self) -> None:
        with self.client() as c:
            c.flushall()

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is not None:
            end(self.proc, kill=kill, timeout=10)
            self.proc = None


CommandStats = dict[str, tuple[int, int]]


def command_stats(client: redis.Redis) -> CommandStats:
    """calls and usec per command (commands run inside scripts count too)."""
    info: dict[str, Any] = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in info.items()}


def stats_delta(before: CommandStats, after: CommandStats, *, exclude: tuple[str, ...] = ("info",)) -> CommandStats:
    out: CommandStats = {}
    for cmd, (calls, usec) in after.items():
        c0, u0 = before.get(cmd, (0, 0))
        if cmd not in exclude and calls > c0:
            out[cmd] = (calls - c0, usec - u0)
    return out


#: A child of this run: the benchmarks' own command line, run from the directory holding the
#: package (``cwd=ROOT``).
CHILD = [sys.executable, "-m", "benchmarks"]
ROOT = Path(__file__).resolve().parents[1]
PEERS = ("rq", "dramatiq", "huey")


@dataclass
class Run:
    """What every section gets: where to report, the server, the sizes, and where logs go."""

    report: Report
    server: RedisServer
    n: int
    quick: bool
    ceiling_s: float
    workdir: Path


# -- what the benchmark tasks do -------------------------------------------------------------


class Tally:
    """What benchmark tasks record: a count that sets ``done`` at its target, and start stamps."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.done = threading.Event()
        self.stamps: list[tuple[int, float, str]] = []  # (argument, time.time() at start, replica)

    def hit(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.done.set()


TALLY = Tally()


def noop(i: int) -> None:
    TALLY.hit()


def stamp(i: int, hold: float = 0.0) -> None:
    TALLY.stamps.append((i, time.time(), current_task().replica))
    TALLY.hit()
    if hold:
        time.sleep(hold)


async def anoop(i: int) -> None:
    TALLY.hit()


def keyed_stamp(key: int, i: int, hold: float = 0.0) -> None:
    stamp(i, hold)


def peer_task(i: int) -> None:
    """The peers' no-op (importable by name as ``__main__.peer_task`` in a peer child)."""
    TALLY.hit()


#: The @fifo bindings of the benchmark queues, by queue.
BOUND: dict[str, FifoFunction[..., Any]] = {}


def bench_fifo(func: Callable[..., Any], queue: str) -> FifoFunction[..., Any]:
    """One @fifo binding per queue, created on first use so that importing this file (as the
    idle child does) registers nothing."""
    if queue not in BOUND:
        BOUND[queue] = fifo(queue=queue, name=f"bench.{queue}", max_retries=0)(func)
    return BOUND[queue]


def new_prefix() -> str:
    return f"b{uuid.uuid4().hex[:8]}"


def quiet_logging() -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def loop_rate(fn: Callable[[], object], seconds: float, chunk: int = 100) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (the clock is read once per chunk)."""
    n = 0
    t0 = perf_counter()
    end_at = t0 + seconds
    while True:
        for _ in range(chunk):
            fn()
        n += chunk
        now = perf_counter()
        if now >= end_at:
            return n / (now - t0)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the results -----------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.rows: list[tuple[str, str, str, str]] = []

    def row(self, section: str, metric: str, value: str, ratio: str = "") -> None:
        self.rows.append((section, metric, value, ratio))

    def table(self) -> str:
        head = ("section", "metric", "value", "ratio")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        lines = []
        for n, r in enumerate([head, *self.rows]):
            lines.append(
                "  ".join(c.ljust(w) if i != 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            )
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)


def per_s(x: float) -> str:
    return f"{x:,.0f}/s"


def times(x: float, what: str) -> str:
    return f"{x:.2f}x {what}"


def ms(x: float, digits: int = 1) -> str:
    return f"{x * 1000:.{digits}f} ms"


# -- machine -----------------------------------------------------------------------------------


def machine(redis_server: str) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    version = subprocess.run([redis_server, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v=(\S+)", version)

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis_server": found.group(1) if found else version.strip(),
        "versions": {name: dist(name) for name in ("pyfiq", "redis", "hiredis", *PEERS)},
    }
