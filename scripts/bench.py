#!/usr/bin/env python
"""Benchmark pyfiq against the Redis round-trip ceiling and against peer task queues.

Starts its own redis-server processes on free ports in a temporary
directory, measures, prints a table and writes JSON. Every figure comes with its ratio to a
baseline measured in the same run: absolute numbers on a shared machine mean little. The
"ceiling" is the round-trip rate of one redis-py connection running a trivial EVALSHA; since a
noisy machine's speed drifts, each throughput figure (drain, enqueue, peer) is divided by the
mean of two short ceiling runs taken right before and right after it, on the same server.

    python scripts/bench.py                                   # everything, 20000 tasks
    python scripts/bench.py --only ceiling,drain --tasks 50000
    python scripts/bench.py --quick --skip-peers --json /tmp/bench.json   # the smoke run
    python scripts/bench.py --only requeue,idle-foreign            # operator and idle cost at scale

Sections: ceiling (always measured: it is the baseline), drain (also on an AOF everysec server),
enqueue, peers (RQ, Dramatiq, Huey when installed), reruns (tasks run again after a SIGKILL
mid-drain, per acknowledgement mode), takeover (default settings), lease-load
(lease losses with the default TTL while busy processes saturate every core, against a quiet
run), idle, memory, latency, requeue
(the longest single Redis call of dead-letter operations on 1,000,000 records, by SLOWLOG,
against the median PING round trip), idle-foreign (an idle worker beside another queue's
60,000 due streams, against none). The idle section ends with 10 idle replica processes sharing
one queue, against the single idle worker of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import ctypes
import gc
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import IO, Any

import redis
import structlog

import pyfiq
from pyfiq import RedisQueueBackend, Settings, ThreadedWorker, current_task, fifo
from pyfiq.engine.outcomes import dead_letter_header
from pyfiq.functions import FifoFunction
from pyfiq.task import TaskRecord, new_task_id

SECTIONS = (
    "ceiling",
    "drain",
    "enqueue",
    "peers",
    "reruns",
    "takeover",
    "lease-load",
    "idle",
    "memory",
    "latency",
    "requeue",
    "idle-foreign",
)
PEERS = ("rq", "dramatiq", "huey")
#: The drain settings compared: what users run, the strict setting, and the fastest ones.
DRAINS: dict[str, dict[str, Any]] = {
    "default": {},
    "strict": {"ack_mode": "inline"},
    "group_100": {"prefetch": 100, "batch_limit": 1000},
    "inline_100": {"ack_mode": "inline", "prefetch": 100, "batch_limit": 1000},
}
SCRIPT = Path(__file__).resolve()

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


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# -- the private Redis -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server this run owns: no persistence, or AOF with fsync every second."""

    def __init__(self, executable: str, directory: Path, *, aof: bool) -> None:
        self.executable, self.dir, self.aof = executable, directory, aof
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.port = free_port()
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--logfile", "redis.log", "--daemonize", "no"]
        args += ["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof else ["--appendonly", "no"]
        self.proc = spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def flush(self) -> None:
        with self.client() as c:
            c.flushall()

    def stop(self) -> None:
        if self.proc is not None:
            end(self.proc, timeout=10)
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


_bound: dict[str, FifoFunction[..., None]] = {}


def bench_fifo(func: Callable[..., None], queue: str) -> FifoFunction[..., None]:
    """One @fifo binding per queue, created on first use so that importing this file (as the
    idle child does) registers nothing."""
    if queue not in _bound:
        _bound[queue] = fifo(queue=queue, name=f"bench.{queue}", max_retries=0)(func)
    return _bound[queue]


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


# -- 1. ceiling ------------------------------------------------------------------------------


def redis_benchmark(server: RedisServer, sha: str, requests: int) -> dict[str, float]:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return {}
    out: dict[str, float] = {}
    base = [exe, "-h", "127.0.0.1", "-p", str(server.port), "-c", "1", "-n", str(requests), "--csv"]
    for label, extra in (("ping", ["-t", "ping"]), ("evalsha", ["evalsha", sha, "0"])):
        try:
            proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            continue
        rows = [r for r in csv.reader(proc.stdout.splitlines()) if len(r) > 1 and r[0] != "test"]
        with contextlib.suppress(ValueError, IndexError):
            out[f"redis_benchmark_{label}_per_s"] = float(rows[-1][1])  # PING_MBULK for ping
    return out


def evalsha_rate(url: str, seconds: float) -> float:
    """Round trips per second of one redis-py connection running a trivial registered script."""
    client = redis.Redis.from_url(url)
    try:
        sha = client.script_load("return 1")
        return loop_rate(lambda: client.evalsha(sha, 0), seconds)
    finally:
        client.close()


def measure_ceiling(server: RedisServer, seconds: float, runs: int, requests: int) -> dict[str, Any]:
    rates = [evalsha_rate(server.url, seconds) for _ in range(runs)]
    with server.client() as client:
        sha = client.script_load("return 1")
    bench = redis_benchmark(server, sha, requests) if requests else {}
    return {"evalsha_per_s": statistics.median(rates), "runs": rates, **bench}


def report_ceiling(report: Report, label: str, c: dict[str, Any]) -> None:
    report.row(label, "redis-py EVALSHA round trips (median)", per_s(c["evalsha_per_s"]), "baseline")
    for key, name in (("redis_benchmark_ping_per_s", "PING"), ("redis_benchmark_evalsha_per_s", "EVALSHA")):
        if key in c:
            report.row(label, f"redis-benchmark -c 1 {name}", per_s(c[key]), times(c[key] / c["evalsha_per_s"], "py"))


# -- 2. ordered drain --------------------------------------------------------------------------


def queue_empty(backend: RedisQueueBackend, queue: str) -> bool:
    info = backend.queue_info(queue)
    return not (info["pending"] or info["inflight"])


def measure_drain(
    server: RedisServer, n: int, overrides: dict[str, Any], timeout: float, ceiling_s: float
) -> dict[str, Any]:
    settings = Settings(prefix=new_prefix(), **overrides)
    backend = RedisQueueBackend(server.url, settings)
    queue = "bench-drain"
    fn = bench_fifo(noop, queue)
    client = server.client()
    try:
        fn.enqueue_many(((i,) for i in range(n)), backend=backend)
        ceiling_before = evalsha_rate(server.url, ceiling_s)
        TALLY.reset(n)
        before = command_stats(client)
        t0 = perf_counter()
        worker = ThreadedWorker(backend, queues=[queue], concurrency=1).start()
        try:
            finished = TALLY.done.wait(timeout)
            # The last acknowledgement rides on one more call: the queue is drained when it lands.
            finished = finished and wait_for(lambda: queue_empty(backend, queue), 10, interval=0.001)
            elapsed = perf_counter() - t0
            done = TALLY.count
        finally:
            worker.stop(timeout=10)
        delta = stats_delta(before, command_stats(client))
        ceiling = (ceiling_before + evalsha_rate(server.url, ceiling_s)) / 2
    finally:
        backend.close()
        client.close()
        server.flush()
    calls, usec = delta.get("evalsha", (0, 0))
    return {
        "tasks": done,
        "seconds": elapsed,
        "tasks_per_s": done / elapsed,
        "ceiling_around": ceiling,
        "ratio_to_ceiling": done / elapsed / ceiling,
        "ack_mode": settings.ack_mode,
        "prefetch": settings.effective_prefetch,
        "batch_limit": settings.batch_limit,
        "evalsha_per_task": calls / max(done, 1),
        "redis_script_usec_per_task": usec / max(done, 1),
        "complete": bool(finished),
    }


def run_drains(
    report: Report, label: str, server: RedisServer, n: int, ceiling_s: float, c_client: float | None
) -> dict[str, Any]:
    """Each of ``DRAINS``; ``c_client``: the C client's EVALSHA round trips per second on this
    server (``redis-benchmark -c 1``), the round-trip limit of one connection here."""
    out: dict[str, Any] = {}
    for name, overrides in DRAINS.items():
        log(f"{label}: {n} tasks, {name}")
        r = measure_drain(server, n, overrides, 60 + n / 500, ceiling_s)
        if c_client:
            r["ratio_to_c_client"] = r["tasks_per_s"] / c_client
        out[name] = r
        note = "" if r["complete"] else " (TIMED OUT)"
        limit = f", {times(r['ratio_to_c_client'], 'C client')}" if c_client else ""
        report.row(
            label,
            f"{name}: {r['ack_mode']} prefetch={r['prefetch']} batch_limit={r['batch_limit']}{note}",
            per_s(r["tasks_per_s"]),
            times(r["ratio_to_ceiling"], "ceiling") + limit + f", {r['evalsha_per_task']:.3f} EVALSHA/task",
        )
    return out


# -- 3. enqueue ------------------------------------------------------------------------------


def measure_enqueue(server: RedisServer, seconds: float, ceiling_s: float) -> dict[str, Any]:
    backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix()))
    pyfiq.configure(backend)
    fn = bench_fifo(noop, "bench-enqueue")
    client = server.client()
    try:
        fn(0)  # warm: layout check, script load
        ceiling_before = evalsha_rate(server.url, ceiling_s)
        counter = itertools.count(1)
        single = loop_rate(lambda: fn(next(counter)), seconds, chunk=50)
        payload = client.lindex(backend.keys.stream("bench-enqueue").pending, 0) or b"x" * 100
        server.flush()
        batch = [(i,) for i in range(100)]
        before = command_stats(client)
        many = 100 * loop_rate(lambda: fn.enqueue_many(batch), seconds, chunk=5)
        many_calls, many_usec = stats_delta(before, command_stats(client)).get("evalsha", (0, 0))
        many_redis_usec = many_usec / max(1, 100 * many_calls)
        server.flush()

        def rpush_100() -> None:
            pipe = client.pipeline(transaction=False)
            for _ in range(100):
                pipe.rpush("bench:rpush", payload)
            pipe.execute()

        rpush = 100 * loop_rate(rpush_100, seconds, chunk=5)
        server.flush()
        threads, switches = threaded_enqueue(fn, 16, seconds)
        server.flush()
        tasks = asyncio_enqueue(server.url, 100, seconds)
        ceiling = (ceiling_before + evalsha_rate(server.url, ceiling_s)) / 2
    finally:
        backend.close()
        client.close()
        server.flush()
    return {
        "threads_16": {
            "tasks_per_s": threads,
            "ratio_to_ceiling": threads / ceiling,
            "context_switches_per_enqueue": switches,
        },
        "asyncio_100": {"tasks_per_s": tasks, "ratio_to_ceiling": tasks / ceiling},
        "single": {"tasks_per_s": single, "ratio_to_ceiling": single / ceiling, "ratio_to_rpush": single / rpush},
        "enqueue_many_100": {
            "tasks_per_s": many,
            "ratio_to_ceiling": many / ceiling,
            "ratio_to_rpush": many / rpush,
            "redis_script_usec_per_task": many_redis_usec,
        },
        "rpush_pipeline_100": {"tasks_per_s": rpush, "ratio_to_ceiling": rpush / ceiling},
        "stored_entry_bytes": len(payload),
        "ceiling_around": ceiling,
    }


def threaded_enqueue(fn: FifoFunction[..., None], producers: int, seconds: float) -> tuple[float, float]:
    """Tasks per second stored by ``producers`` threads each calling ``fn(i)`` in a loop (a web
    tier's request threads): their enqueues share round trips. Also the process's context
    switches per enqueue: what handing the interpreter lock between the threads costs."""
    counts = [0] * producers
    stop = threading.Event()

    def produce(p: int) -> None:
        while not stop.is_set():
            fn(counts[p])
            counts[p] += 1

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t0 = perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    switches = after.ru_nvcsw + after.ru_nivcsw - usage.ru_nvcsw - usage.ru_nivcsw
    return sum(counts) / elapsed, switches / max(1, sum(counts))


def asyncio_enqueue(url: str, producers: int, seconds: float) -> float:
    """Tasks per second stored by ``producers`` asyncio tasks each awaiting enqueues in a loop."""
    backend = RedisQueueBackend(url, Settings(prefix=new_prefix()))
    fn = bench_fifo(anoop, "bench-aenqueue")

    async def run() -> float:
        await fn.asend_with_options(args=(0,), backend=backend)  # warm: layout check, script load
        counts = [0] * producers
        end_at = perf_counter() + seconds

        async def produce(p: int) -> None:
            while perf_counter() < end_at:
                await fn.asend_with_options(args=(counts[p],), backend=backend)
                counts[p] += 1

        t0 = perf_counter()
        await asyncio.gather(*(produce(p) for p in range(producers)))
        elapsed = perf_counter() - t0
        await backend.aclose()
        return sum(counts) / elapsed

    try:
        return asyncio.run(run())
    finally:
        backend.close()


# -- 4. peers --------------------------------------------------------------------------------


Drain = Callable[[float], tuple[float, int]]


def peer_rq(url: str, n: int) -> Drain:
    from rq import Queue, SimpleWorker

    conn = redis.Redis.from_url(url)
    queue = Queue("bench", connection=conn)
    for start in range(0, n, 1000):
        queue.enqueue_many([Queue.prepare_data(peer_task, (i,)) for i in range(start, min(n, start + 1000))])

    def drain(timeout: float) -> tuple[float, int]:
        worker = SimpleWorker([queue], connection=conn)
        t0 = perf_counter()
        worker.work(burst=True, logging_level="ERROR", max_jobs=n)
        return perf_counter() - t0, TALLY.count

    return drain


def peer_dramatiq(url: str, n: int) -> Drain:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url)
    dramatiq.set_broker(broker)
    actor = dramatiq.actor(peer_task, actor_name="bench_noop", queue_name="bench", max_retries=0)
    for i in range(n):
        actor.send(i)

    def drain(timeout: float) -> tuple[float, int]:
        worker = dramatiq.Worker(broker, worker_threads=1)  # prefetch: $dramatiq_queue_prefetch
        t0 = perf_counter()
        worker.start()
        TALLY.done.wait(timeout)
        elapsed = perf_counter() - t0
        worker.stop()
        return elapsed, TALLY.count

    return drain


def peer_huey(url: str, n: int) -> Drain:
    from huey import RedisHuey

    huey = RedisHuey("bench", url=url)
    task = huey.task(name="bench_noop")(peer_task)
    for i in range(n):
        task(i)

    def drain(timeout: float) -> tuple[float, int]:
        consumer = huey.create_consumer(workers=1, worker_type="thread", periodic=False, check_worker_health=False)
        t0 = perf_counter()
        consumer.start()
        TALLY.done.wait(timeout)
        elapsed = perf_counter() - t0
        consumer.stop(graceful=True)
        return elapsed, TALLY.count

    return drain


PEER_SETUPS: dict[str, Callable[[str, int], Drain]] = {"rq": peer_rq, "dramatiq": peer_dramatiq, "huey": peer_huey}


def run_peers(report: Report, server: RedisServer, n: int, ceiling_s: float, logdir: Path) -> dict[str, Any]:
    variants = (
        ("rq", "rq", "SimpleWorker, burst", None),
        ("dramatiq", "dramatiq", "1 thread, default prefetch", None),
        ("dramatiq_prefetch_100", "dramatiq", "1 thread, prefetch 100", "100"),
        ("huey", "huey", "RedisHuey, 1 thread worker", None),
    )
    out: dict[str, Any] = {}
    timeout = 60 + n / 100
    for label, package, desc, prefetch in variants:
        if importlib.util.find_spec(package) is None:
            log(f"peer {label}: not installed")
            out[label] = {"skipped": "not installed"}
            report.row("peers", f"{package} ({desc})", "not installed")
            continue
        log(f"peer {label}: {n} tasks")
        server.flush()
        env = {k: v for k, v in os.environ.items() if k != "dramatiq_queue_prefetch"}
        if prefetch is not None:
            env["dramatiq_queue_prefetch"] = prefetch
        argv = [sys.executable, str(SCRIPT), "--child", "peer", "--peer", package, "--url", server.url]
        argv += ["--tasks", str(n), "--timeout", str(timeout), "--ceiling-seconds", str(ceiling_s)]
        with open(logdir / f"peer-{label}.log", "wb") as err:
            proc = spawn(argv, stdout=subprocess.PIPE, stderr=err, env=env)
            try:
                stdout, _ = proc.communicate(timeout=timeout + 120)
                result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                result = {"error": "timeout"}
            except (ValueError, IndexError):
                result = {"error": f"failed (exit {proc.returncode}), see {err.name}"}
            finally:
                end(proc, kill=True)
        server.flush()
        if "tasks_per_s" in result:
            incomplete = "" if result["tasks"] >= n else f" ({result['tasks']}/{n} done)"
            report.row(
                "peers",
                f"{package} ({desc}){incomplete}",
                per_s(result["tasks_per_s"]),
                times(result["ratio_to_ceiling"], "ceiling"),
            )
        else:
            report.row("peers", f"{package} ({desc})", result["error"])
        out[label] = result
    return out


def child_peer(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    drain = PEER_SETUPS[args.peer](args.url, args.tasks)  # enqueues, untimed
    ceiling_before = evalsha_rate(args.url, args.ceiling_seconds)
    TALLY.reset(args.tasks)
    elapsed, count = drain(args.timeout)
    ceiling = (ceiling_before + evalsha_rate(args.url, args.ceiling_seconds)) / 2
    rate = count / elapsed
    result = {"tasks": count, "seconds": elapsed, "tasks_per_s": rate, "ceiling_around": ceiling}
    print(json.dumps({**result, "ratio_to_ceiling": rate / ceiling}), flush=True)


def rerun_once(server: RedisServer, ack_mode: str, tasks: int, workdir: Path) -> dict[str, Any]:
    """A replica process drains journaled tasks of one queue and is SIGKILLed mid-drain; an
    in-process worker drains the rest. Counts the tasks that started again (the one running at
    the kill, and those whose end had not been acknowledged yet)."""
    from pyfiq.chaos.scenario import JOURNAL_ENV, STEPS, read_journal

    queue, prefix = "scenario-a", new_prefix()
    journal = workdir / f"reruns-{prefix}.jsonl"
    settings = Settings(prefix=prefix, shards=4, lease_ttl=1.0, poll_interval=0.2, ack_mode=ack_mode)
    backend = RedisQueueBackend(server.url, settings)
    STEPS[queue].enqueue_many([(i,) for i in range(tasks)], backend=backend)
    argv = [sys.executable, "-m", "pyfiq", "worker", "pyfiq.chaos.scenario", "--redis", server.url]
    argv += ["--prefix", prefix, "--shards", "4", "--queues", queue, "--concurrency", "1", "--name", "holder"]
    argv += ["--lease-ttl", "1.0", "--poll-interval", "0.2", "--ack-mode", ack_mode, "--log-level", "error"]
    env = {**os.environ, JOURNAL_ENV: str(journal), "PYTHONUNBUFFERED": "1"}
    old_journal = os.environ.get(JOURNAL_ENV)
    other: ThreadedWorker | None = None
    with open(workdir / f"reruns-{prefix}.log", "wb") as out:
        holder = spawn(argv, stdout=out, stderr=out, env=env)
    try:

        def ended() -> int:
            return journal.read_bytes().count(b'"event": "end"') if journal.exists() else 0

        if not wait_for(lambda: ended() >= 200, 60, interval=0.002):
            raise RuntimeError("the holder replica did not run tasks")
        holder.kill()
        holder.wait(10)
        before_kill = ended()
        os.environ[JOURNAL_ENV] = str(journal)
        other = ThreadedWorker(backend, queues=[queue], concurrency=1, replica="other").start()
        if not wait_for(lambda: queue_empty(backend, queue), 60, interval=0.02):
            raise RuntimeError("the queue was not drained after the kill")
        starts: dict[int, int] = {}
        for e in read_journal(journal):
            if e["event"] == "start" and e["attempt"] == 1:
                starts[e["seq"]] = starts.get(e["seq"], 0) + 1
        if sorted(starts) != list(range(tasks)):
            raise RuntimeError("a task never ran")
        return {"reruns": sum(n - 1 for n in starts.values()), "ended_before_kill": before_kill}
    finally:
        if other is not None:
            other.stop(timeout=5)
        if old_journal is None:
            os.environ.pop(JOURNAL_ENV, None)
        else:
            os.environ[JOURNAL_ENV] = old_journal
        end(holder, kill=True)
        backend.close()
        server.flush()


def measure_reruns(server: RedisServer, reps: int, tasks: int, workdir: Path) -> dict[str, Any]:
    """Re-runs after a SIGKILL mid-drain, per acknowledgement mode, over ``reps`` kills."""
    out: dict[str, Any] = {}
    for mode in ("group", "inline"):
        samples = [rerun_once(server, mode, tasks, workdir) for _ in range(reps)]
        counts = [s["reruns"] for s in samples]
        out[mode] = {"samples": samples, "median": statistics.median(counts), "max": max(counts)}
    return out


# -- 5. take-over ----------------------------------------------------------------------------


def measure_takeover_kill(server: RedisServer, reps: int, workdir: Path) -> dict[str, Any]:
    """A replica process holds a queue of 50 ms tasks and is SIGKILLed; an idle in-process
    worker measures how long until it starts the next task, with the default lease TTL and
    poll interval (what users run)."""
    from pyfiq.chaos.scenario import JOURNAL_ENV, STEPS, read_journal

    ttl, poll, queue = Settings.lease_ttl, Settings.poll_interval, "scenario-a"
    samples: list[dict[str, float]] = []
    for rep in range(reps):
        prefix = new_prefix()
        journal = workdir / f"takeover-{prefix}.jsonl"
        settings = Settings(prefix=prefix, shards=4, lease_ttl=ttl, poll_interval=poll)
        backend, other_backend = RedisQueueBackend(server.url, settings), RedisQueueBackend(server.url, settings)
        STEPS[queue].enqueue_many([(i, 0.05) for i in range(80)], backend=backend)
        argv = [
            sys.executable,
            "-m",
            "pyfiq",
            "worker",
            "pyfiq.chaos.scenario",
            "--redis",
            server.url,
            "--prefix",
            prefix,
        ]
        argv += ["--shards", "4", "--queues", queue, "--concurrency", "1", "--name", "holder"]
        argv += ["--lease-ttl", str(ttl), "--poll-interval", str(poll), "--log-level", "error"]
        env = {**os.environ, JOURNAL_ENV: str(journal), "PYTHONUNBUFFERED": "1"}
        other: ThreadedWorker | None = None
        old_journal = os.environ.get(JOURNAL_ENV)
        with open(workdir / f"holder-{rep}.log", "wb") as out:
            holder = spawn(argv, stdout=out, stderr=out, env=env)
        try:

            def starts(replica: str, path: Path = journal) -> list[dict[str, Any]]:
                return [e for e in read_journal(path) if e["event"] == "start" and e["replica"] == replica]

            if not wait_for(lambda: len(starts("holder")) >= 3, 30, interval=0.01):
                raise RuntimeError("the holder replica did not start running tasks")
            os.environ[JOURNAL_ENV] = str(journal)  # the in-process worker journals too
            other = ThreadedWorker(other_backend, queues=[queue], concurrency=1, replica="other").start()
            time.sleep(0.5)  # idle, subscribed, and past its first look
            lease_left = (backend.queue_info(queue)["lease_ttl_ms"] or 0) / 1000
            t_kill = time.time()
            holder.kill()
            holder.wait(10)
            if not wait_for(lambda: bool(starts("other")), ttl * 3 + 5, interval=0.005):
                raise RuntimeError("the queue was not taken over")
            took = starts("other")[0]["t"] - t_kill
            samples.append(
                {"kill_to_start_s": took, "lease_left_at_kill_s": lease_left, "after_expiry_s": took - lease_left}
            )
        finally:
            if other is not None:
                other.stop(timeout=5)
            if old_journal is None:
                os.environ.pop(JOURNAL_ENV, None)
            else:
                os.environ[JOURNAL_ENV] = old_journal
            end(holder, kill=True)
            backend.close()
            other_backend.close()
            server.flush()
    took = [s["kill_to_start_s"] for s in samples]
    return {
        "lease_ttl_s": ttl,
        "poll_interval_s": poll,
        "samples": samples,
        "median_s": statistics.median(took),
        "max_s": max(took),
        "after_expiry_median_s": statistics.median(s["after_expiry_s"] for s in samples),
    }


def measure_handoff(server: RedisServer, reps: int) -> dict[str, Any]:
    """Two in-process workers on one queue of 5 ms tasks: the holder's stop() hands the lease
    over; measured from the stop() call to the next task's start on the other worker."""
    queue = "bench-handoff"
    fn = bench_fifo(stamp, queue)
    samples: list[dict[str, Any]] = []
    for _ in range(reps):
        settings = Settings(prefix=new_prefix(), shards=4, lease_ttl=2.0, poll_interval=0.2, batch_limit=1000)
        a_backend, b_backend = RedisQueueBackend(server.url, settings), RedisQueueBackend(server.url, settings)
        fn.enqueue_many([(i, 0.005) for i in range(500)], backend=a_backend)
        TALLY.reset(10**9)
        a = ThreadedWorker(a_backend, queues=[queue], concurrency=1, replica="A").start()
        b: ThreadedWorker | None = None
        try:
            if not wait_for(lambda: len(TALLY.stamps) >= 5, 20):
                raise RuntimeError("the first worker did not start running tasks")
            b = ThreadedWorker(b_backend, queues=[queue], concurrency=1, replica="B").start()
            time.sleep(0.3)
            t_stop = time.time()
            a.stop(timeout=10)
            t_stopped = time.time()

            def by_b() -> list[tuple[int, float, str]]:
                return [s for s in list(TALLY.stamps) if s[2] == "B"]

            if not wait_for(lambda: bool(by_b()), 10, interval=0.001):
                raise RuntimeError("the queue was not handed over")
            first_b = by_b()[0]
            last_a = max(s[0] for s in TALLY.stamps if s[2] == "A")
            samples.append(
                {
                    "stop_to_start_s": first_b[1] - t_stop,
                    "stop_call_s": t_stopped - t_stop,
                    "in_order": first_b[0] == last_a + 1,
                }
            )
        finally:
            a.stop(timeout=5)
            if b is not None:
                b.stop(timeout=5)
            a_backend.close()
            b_backend.close()
            server.flush()
    took = [s["stop_to_start_s"] for s in samples]
    return {
        "samples": samples,
        "median_s": statistics.median(took),
        "max_s": max(took),
        "under_100ms": max(took) < 0.1,
        "in_order": all(s["in_order"] for s in samples),
    }


class LeaseEvents:
    """A hooks listener counting lease events of one queue."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.counts: dict[str, int] = {}

    def on_lease(self, stream: str, event: str) -> None:
        if stream.split("#")[0] == self.queue:
            self.counts[event] = self.counts.get(event, 0) + 1


def lease_window(server: RedisServer, load: int, seconds: float, streams: int) -> dict[str, Any]:
    """One worker with default settings holds ``streams`` keyed streams of 20 ms tasks for
    ``seconds`` while ``load`` busy-looping processes compete for the CPU. Counts lease losses
    (nobody else runs: every loss is false) and the lowest lease time left seen by a probe."""
    queue = "bench-lease-load"
    settings = Settings(prefix=new_prefix())
    backend = RedisQueueBackend(server.url, settings)
    events = LeaseEvents(queue)
    hogs = [spawn([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    per_stream = int(seconds / 0.02) + 50  # more than the window can run: leases stay held
    calls = [(k, i, 0.02) for i in range(per_stream) for k in range(streams)]
    if queue not in _bound:
        _bound[queue] = fifo(queue=queue, name=f"bench.{queue}", key=lambda k, i, hold: k, max_retries=0)(keyed_stamp)
    _bound[queue].enqueue_many(calls, backend=backend)
    lease_keys = [backend.keys.stream(f"{queue}#{k}").lease for k in range(streams)]
    probe = server.client()
    lowest = float("inf")
    pyfiq.hooks.add(events)
    TALLY.reset(10**9)
    worker = ThreadedWorker(backend, queues=[queue], concurrency=streams).start()
    try:
        end_at = time.monotonic() + seconds
        while time.monotonic() < end_at:
            pipe = probe.pipeline(transaction=False)
            for key in lease_keys:
                pipe.pttl(key)
            left = [v for v in pipe.execute() if v >= 0]
            if len(left) == streams:  # all held: measure only the steady state
                lowest = min(lowest, min(left) / 1000)
            time.sleep(0.02)
        ran = TALLY.count
    finally:
        worker.stop(timeout=10)
        pyfiq.hooks.remove(events)
        for hog in hogs:
            end(hog, kill=True)
        probe.close()
        backend.close()
        server.flush()
    return {
        "busy_processes": load,
        "seconds": seconds,
        "streams": streams,
        "tasks_run": ran,
        "leases_acquired": events.counts.get("acquired", 0) + events.counts.get("taken_over", 0),
        "leases_lost": events.counts.get("lost", 0),
        "lowest_lease_left_s": lowest if lowest != float("inf") else None,
        "lease_ttl_s": settings.lease_ttl,
    }


def measure_lease_load(server: RedisServer, seconds: float) -> dict[str, Any]:
    """Lease losses with the default TTL on a quiet host and on one whose every core is
    saturated (two busy processes per usable core), in the same run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {
        "quiet": lease_window(server, 0, seconds, 8),
        "saturated": lease_window(server, 2 * cores, seconds, 8),
    }


# -- 6. idle cost ----------------------------------------------------------------------------


def measure_idle(
    server: RedisServer, queue_counts: list[int], warmup: float, window: float, logdir: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = server.client()
    assert server.proc is not None
    for count in queue_counts:
        log(f"idle: one ThreadedWorker, {count} registered queues, {window:.0f} s window")
        server.flush()
        argv = [sys.executable, str(SCRIPT), "--child", "idle", "--url", server.url, "--prefix", new_prefix()]
        argv += ["--queues", str(count), "--timeout", str(warmup + window + 120)]
        with open(logdir / f"idle-{count}.log", "wb") as err:
            proc = spawn(argv, stdout=subprocess.PIPE, stderr=err)
        try:
            assert proc.stdout is not None
            if not read_until(proc.stdout, b"ready", 120):
                raise RuntimeError(f"the idle worker with {count} queues did not start")
            time.sleep(warmup)
            s0, cpu0, t0 = command_stats(client), proc_cpu_seconds(proc.pid), perf_counter()
            rcpu0 = proc_cpu_seconds(server.proc.pid)
            time.sleep(window)
            s1, cpu1, t1 = command_stats(client), proc_cpu_seconds(proc.pid), perf_counter()
            rcpu1 = proc_cpu_seconds(server.proc.pid)
            rss = vm_rss_kib(proc.pid)
        finally:
            end(proc)
        secs = t1 - t0
        delta = stats_delta(s0, s1)
        calls = sum(c for c, _ in delta.values())
        evalsha, usec = delta.get("evalsha", (0, 0))
        out[f"queues_{count}"] = {
            "commands_per_s": calls / secs,
            "evalsha_per_s": evalsha / secs,
            "redis_script_usec_per_s": usec / secs,
            "worker_cpu_percent": 100 * (cpu1 - cpu0) / secs,
            "redis_cpu_percent": 100 * (rcpu1 - rcpu0) / secs,
            "worker_rss_kib": rss,
            "by_command_per_s": {cmd: c / secs for cmd, (c, _) in sorted(delta.items())},
        }
    client.close()
    return out


def measure_idle_fleet(
    server: RedisServer, replicas: int, warmup: float, window: float, logdir: Path
) -> dict[str, Any]:
    """``replicas`` idle worker processes of one queue on one prefix: what they send Redis
    together once their views of each other have settled (``warmup``)."""
    log(f"idle: {replicas} idle replica processes, {warmup:.0f} s to settle, {window:.0f} s window")
    server.flush()
    client = server.client()
    assert server.proc is not None
    argv = [sys.executable, str(SCRIPT), "--child", "idle", "--url", server.url, "--prefix", new_prefix()]
    argv += ["--queues", "1", "--timeout", str(warmup + window + 120)]
    procs = []
    try:
        for i in range(replicas):
            with open(logdir / f"idle-fleet-{i}.log", "wb") as err:
                procs.append(spawn(argv, stdout=subprocess.PIPE, stderr=err))
        for proc in procs:
            assert proc.stdout is not None
            if not read_until(proc.stdout, b"ready", 120):
                raise RuntimeError("an idle replica process did not start")
        time.sleep(warmup)
        s0, rcpu0, t0 = command_stats(client), proc_cpu_seconds(server.proc.pid), perf_counter()
        time.sleep(window)
        s1, rcpu1, t1 = command_stats(client), proc_cpu_seconds(server.proc.pid), perf_counter()
    finally:
        for proc in procs:
            end(proc)
        client.close()
    return {"replicas": replicas, **redis_load(stats_delta(s0, s1), t1 - t0, rcpu1 - rcpu0)}


def redis_load(delta: CommandStats, secs: float, redis_cpu_s: float) -> dict[str, Any]:
    """What Redis did per second over a window: commands (scripts' own included), script calls
    and their time, its CPU share, and the rate of each command."""
    evalsha, usec = delta.get("evalsha", (0, 0))
    return {
        "commands_per_s": sum(c for c, _ in delta.values()) / secs,
        "evalsha_per_s": evalsha / secs,
        "redis_script_usec_per_s": usec / secs,
        "redis_cpu_percent": 100 * redis_cpu_s / secs,
        "by_command_per_s": {cmd: c / secs for cmd, (c, _) in sorted(delta.items())},
    }


def child_idle(args: argparse.Namespace) -> None:
    quiet_logging()
    for i in range(args.queues):
        fifo(queue=f"idle-{i}", name=f"bench.idle.{i}")(noop)
    worker = ThreadedWorker(RedisQueueBackend(args.url, Settings(prefix=args.prefix)))  # every registered queue
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    worker.start()
    print("ready", flush=True)
    stop.wait(args.timeout)
    worker.stop(timeout=5)


# -- 7. memory -------------------------------------------------------------------------------


def measure_memory(server: RedisServer, count: int, logdir: Path) -> dict[str, Any]:
    from pyfiq.chaos.scenario import STEPS

    out: dict[str, Any] = {}
    server.flush()
    backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix()))
    client = server.client()
    fn = bench_fifo(noop, "bench-memory")
    try:
        bench_fifo(noop, "bench-memory-warm")(0)  # scripts loaded, layout key written
        before = int(client.info("memory")["used_memory"])
        fn.enqueue_many([(i,) for i in range(count)], backend=backend)
        after = int(client.info("memory")["used_memory"])
        key = backend.keys.stream("bench-memory").pending
        usage = client.memory_usage(key, samples=0) or 0
        out["redis"] = {
            "tasks": count,
            "used_memory_bytes_per_task": (after - before) / count,
            "memory_usage_bytes_per_task": usage / count,
            "stored_entry_bytes": len(client.lindex(key, 0) or b""),
        }
    finally:
        backend.close()
        server.flush()

    # The replica: RSS idle, then holding a queue with `count` tasks behind a long first task.
    prefix = new_prefix()
    backend = RedisQueueBackend(server.url, Settings(prefix=prefix))
    queue = "scenario-b"
    argv = [sys.executable, "-m", "pyfiq", "worker", "pyfiq.chaos.scenario", "--redis", server.url, "--prefix", prefix]
    argv += ["--queues", queue, "--concurrency", "1", "--name", "rss", "--log-level", "error"]
    with open(logdir / "rss-replica.log", "wb") as log_out:
        proc = spawn(argv, stdout=log_out, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        if not read_until(proc.stderr, b"ready", 60):
            raise RuntimeError("the replica did not start")
        time.sleep(0.5)
        idle = vm_rss_kib(proc.pid)
        STEPS[queue].send_with_options(args=(0, 120.0), backend=backend)  # holds the queue
        STEPS[queue].enqueue_many([(i, 0.0) for i in range(1, count)], backend=backend)
        if not wait_for(lambda: backend.queue_info(queue)["inflight"] >= 1, 30, interval=0.01):
            raise RuntimeError("the replica did not take the queue")
        time.sleep(0.5)
        out["replica"] = {
            "queued_tasks": backend.queue_info(queue)["pending"],
            "rss_idle_kib": idle,
            "rss_with_queued_kib": vm_rss_kib(proc.pid),
        }
    finally:
        end(proc, kill=True)
        backend.close()
        client.close()
        server.flush()
    return out


# -- 8. latency ------------------------------------------------------------------------------


def measure_latency(server: RedisServer, count: int, gap: float) -> dict[str, Any]:
    """Enqueue one task at a time into an idle system; latency = its start - the enqueue call."""
    settings = Settings(prefix=new_prefix())
    worker_backend, producer = RedisQueueBackend(server.url, settings), RedisQueueBackend(server.url, settings)
    queue = "bench-latency"
    fn = bench_fifo(stamp, queue)
    TALLY.reset(count)
    sent: dict[int, float] = {}
    calls: list[float] = []
    worker = ThreadedWorker(worker_backend, queues=[queue], concurrency=1).start()
    try:
        time.sleep(0.5)
        for i in range(count):
            t = time.time()
            fn.send_with_options(args=(i,), backend=producer)
            calls.append(time.time() - t)
            sent[i] = t
            time.sleep(gap)
        TALLY.done.wait(30)
    finally:
        worker.stop(timeout=10)
        worker_backend.close()
        producer.close()
        server.flush()
    lat = sorted(started - sent[i] for i, started, _ in TALLY.stamps)
    calls.sort()
    return {
        "tasks": len(lat),
        "gap_s": gap,
        "p50_s": percentile(lat, 50),
        "p90_s": percentile(lat, 90),
        "p99_s": percentile(lat, 99),
        "max_s": lat[-1],
        "enqueue_call_p50_s": percentile(calls, 50),
        "enqueue_call_p99_s": percentile(calls, 99),
    }


# -- 9. dead letters at scale --------------------------------------------------------------


#: Client name of the connection under test. SLOWLOG also holds the probe's PINGs and this
#: script's own bookkeeping; the name is how the operator's calls are told apart.
OPERATOR = "bench-operator"
#: SLOWLOG threshold (µs). Not 0: Redis 7 also logs every command a script runs as an entry of
#: its own, about six per dead letter moved, and logging them made the measured scripts 15-45 %
#: slower in trials. Those inner commands take a µs or two, so 10 µs leaves them out; a call of
#: the operation shorter than that is reported as under 10 µs.
SLOWLOG_THRESHOLD_US = 10
SLOWLOG_ENTRIES = 100_000


def fill_dead_letters(client: redis.Redis, backend: RedisQueueBackend, stream: str, n: int) -> Callable[[int], str]:
    """``n`` dead letters of one stream in the stored format (the record ``dead_add`` in
    lib.lua writes, with a real header and traceback), written directly: through the scripts
    a million would take minutes. Returns the task id of a given sequence number."""
    k = backend.keys.stream(stream)
    tag = uuid.uuid4().hex[:16]

    def task_id(seq: int) -> str:
        return f"{tag}{seq:016x}"

    try:
        raise RuntimeError("downstream refused the request")
    except RuntimeError as exc:
        header = dead_letter_header(
            "exhausted", replica="bench", deliveries=3, attempts=3, name="bench.dead", error=exc
        )
    tail = b"," + header[1:].encode() + b"\n"  # dead_add puts "seq" first in the header
    entry_tail = b"|%d|0|" % int(time.time() * 1000) + TaskRecord("bench.dead", [0], {}).encode(
        backend.settings.serializer
    )
    pipe = client.pipeline(transaction=False)
    chunk = 1000  # members per ZADD/HSET: big enough to be quick, small enough to never stall Redis
    for start in range(1, n + 1, chunk):
        seqs = range(start, min(n + 1, start + chunk))
        ids = [task_id(seq).encode() for seq in seqs]
        pipe.zadd(k.dead, {b'{"seq":%d' % seq + tail + i + entry_tail: seq for seq, i in zip(seqs, ids, strict=True)})
        pipe.hset(k.dead_ids, mapping=dict(zip(ids, seqs, strict=True)))
        if len(pipe) >= 40:
            pipe.execute()
    pipe.sadd(k.dlq_index, stream)
    pipe.execute()
    if client.zcard(k.dead) != n or client.hlen(k.dead_ids) != n:
        raise RuntimeError(f"the dead-letter fill did not store {n} records")
    return task_id


class PingProbe:
    """Another client of the same Redis, in a process of its own, doing PING in a loop: its
    worst round trip during an operation is how long Redis made everyone else wait. Its own
    process, so that this one's GIL and garbage collector do not show up as Redis stalls.
    Round trips are kept in segments; ``segment()`` starts the next one."""

    def __init__(self, url: str, logdir: Path) -> None:
        argv = [sys.executable, str(SCRIPT), "--child", "probe", "--url", url]
        with open(logdir / "probe.log", "wb") as err:
            self.proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        if not read_until(self.proc.stdout, b"ready", 60):
            raise RuntimeError("the PING probe did not start")
        self.segments = 1

    def segment(self) -> int:
        """Start a new segment, once the probe has switched to it; returns its index."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        if not read_until(self.proc.stdout, b"segment", 10):
            raise RuntimeError("the PING probe stopped answering")
        self.segments += 1
        return self.segments - 1

    def finish(self) -> list[dict[str, Any]]:
        try:
            stdout, _ = self.proc.communicate(timeout=30)  # closes its stdin: it stops
            result: list[dict[str, Any]] = json.loads(stdout.decode().strip().splitlines()[-1])
        finally:
            end(self.proc, kill=True)
        if len(result) != self.segments:
            raise RuntimeError(f"the PING probe reported {len(result)} segments, not {self.segments}")
        return result


def child_probe(args: argparse.Namespace) -> None:
    gc.disable()  # a collection pause here would read as a Redis stall; it allocates little
    client = redis.Redis.from_url(args.url)
    client.ping()
    segments: list[list[float]] = [[]]
    stop = threading.Event()

    def follow_stdin() -> None:
        for _ in sys.stdin.buffer:
            segments.append([])
            print("segment", flush=True)
        stop.set()

    threading.Thread(target=follow_stdin, daemon=True).start()
    print("ready", flush=True)
    while not stop.is_set():
        t0 = perf_counter()
        client.ping()
        segments[-1].append(perf_counter() - t0)
    summary = []
    for rtts in segments:
        rtts.sort()
        summary.append(
            {
                "pings": len(rtts),
                "median_s": statistics.median(rtts) if rtts else None,
                "p99_s": percentile(rtts, 99) if rtts else None,
                "max_s": rtts[-1] if rtts else None,
            }
        )
    print(json.dumps(summary), flush=True)


def timed_by_redis(client: redis.Redis, operation: Callable[[], Any]) -> dict[str, Any]:
    """Run one operator action and read back from SLOWLOG what its calls cost Redis."""
    client.slowlog_reset()
    scripts0 = command_stats(client).get("evalsha", (0, 0))[0]
    t0 = perf_counter()
    result = operation()
    elapsed = perf_counter() - t0
    scripts = command_stats(client).get("evalsha", (0, 0))[0] - scripts0
    length = int(client.slowlog_len())
    if length >= SLOWLOG_ENTRIES:
        raise RuntimeError("SLOWLOG overflowed: the longest call may have been dropped")
    logged = [
        (e["command"].split(b" ", 1)[0].decode().lower(), int(e["duration"]))
        for e in client.slowlog_get(length)
        if e.get("client_name") == OPERATOR.encode()
    ]
    command, longest = max(logged, key=lambda c: c[1]) if logged else ("", None)
    return {
        "result": result,
        "seconds": elapsed,
        "script_calls": scripts,
        "logged_calls": len(logged),
        "redis_usec_logged": sum(u for _, u in logged),
        "longest_call_s": None if longest is None else longest / 1e6,
        "longest_command": command,
    }


def measure_requeue(server: RedisServer, n: int, count: int, ping_seconds: float, logdir: Path) -> dict[str, Any]:
    """One stream with ``n`` dead letters: what the longest single call costs Redis when an
    operator requeues one by id, requeues ``count`` of them, and reads a page in the middle."""
    server.flush()
    backend = RedisQueueBackend(server.url, Settings(prefix=new_prefix(), redis_options={"client_name": OPERATOR}))
    client = server.client()
    stream = "bench-dead"
    saved = client.config_get("slowlog-*")
    probe: PingProbe | None = None
    try:
        log(f"requeue: writing {n:,} dead letters")
        t0 = perf_counter()
        task_id = fill_dead_letters(client, backend, stream, n)
        fill_s = perf_counter() - t0
        used_memory = int(client.info("memory")["used_memory"])
        # Connect and load the script now, so that the measured calls are the operation's own.
        backend.requeue_dead_letters(stream, task_id="0" * 32)
        client.config_set("slowlog-max-len", SLOWLOG_ENTRIES)
        client.config_set("slowlog-log-slower-than", SLOWLOG_THRESHOLD_US)

        probe = PingProbe(server.url, logdir)
        idle_segment = probe.segment()
        time.sleep(ping_seconds)
        probe.segment()
        middle = n // 2
        log(f"requeue: by task id (sequence {middle:,} of {n:,})")
        by_id = timed_by_redis(client, lambda: backend.requeue_dead_letters(stream, task_id=task_id(middle)))
        log(f"requeue: count={count:,}, with a PING probe")
        busy_segment = probe.segment()
        many = timed_by_redis(client, lambda: backend.requeue_dead_letters(stream, count=count))
        probe.segment()
        offset = n // 2
        log(f"requeue: dead_letters(limit=100, offset={offset:,})")
        page = timed_by_redis(client, lambda: len(backend.dead_letters(stream, limit=100, offset=offset)))
        left = backend.queue_info(stream)
        segments = probe.finish()
    finally:
        if probe is not None:
            end(probe.proc, kill=True)
        with contextlib.suppress(redis.RedisError):
            for name in ("slowlog-log-slower-than", "slowlog-max-len"):
                client.config_set(name, str(saved[name]))
            client.slowlog_reset()
        backend.close()
        client.close()
        server.flush()
    if (by_id["result"], many["result"], page["result"]) != (1, count, 100):
        raise RuntimeError(f"requeue moved {by_id['result']} / {many['result']}, the page held {page['result']}")
    ping, busy = segments[idle_segment], segments[busy_segment]
    if not ping["pings"] or not busy["pings"]:
        raise RuntimeError("the PING probe did no round trip in a measured segment")
    out: dict[str, Any] = {
        "dead_letters": n,
        "fill_seconds": fill_s,
        "used_memory_bytes": used_memory,
        "slowlog_threshold_us": SLOWLOG_THRESHOLD_US,
        "ping": ping,
        "by_id": {**by_id, "sequence": middle},
        "count": {**many, "count": count, "probe": busy},
        "page": {**page, "limit": 100, "offset": offset},
        "left": {"dead": left["dead"], "pending": left["pending"]},
    }
    for key in ("by_id", "count", "page"):
        longest = out[key]["longest_call_s"]
        out[key]["ratio_to_median_ping"] = None if longest is None else longest / ping["median_s"]
    busy["ratio_to_median_ping"] = busy["max_s"] / ping["median_s"]
    return out


def report_requeue(report: Report, r: dict[str, Any]) -> None:
    n, ping = r["dead_letters"], r["ping"]
    report.row(
        "requeue",
        f"fill: {n:,} dead letters, pipelined ZADD/HSET",
        f"{r['fill_seconds']:.1f} s",
        f"{r['used_memory_bytes'] / 2**20:,.0f} MiB used_memory",
    )
    report.row(
        "requeue",
        f"baseline: PING round trip, median of {ping['pings']:,}",
        ms(ping["median_s"], 3),
        f"baseline; max {ms(ping['max_s'], 3)}",
    )
    for key, what in (
        ("by_id", f"requeue by task id, sequence {r['by_id']['sequence']:,}"),
        ("count", f"requeue count={r['count']['count']:,}"),
        ("page", f"dead_letters(limit=100, offset={r['page']['offset']:,})"),
    ):
        x = r[key]
        plural = "" if x["script_calls"] == 1 else "s"
        calls = f"{x['script_calls']} script call{plural}, {ms(x['seconds'])} in all"
        if x["longest_call_s"] is None:
            value, ratio = f"< {ms(r['slowlog_threshold_us'] / 1e6, 3)}", calls
        else:
            value = ms(x["longest_call_s"], 3)
            ratio = f"{x['ratio_to_median_ping']:.1f}x median PING ({x['longest_command']}); {calls}"
        report.row("requeue", f"longest call: {what}", value, ratio)
    p = r["count"]["probe"]
    report.row(
        "requeue",
        f"probe PING worst round trip during requeue count={r['count']['count']:,}",
        ms(p["max_s"], 3),
        f"{p['ratio_to_median_ping']:.1f}x median PING, {p['pings']:,} pings",
    )


# -- 10. idle beside another queue's backlog -------------------------------------------------


def fill_due_streams(backend: RedisQueueBackend, queue: str, n: int) -> None:
    """``n`` keyed streams of ``queue`` with one task each, all due now, through the enqueue
    script (pipelined: one round trip per stream would take a minute at 60,000)."""
    if n == 0:
        return
    record = TaskRecord("bench.foreign", [0], {})
    backend.enqueue(f"{queue}#0", [(new_task_id(), record)])  # layout checked, script loaded
    sha = backend.scripts.enqueue.sha
    for start in range(1, n, 1000):
        pipe = backend.client.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            call = backend.ops.enqueue(f"{queue}#{i}", backend.encode([(new_task_id(), record)]))
            pipe.evalsha(sha, len(call.keys), *call.keys, *call.args)
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception):
                raise reply


def redis_cpu_seconds(client: redis.Redis) -> float:
    cpu: dict[str, Any] = client.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def measure_idle_foreign(server: RedisServer, counts: list[int], warmup: float, window: float) -> dict[str, Any]:
    """One idle worker of queue ``b`` while queue ``a`` holds N due streams nobody consumes: the
    worker's command rate and Redis's CPU should not depend on N."""
    out: dict[str, Any] = {}
    client = server.client()
    try:
        for count in counts:
            server.flush()
            settings = Settings(prefix=new_prefix())
            producer, worker_backend = RedisQueueBackend(server.url, settings), RedisQueueBackend(server.url, settings)
            try:
                log(f"idle-foreign: {count:,} due streams of queue a")
                t0 = perf_counter()
                fill_due_streams(producer, "a", count)
                fill_s = perf_counter() - t0
                log(f"idle-foreign: one ThreadedWorker of queue b, {window:.0f} s window")
                worker = ThreadedWorker(worker_backend, queues=["b"]).start()
                try:
                    time.sleep(warmup)
                    s0, c0, t0 = command_stats(client), redis_cpu_seconds(client), perf_counter()
                    time.sleep(window)
                    s1, c1, t1 = command_stats(client), redis_cpu_seconds(client), perf_counter()
                finally:
                    worker.stop(timeout=10)
                due = sum(int(client.zcard(producer.keys.ready(s, "a"))) for s in range(producer.keys.shards))
            finally:
                producer.close()
                worker_backend.close()
            out[f"streams_{count}"] = {
                "foreign_due_streams": count,
                "still_due_after": due,
                "fill_seconds": fill_s,
                **redis_load(stats_delta(s0, s1), t1 - t0, c1 - c0),
            }
    finally:
        client.close()
        server.flush()
    base = out[f"streams_{counts[0]}"]
    for r in out.values():
        r["ratio_commands_to_first"] = r["commands_per_s"] / base["commands_per_s"]
        r["ratio_cpu_to_first"] = (
            r["redis_cpu_percent"] / base["redis_cpu_percent"] if base["redis_cpu_percent"] else None
        )
    return out


def report_idle_foreign(report: Report, counts: list[int], r: dict[str, Any]) -> None:
    for count in counts:
        x = r[f"streams_{count}"]
        ratio = "baseline" if count == counts[0] else times(x["ratio_commands_to_first"], f"N={counts[0]:,}")
        cpu = f"Redis CPU {x['redis_cpu_percent']:.2f}%"
        if count != counts[0] and x["ratio_cpu_to_first"] is not None:
            cpu += f" ({times(x['ratio_cpu_to_first'], f'N={counts[0]:,}')})"
        stale = "" if x["still_due_after"] == count else f", ONLY {x['still_due_after']:,} STILL DUE"
        report.row(
            "idle-foreign",
            f"1 idle worker of queue b, N={count:,} due streams of queue a",
            f"{x['commands_per_s']:,.1f} cmd/s",
            f"{ratio}; {x['evalsha_per_s']:.1f} EVALSHA/s, {cpu}{stale}",
        )


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=None, help="tasks per drain (default 20000, 200 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test); skips the 10000-queue idle case")
    p.add_argument("--skip-peers", action="store_true", help="do not run RQ, Dramatiq, Huey")
    p.add_argument("--only", default=None, help=f"comma-separated sections among {','.join(SECTIONS)}")
    p.add_argument("--json", default="bench-results.json", help="where to write the results (default %(default)s)")
    # Internal: this file re-runs itself as a child for the peers, the idle worker and the probe.
    p.add_argument("--child", choices=("peer", "idle", "probe"), help=argparse.SUPPRESS)
    p.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--queues", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    p.add_argument("--ceiling-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(SECTIONS)
        if unknown:
            p.error(f"unknown sections {sorted(unknown)}; choose among {','.join(SECTIONS)}")
    return args


def run(args: argparse.Namespace, report: Report, workdir: Path) -> None:
    quick = args.quick
    n = args.tasks or (200 if quick else 20000)
    selected = set(args.only.split(",")) if args.only else set(SECTIONS)
    if args.skip_peers or quick:
        selected.discard("peers")
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not installed (e.g. apt-get install redis-server)")
    quiet_logging()
    mach = machine(executable)
    report.data["machine"] = mach
    report.data["command"] = shlex.join([os.path.basename(sys.executable), *sys.argv])
    report.data["tasks"] = n
    report.data["quick"] = quick
    print(
        f"machine: {mach['cpu']}, {mach['cores']} cores ({mach['usable_cores']} usable), {mach['os']}, "
        f"{mach['python']}, redis-server {mach['redis_server']}, redis-py {mach['versions']['redis']}, "
        f"hiredis {mach['versions']['hiredis']}, pyfiq {mach['versions']['pyfiq']}",
        flush=True,
    )
    # The baseline: a median of runs at the start, and (for the ratios) one run right before and
    # one right after each throughput measurement, since the machine's speed drifts.
    ceiling_seconds, ceiling_runs, bench_requests = (0.2, 3, 2000) if quick else (1.5, 3, 50000)
    ceiling_s = 0.2 if quick else 1.0

    server = RedisServer(executable, workdir / "redis", aof=False).start()
    try:
        log(f"ceiling on redis-server :{server.port} (no persistence)")
        c = measure_ceiling(server, ceiling_seconds, ceiling_runs, bench_requests)
        report.data["ceiling"] = c
        report_ceiling(report, "ceiling", c)

        if "drain" in selected:
            c_client = c.get("redis_benchmark_evalsha_per_s")
            report.data["drain"] = run_drains(report, "drain", server, n, ceiling_s, c_client)

        if "enqueue" in selected:
            log("enqueue")
            e = measure_enqueue(server, 0.3 if quick else 2.0, ceiling_s)
            report.data["enqueue"] = e
            rp = e["rpush_pipeline_100"]["tasks_per_s"]
            for key, metric in (("single", "fn(i), one call each"), ("enqueue_many_100", "fn.enqueue_many, 100/call")):
                r = e[key]
                ratio = f"{times(r['ratio_to_ceiling'], 'ceiling')}, {times(r['ratio_to_rpush'], 'rpush')}"
                if "redis_script_usec_per_task" in r:
                    ratio += f", Redis {r['redis_script_usec_per_task']:.2f} us/task"
                report.row("enqueue", metric, per_s(r["tasks_per_s"]), ratio)
            producers = (("threads_16", "16 threads calling fn(i)"), ("asyncio_100", "100 asyncio tasks awaiting"))
            for key, metric in producers:
                r = e[key]
                ratio = times(r["ratio_to_ceiling"], "ceiling")
                if "context_switches_per_enqueue" in r:
                    ratio += f", {r['context_switches_per_enqueue']:.2f} context switches/enqueue"
                report.row("enqueue", metric, per_s(r["tasks_per_s"]), ratio)
            report.row("enqueue", "baseline: pipelined RPUSH, 100/pipeline", per_s(rp), "baseline")

        if "peers" in selected:
            peers = run_peers(report, server, n, ceiling_s, workdir)
            report.data["peers"] = peers
            done = {k: v for k, v in peers.items() if "tasks_per_s" in v}
            drains = list(report.data.get("drain", {}).values())
            if done and drains:
                fastest = max(done, key=lambda k: done[k]["tasks_per_s"])
                best = max(drains, key=lambda r: r["tasks_per_s"])
                raw = best["tasks_per_s"] / done[fastest]["tasks_per_s"]
                normalized = best["ratio_to_ceiling"] / done[fastest]["ratio_to_ceiling"]
                report.data["peers_summary"] = {
                    "fastest_peer": fastest,
                    "pyfiq_best_over_fastest": raw,
                    "pyfiq_best_over_fastest_by_ceiling_ratio": normalized,
                }
                report.row(
                    "peers",
                    f"pyfiq best drain (prefetch={best['prefetch']}) / fastest peer ({fastest})",
                    f"{raw:.2f}x",
                    f"{normalized:.2f}x comparing ceiling ratios",
                )

        if "reruns" in selected:
            log("re-runs after SIGKILL mid-drain")
            reps = 1 if quick else 7
            r = measure_reruns(server, reps, 2000 if quick else 5000, workdir)
            report.data["reruns"] = r
            for mode, label in (("group", "default (group)"), ("inline", "strict (inline, prefetch 1)")):
                report.row(
                    "reruns",
                    f"{label}: tasks run again after a SIGKILL mid-drain, median / max of {reps}",
                    f"{r[mode]['median']:g} / {r[mode]['max']}",
                    "journaled tasks, one worker",
                )

        if "takeover" in selected:
            log("take-over after SIGKILL of the holder")
            k = measure_takeover_kill(server, 1 if quick else 3, workdir)
            log("hand-off after a graceful stop")
            h = measure_handoff(server, 2 if quick else 5)
            report.data["takeover"] = {"sigkill": k, "graceful": h}
            report.row(
                "takeover",
                f"SIGKILL, lease TTL {k['lease_ttl_s']:.0f} s, poll {k['poll_interval_s']} s: median/max",
                f"{ms(k['median_s'])} / {ms(k['max_s'])}",
                f"{ms(k['after_expiry_median_s'])} after lease expiry",
            )
            report.row(
                "takeover",
                "graceful stop(): stop call to next start, median/max",
                f"{ms(h['median_s'])} / {ms(h['max_s'])}",
                ("< 100 ms target met" if h["under_100ms"] else "OVER 100 ms target")
                + ("" if h["in_order"] else ", ORDER BROKEN"),
            )

        if "lease-load" in selected:
            log("leases under a saturated CPU")
            lease = measure_lease_load(server, 2.0 if quick else 30.0)
            report.data["lease_load"] = lease
            for label, r in lease.items():
                lowest = r["lowest_lease_left_s"]
                report.row(
                    "lease-load",
                    f"{label}: {r['busy_processes']} busy processes, {r['streams']} leases, {r['seconds']:.0f} s",
                    f"{r['leases_lost']} lost",
                    f"lowest time left {lowest:.2f} s of {r['lease_ttl_s']:.0f} s" if lowest else "no steady state",
                )
            q, sat = lease["quiet"], lease["saturated"]
            report.row(
                "lease-load",
                "tasks run, saturated / quiet",
                f"{sat['tasks_run']:,} / {q['tasks_run']:,}",
                times(sat["tasks_run"] / max(q["tasks_run"], 1), "quiet"),
            )

        if "idle" in selected:
            counts = [1, 100] if quick else [1, 100, 10000]
            idle = measure_idle(server, counts, 0.5 if quick else 2.0, 1.0 if quick else 5.0, workdir)
            report.data["idle"] = idle
            for count in counts:
                r = idle[f"queues_{count}"]
                report.row(
                    "idle",
                    f"1 idle worker, {count} registered queues",
                    f"{r['commands_per_s']:,.1f} cmd/s",
                    f"{r['evalsha_per_s']:.1f} EVALSHA/s, worker CPU {r['worker_cpu_percent']:.1f}%, "
                    f"Redis scripts {r['redis_script_usec_per_s'] / 1e4:.2f}%",
                )
            # Settled: every replica has read the others' beats afresh (VIEW_REFRESH_BEATS).
            fleet_n, settle = (3, 2.0) if quick else (10, 12.0)
            fleet = measure_idle_fleet(server, fleet_n, settle, 1.0 if quick else 10.0, workdir)
            fleet["ratio_to_one"] = fleet["commands_per_s"] / idle["queues_1"]["commands_per_s"]
            idle["fleet"] = fleet
            report.row(
                "idle",
                f"{fleet_n} idle replica processes, 1 queue, together",
                f"{fleet['commands_per_s']:,.1f} cmd/s",
                f"{times(fleet['ratio_to_one'], '1 idle worker')}; {fleet['evalsha_per_s']:.1f} EVALSHA/s, "
                f"Redis CPU {fleet['redis_cpu_percent']:.2f}%",
            )

        if "memory" in selected:
            count = 1000 if quick else 10000
            log(f"memory: {count} pending tasks")
            m = measure_memory(server, count, workdir)
            report.data["memory"] = m
            r, rep = m["redis"], m["replica"]
            report.row(
                "memory",
                f"Redis bytes per pending task ({count} tasks)",
                f"{r['used_memory_bytes_per_task']:.0f} B",
                f"MEMORY USAGE {r['memory_usage_bytes_per_task']:.0f} B, entry {r['stored_entry_bytes']} B",
            )
            report.row(
                "memory",
                f"replica RSS idle / with {rep['queued_tasks']} queued",
                f"{(rep['rss_idle_kib'] or 0) / 1024:.1f} / {(rep['rss_with_queued_kib'] or 0) / 1024:.1f} MiB",
            )

        if "latency" in selected:
            count, gap = (30, 0.01) if quick else (300, 0.015)
            log(f"latency: {count} tasks, one at a time")
            lat = measure_latency(server, count, gap)
            report.data["latency"] = lat
            report.row(
                "latency",
                f"enqueue to start, idle system ({lat['tasks']} tasks): p50/p99",
                f"{ms(lat['p50_s'])} / {ms(lat['p99_s'])}",
                f"max {ms(lat['max_s'])}; enqueue call p50 {ms(lat['enqueue_call_p50_s'])}",
            )

        if "requeue" in selected:
            n_dead, count = (20_000, 2_000) if quick else (1_000_000, 10_000)
            r = measure_requeue(server, n_dead, count, 0.2 if quick else 1.0, workdir)
            report.data["requeue"] = r
            report_requeue(report, r)

        if "idle-foreign" in selected:
            foreign = [0, 2_000] if quick else [0, 10_000, 60_000]
            f = measure_idle_foreign(server, foreign, 0.3 if quick else 2.0, 1.0 if quick else 5.0)
            report.data["idle_foreign"] = f
            report_idle_foreign(report, foreign, f)

        if not quick and selected - {"ceiling"}:
            log("ceiling again (drift check)")
            c_end = measure_ceiling(server, ceiling_seconds, 1, 0)
            report.data["ceiling_end"] = c_end
            report.row("ceiling", "redis-py EVALSHA at the end (drift)", per_s(c_end["evalsha_per_s"]))
    finally:
        server.stop()

    if "drain" in selected:
        aof = RedisServer(executable, workdir / "redis-aof", aof=True).start()
        try:
            log(f"ceiling on redis-server :{aof.port} (appendonly yes, appendfsync everysec)")
            c = measure_ceiling(aof, ceiling_seconds, ceiling_runs, bench_requests)
            report.data["ceiling_aof"] = c
            report_ceiling(report, "ceiling AOF", c)
            c_client = c.get("redis_benchmark_evalsha_per_s")
            report.data["drain_aof"] = run_drains(report, "drain AOF", aof, n, ceiling_s, c_client)
        finally:
            aof.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "peer":
        child_peer(args)
        return 0
    if args.child == "idle":
        child_idle(args)
        return 0
    if args.child == "probe":
        child_probe(args)
        return 0

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    report = Report()
    started = perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="pyfiq-bench-") as tmp:
            try:
                run(args, report, Path(tmp))
            finally:
                cleanup()
    finally:
        report.data["wall_seconds"] = perf_counter() - started
        Path(args.json).write_text(json.dumps(report.data, indent=2, default=str) + "\n")
    print()
    print(report.table())
    print(f"\n{report.data['command']}: {report.data['wall_seconds']:.0f} s; JSON in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
