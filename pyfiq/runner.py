"""The fault-injection scenario runner: many replicas, proven.

One run starts a ``redis-server`` with AOF (or uses ``--redis URL``), N replica processes
(``python -m pyfiq replica``, each behind its own loopback :class:`~pyfiq.faults.FaultProxy`),
M scenario queues and P producer processes (``python -m pyfiq.runner producer``) enqueuing to
the same queues concurrently, then injects a schedule of faults, drains, and checks the
outcome from the journals:

- ``executions.jsonl``: every start/end/fail of a task (written by ``pyfiq.scenario.step`` in
  the replicas);
- ``accepted-<producer>.jsonl``: every task Redis accepted, with its place in Redis's own
  order (a counter and Redis's clock read in the same MULTI/EXEC as the enqueue, so the
  acceptance order across concurrent producers is exact, not guessed from client clocks);
- ``faults.jsonl``: every fault the runner injected, with its target and its time span;
- ``dead-letters.jsonl``: every dead letter left at the end (reason, raw bytes).

Faults: SIGKILL, SIGSTOP, a cut, blackholed, delayed or reply-delayed (``slow-reply``) link of
one replica; Redis restarted, crashed, or restarted with its wall clock shifted (``clock``,
through the ``chaos_clock.c`` LD_PRELOAD shim); malformed entries pushed into a live queue
(``vandal``); an asyncio worker stopped with a short timeout mid-task in a process that lives
on (``async-stop``); a task holding the GIL past the lease TTL (``gil``); a rolling restart.

``verify`` turns them into a :class:`Verdict`; the docker-compose ``checker`` service runs
the same function through ``python -m pyfiq.runner check``, its ``producer`` service the same
``produce`` function, and its ``app`` service the same ``python -m pyfiq replica`` command.

Everything runs on loopback, bounded in time and in count.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse

import click
import redis

from .backend import RedisQueueBackend
from .config import Settings
from .core import Ops
from .faults import FaultProxy, free_port, require_loopback
from .scenario import (
    DRILL_ENV,
    EXTRA_QUEUES_ENV,
    JOURNAL_ENV,
    QUEUES,
    STOP_DRILL_TIMEOUT,
    check,
    queue_names,
    read_journal,
)
from .task import TaskRecord, new_task_id

Event = dict[str, Any]

EXECUTIONS = "executions.jsonl"
FAULTS = "faults.jsonl"
DEAD_LETTERS = "dead-letters.jsonl"
ACCEPTED_GLOB = "accepted-*.jsonl"
#: Sequence numbers of one producer run: ``producer number * SEQ_BLOCK + n``.
SEQ_BLOCK = 10_000_000

#: Faults on one replica, chosen (mid-task if possible) by the injector.
REPLICA_FAULTS = ("kill", "stop", "cut", "blackhole", "delay", "slow-reply")
NETWORK_FAULTS = ("cut", "blackhole", "delay", "slow-reply")
#: Faults that restart Redis (``clock``: with its wall clock shifted).
REDIS_FAULTS = ("redis-restart", "redis-crash", "clock")
#: Faults that pick their own target: a queue (``vandal``) or whichever replica runs the task
#: they enqueue (``async-stop``, ``gil``).
TASK_FAULTS = ("vandal", "async-stop", "gil")
FAULT_KINDS = (*REPLICA_FAULTS, *REDIS_FAULTS, *TASK_FAULTS, "rolling-restart")
#: Faults after which another replica must take the victim's queues over (lease lapse).
TAKEOVER_FAULTS = ("kill", "stop", "cut", "blackhole")
#: Whole-process freezes (SIGSTOP; a task holding the GIL, derived from the journal): the one
#: excuse for starting a task on a lease that lapsed meanwhile, since no check made before the
#: freeze can see it coming.
PAUSE_FAULTS = ("stop", "gil-hold")
#: Faults that can explain a lost lease or acknowledgement (hence a re-execution).
EXPLAINING_FAULTS = (*REPLICA_FAULTS, *REDIS_FAULTS, "async-stop", "gil-hold")
#: How far back each ``clock`` fault sets Redis's wall clock (they alternate with a true clock).
CLOCK_LAG_MS = -3000
#: Slack on top of lease TTL + poll interval for a takeover on a busy 2-core machine.
TAKEOVER_SLACK = 2.0
#: Window of writes before a Redis crash that appendfsync=everysec may lose (Redis docs: 1 s,
#: up to 2 s when a background fsync is slow).
EVERYSEC_WINDOW = 2.0
#: Producer name of the tasks the injector enqueues for its own faults.
INJECTOR = "injector"


# -- profiles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Sizes, timings and the fault schedule of one run."""

    name: str
    replicas: int
    queues: int
    producers: int
    #: Enqueues per second of each producer (all queues together).
    rate: float
    #: Seconds each task sleeps (simulated I/O).
    hold: float
    lease_ttl: float
    poll_interval: float
    concurrency: int
    #: A fixed fault schedule, or None for random faults until ``duration`` / ``max_faults``.
    schedule: tuple[str, ...] | None
    duration: float
    max_faults: int
    #: Seconds between one fault ending and the next starting (per lane).
    gap: float
    #: Faults injected concurrently (on different replicas; Redis faults and rolling restarts
    #: always run alone).
    lanes: int = 1
    drain_timeout: float = 30.0
    max_deliveries: int = 10
    #: Replica drivers: ``threaded``, ``asyncio``, or ``mixed`` (alternating).
    driver: str = "mixed"
    shards: int = 4
    #: Every this-many-th task fails its first attempt (a retry in place).
    fail_every: int = 97
    #: Relative weights of random faults; a kind missing here is left out of the random mix
    #: unless asked for by name.
    weights: tuple[tuple[str, float], ...] = (
        ("kill", 3.0),
        ("stop", 2.0),
        ("cut", 2.0),
        ("blackhole", 2.0),
        ("delay", 1.0),
        ("slow-reply", 1.0),
        ("vandal", 0.5),
        ("async-stop", 0.3),
        ("redis-restart", 0.3),
        ("redis-crash", 0.3),
        ("clock", 0.2),
        ("rolling-restart", 0.1),
    )


PROFILES: dict[str, Profile] = {
    "short": Profile(
        name="short",
        replicas=4,
        queues=4,
        producers=3,
        rate=25.0,
        hold=0.02,
        lease_ttl=1.0,
        poll_interval=0.2,
        concurrency=2,
        schedule=(
            "kill",
            "stop",
            "cut",
            "blackhole",
            "redis-restart",
            "kill",
            "delay",
            "redis-crash",
            "stop",
            "rolling-restart",
            "redis-crash",
        ),
        duration=45.0,
        max_faults=11,
        gap=0.8,
    ),
    "soak": Profile(
        name="soak",
        replicas=6,
        queues=8,
        producers=4,
        rate=15.0,
        hold=0.02,
        lease_ttl=1.0,
        poll_interval=0.2,
        concurrency=2,
        schedule=None,
        duration=1800.0,
        max_faults=5000,
        gap=0.3,
        lanes=2,
        drain_timeout=90.0,
        # The GIL drill too: each one freezes a replica for 2.5 TTLs, so it stays rare.
        weights=(*Profile.weights, ("gil", 0.05)),
    ),
}


def _drill(kind: str, count: int, **changes: Any) -> Profile:
    """A short run of one fault kind, ``count`` times, on a small fleet (the per-fault tests)."""
    base = Profile(
        name=kind,
        replicas=3,
        queues=2,
        producers=1,
        rate=24.0,
        hold=0.02,
        lease_ttl=1.0,
        poll_interval=0.2,
        concurrency=2,
        schedule=(kind,) * count,
        duration=60.0,
        max_faults=count,
        gap=0.5,
        drain_timeout=20.0,
    )
    return replace(base, **changes)


PROFILES.update(
    {
        "vandal": _drill("vandal", 3),
        # More queues than the other replicas have slots, so the drill can keep them all busy;
        # few producer tasks, so the long task it places is what the slow replica is handed.
        "slow-reply": _drill("slow-reply", 1, queues=4, concurrency=1, rate=6.0),
        # Every replica asyncio, so the first slow task lands on one.
        "async-stop": _drill("async-stop", 1, driver="asyncio"),
        # Few deliveries: a task miscounted as a consumer death turns poison quickly.
        "gil": _drill("gil", 1, max_deliveries=4),
        "clock": _drill("clock", 3, replicas=2),
    }
)


# -- small helpers -------------------------------------------------------------------------------


def append_line(path: Path, line: dict[str, Any]) -> None:
    """Append one JSON line with one O_APPEND write: concurrent writers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[Event]:
    """A JSON-lines file, skipping a last line still being written."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.split(b"\n"):
        if raw.strip():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(raw))
    return out


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL the child if the runner dies, so no process outlives a crashed run."""
    with contextlib.suppress(Exception):
        import ctypes

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


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _max(values: Sequence[float]) -> float | None:
    return round(max(values), 3) if values else None


class JournalTail:
    """Follows the execution journal while replicas write it: open runs per process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.open: dict[tuple[int, str, int], Event] = {}
        self.ends = 0
        self.starts = 0
        #: Every line of the tasks a fault follows (``watch``), in journal order.
        self.watched: dict[str, list[Event]] = {}

    def watch(self, task_id: str) -> None:
        self.watched.setdefault(task_id, [])

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            if not raw.strip():
                continue
            e = json.loads(raw)
            if e["task_id"] in self.watched:
                self.watched[e["task_id"]].append(e)
            key = (e["pid"], e["task_id"], e["attempt"])
            if e["event"] == "start":
                self.starts += 1
                self.open[key] = e
            else:
                self.ends += e["event"] == "end"
                self.open.pop(key, None)

    def open_runs(self) -> list[Event]:
        return sorted(self.open.values(), key=lambda e: e["t"])


# -- Redis ---------------------------------------------------------------------------------------


CLOCK_SHIFT_ENV = "PYFIQ_CLOCK_SHIFT_MS"
CLOCK_SHIM_SOURCE = Path(__file__).with_name("chaos_clock.c")
_clock_shim: Path | None = None
_clock_shim_lock = threading.Lock()


def build_clock_shim() -> Path:
    """Compile ``chaos_clock.c`` (once per process, into a temporary directory) and return the
    shared library: preloaded into redis-server, it shifts Redis's wall clock by
    ``$PYFIQ_CLOCK_SHIFT_MS``. Linux with gcc only; RuntimeError says why it cannot be built."""
    global _clock_shim
    with _clock_shim_lock:
        if _clock_shim is not None and _clock_shim.exists():
            return _clock_shim
        if sys.platform != "linux":
            raise RuntimeError("the clock shim needs Linux (LD_PRELOAD of a glibc process)")
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise RuntimeError("the clock shim needs a C compiler: install gcc")
        out = Path(tempfile.mkdtemp(prefix="pyfiq-clock-")) / "libpyfiq_clock.so"
        proc = subprocess.run(
            [gcc, "-shared", "-fPIC", "-O2", "-o", str(out), str(CLOCK_SHIM_SOURCE), "-ldl"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"building the clock shim failed: {proc.stderr.strip()}")
        _clock_shim = out
        return out


class RedisProcess:
    """A redis-server the runner (and the test suite) owns: loopback, a free port, its own
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
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.clock_shift_ms = clock_shift_ms
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
            "redis-server",
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


# -- replicas ------------------------------------------------------------------------------------


def replica_argv(
    url: str,
    *,
    prefix: str,
    shards: int,
    queues: Sequence[str],
    lease_ttl: float,
    poll_interval: float,
    max_deliveries: int,
    concurrency: int,
    driver: str = "threaded",
    name: str | None = None,
    log_level: str = "warning",
) -> list[str]:
    """The replica command (the same one the compose ``app`` service runs)."""
    argv = [
        sys.executable, "-m", "pyfiq", "replica",
        "--redis", url, "--prefix", prefix, "--shards", str(shards), "--queues", ",".join(queues),
        "--lease-ttl", str(lease_ttl), "--poll-interval", str(poll_interval),
        "--max-deliveries", str(max_deliveries), "--concurrency", str(concurrency),
        "--driver", driver, "--log-level", log_level,
    ]  # fmt: skip
    if name is not None:
        argv += ["--name", name]
    return argv


class Fleet:
    """Replica processes known by name (``replica-N``); a name is re-spawned after a kill."""

    def __init__(self, argv: Callable[[str], list[str]], env: dict[str, str], logdir: Path) -> None:
        self.argv = argv
        self.env = env
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.every: list[subprocess.Popen[bytes]] = []
        self.log_of: dict[int, Path] = {}
        #: pids the runner ended on purpose (SIGKILL or SIGTERM): their exit is expected.
        self.expected_exit: set[int] = set()
        self.unexpected: list[Event] = []
        self._lock = threading.RLock()

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        with self._lock:
            log = self.logdir / f"{name}.{len(self.every)}.log"
            with open(log, "wb") as out:
                proc = popen(self.argv(name), env=self.env, stdout=out, stderr=subprocess.STDOUT)
            self.procs[name] = proc
            self.every.append(proc)
            self.log_of[proc.pid] = log
            return proc

    def log(self, pid: int) -> str:
        path = self.log_of.get(pid)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def wait_ready(self, names: Iterable[str], timeout: float = 30.0) -> None:
        pending = set(names)
        deadline = time.monotonic() + timeout
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while starting:\n{self.log(proc.pid)}")
                if " ready" in self.log(proc.pid):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"replicas not ready after {timeout}s: {sorted(pending)}")
            time.sleep(0.02)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def live_pids(self) -> dict[int, str]:
        return {p.pid: n for n, p in self.procs.items() if p.poll() is None}

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def kill(self, name: str) -> int:
        proc = self.procs[name]
        self.expected_exit.add(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return proc.pid

    def terminate(self, name: str, timeout: float) -> tuple[int | None, float]:
        """Graceful stop (SIGTERM): (exit status or None if it had to be killed, seconds)."""
        proc = self.procs[name]
        self.expected_exit.add(proc.pid)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            rc = None
        return rc, time.monotonic() - started

    def reap(self) -> list[Event]:
        """Replicas that died without the runner asking: recorded, and started again."""
        with self._lock:
            return self._reap()

    def _reap(self) -> list[Event]:
        found = []
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None and proc.pid not in self.expected_exit:
                self.expected_exit.add(proc.pid)
                event = {"replica": name, "pid": proc.pid, "rc": proc.returncode, "t": time.time()}
                event["log_tail"] = self.log(proc.pid)[-1500:]
                self.unexpected.append(event)
                found.append(event)
                self.spawn(name)
        return found

    def close(self) -> None:
        for p in self.every:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGKILL)  # also ends a SIGSTOPped process
        for p in self.every:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)

    def log_counts(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for p in self.every:
            text = self.log(p.pid)
            for marker in ("pyfiq.lease_lost", "pyfiq.result_dropped", "pyfiq.stream_failed"):
                counts[marker] += text.count(marker)
            counts["logs with a traceback"] += "Traceback" in text
        return dict(counts)


# -- producers -----------------------------------------------------------------------------------


def order_key(queue: str, keys: Any) -> str:
    """The per-queue acceptance counter, in the stream's hash tag (one slot with its keys)."""
    return f"{keys.stream(queue).pending}:accepted"


def enqueue_stamped(
    backend: RedisQueueBackend,
    queue: str,
    seq: int,
    kwargs: dict[str, Any],
    *,
    give_up_at: float,
    task_id: str | None = None,
) -> Event:
    """Enqueue ``pyfiq.scenario.step(seq, **kwargs)`` on ``queue`` and return what Redis
    accepted, with its exact place in the acceptance order.

    One MULTI/EXEC runs INCR of the queue's acceptance counter, the pyfiq enqueue script and
    TIME, so (Redis time, counter) orders acceptances exactly across producers and across
    Redis restarts. A connection error leaves the outcome unknown: the enqueue is retried
    under a dedup key, and a retry that finds the first attempt accepted (``duplicate``)
    records an acceptance whose place is unknown.
    """
    record = TaskRecord(f"pyfiq.scenario.step.{queue}", [seq], dict(kwargs))
    items = backend.encode([(task_id or new_task_id(), record)])
    call = backend.ops.enqueue(queue, items, [f"scenario-{seq}"])
    counter = order_key(queue, backend.keys)
    sent = time.time()
    attempts = 0
    while True:
        attempts += 1
        try:
            pipe = backend.client.pipeline(transaction=True)
            pipe.incr(counter)
            backend.call(call, client=pipe)
            pipe.time()
            number, reply, (sec, usec) = pipe.execute()
            break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.time() > give_up_at:
                return {"queue": queue, "seq": seq, "status": "failed", "attempts": attempts, "error": repr(exc)}
            time.sleep(min(0.02 * 2**attempts, 0.5))
    ((task_id, new),) = Ops.parse_enqueue(reply)
    return {
        "queue": queue,
        "seq": seq,
        "task_id": task_id,
        "status": "accepted" if new else "duplicate",
        "order": [int(sec) * 1_000_000 + int(usec), int(number)],
        "sent": sent,
        "t": time.time(),
        "attempts": attempts,
    }


def produce(
    url: str,
    *,
    prefix: str,
    shards: int,
    queues: Sequence[str],
    count: int,
    rate: float,
    hold: float,
    journal_dir: Path,
    max_seconds: float,
    fail_every: int = 0,
    stop: threading.Event | None = None,
) -> tuple[str, int]:
    """Enqueue up to ``count`` tasks per queue (queues interleaved, shuffled per round) at
    ``rate`` per second, journaling each acceptance; returns (producer id, accepted)."""
    backend = RedisQueueBackend(url, Settings(prefix=prefix, shards=shards))
    stop = stop or threading.Event()
    deadline = time.time() + max_seconds
    try:
        number = _retry_until(lambda: int(backend.client.incr(f"{prefix}:scenario:producers")), deadline)
        producer = f"p{number}"
        journal = journal_dir / f"accepted-{producer}.jsonl"
        rng = random.Random(number)
        interval = 1.0 / rate if rate > 0 else 0.0
        next_at = time.monotonic()
        accepted = n = 0
        for _ in range(count):
            round_ = list(queues)
            rng.shuffle(round_)
            for queue in round_:
                if stop.is_set() or time.time() > deadline:
                    return producer, accepted
                seq = number * SEQ_BLOCK + n
                n += 1
                kwargs: dict[str, Any] = {"hold": hold}
                if fail_every and n % fail_every == fail_every // 2:
                    kwargs["fail_attempts"] = 1
                line = enqueue_stamped(backend, queue, seq, kwargs, give_up_at=deadline)
                line["producer"] = producer
                append_line(journal, line)
                accepted += line["status"] != "failed"
                next_at += interval
                pause = next_at - time.monotonic()
                if pause > 0:
                    stop.wait(pause)
                else:
                    next_at = time.monotonic()
        return producer, accepted
    finally:
        backend.close()


def _retry_until(fn: Callable[[], int], deadline: float) -> int:
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def producer_argv(
    url: str,
    *,
    prefix: str,
    shards: int,
    queues: Sequence[str],
    count: int,
    rate: float,
    hold: float,
    journal_dir: Path | str,
    max_seconds: float,
    fail_every: int,
) -> list[str]:
    """The producer command (the same one the compose ``producer`` service runs)."""
    return [
        sys.executable, "-m", "pyfiq.runner", "producer",
        "--redis", url, "--prefix", prefix, "--shards", str(shards), "--queues", ",".join(queues),
        "--count", str(count), "--rate", str(rate), "--hold", str(hold), "--dir", str(journal_dir),
        "--max-seconds", str(max_seconds), "--fail-every", str(fail_every),
    ]  # fmt: skip


# -- fault injection ----------------------------------------------------------------------------


class Gate:
    """Lets replica faults run side by side on different replicas, and a Redis fault or a
    rolling restart only alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._local = 0
        self._global = False
        self.busy: set[str] = set()

    @contextlib.contextmanager
    def local(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._global)
            self._local += 1
        try:
            yield
        finally:
            with self._cond:
                self._local -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._global and self._local == 0)
            self._global = True
        try:
            yield
        finally:
            with self._cond:
                self._global = False
                self._cond.notify_all()


class Injector:
    """Injects faults and journals each one in ``faults.jsonl``."""

    def __init__(
        self,
        *,
        profile: Profile,
        fleet: Fleet,
        names: list[str],
        proxies: dict[str, FaultProxy],
        redis_proc: RedisProcess | None,
        aof_modes: list[str],
        tail: JournalTail,
        faults_path: Path,
        rng: random.Random,
        echo: Callable[[str], None],
        backend: RedisQueueBackend | None = None,
        queues: Sequence[str] = (),
        drivers: dict[str, str] | None = None,
    ) -> None:
        self.p = profile
        self.fleet = fleet
        self.names = names
        self.proxies = proxies
        self.redis = redis_proc
        #: For the faults that write to Redis themselves (vandal entries, the tasks they follow).
        self.backend = backend
        self.queues = list(queues)
        self.drivers = drivers or {}
        self._seq = itertools.count()
        self.aof_modes = aof_modes
        self._aof_index = 0
        self.tail = tail
        self.path = faults_path
        self.rng = rng
        self.echo = echo
        self.gate = Gate()
        self._lock = threading.Lock()
        self._tail_lock = threading.Lock()
        self.done: Counter[str] = Counter()
        self.errors: list[str] = []

    def available(self, kinds: Iterable[str]) -> list[str]:
        out = []
        for kind in kinds:
            if kind in NETWORK_FAULTS and not self.proxies:
                continue
            if kind in REDIS_FAULTS and self.redis is None:
                continue
            if kind in TASK_FAULTS and (self.backend is None or not self.queues):
                continue
            if kind == "async-stop" and "asyncio" not in self.drivers.values():
                continue
            if kind == "clock":
                try:
                    build_clock_shim()
                except RuntimeError as exc:
                    self.echo(f"  (no clock faults: {exc})")
                    continue
            out.append(kind)
        return out

    def record(self, event: Event) -> None:
        with self._lock:
            append_line(self.path, event)
            self.done[event["kind"]] += 1

    # -- choosing a victim --

    def _victim(self, wait: float = 2.0) -> tuple[str, bool]:
        """A replica in the middle of a task if one is found within ``wait`` seconds (and not
        in another fault), else any free replica; marks it busy. Returns (name, mid-task)."""
        deadline = time.monotonic() + wait
        while True:
            with self._tail_lock:
                self.tail.poll()
                runs = self.tail.open_runs()
            with self._lock:
                live = {pid: n for pid, n in self.fleet.live_pids().items() if n not in self.gate.busy}
                fresh = [r for r in runs if r["pid"] in live and time.time() - r["t"] < max(0.01, self.p.hold * 0.6)]
                if fresh:
                    name = live[fresh[-1]["pid"]]
                    self.gate.busy.add(name)
                    return name, True
                if time.monotonic() > deadline and live:
                    name = self.rng.choice(sorted(live.values()))
                    self.gate.busy.add(name)
                    return name, False
            time.sleep(0.002)

    def _mid_task(self, name: str, wait: float = 2.0) -> bool:
        """Wait (up to ``wait`` seconds) until replica ``name`` has just started a task."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._tail_lock:
                self.tail.poll()
                runs = self.tail.open_runs()
            pid = self.fleet.procs[name].pid
            if any(r["pid"] == pid and time.time() - r["t"] < max(0.01, self.p.hold * 0.6) for r in runs):
                return True
            time.sleep(0.002)
        return False

    def _release(self, name: str) -> None:
        with self._lock:
            self.gate.busy.discard(name)

    # -- the faults --

    def inject(self, kind: str) -> None:
        try:
            if kind in REPLICA_FAULTS:
                with self.gate.local():
                    name, mid = self._victim()
                    try:
                        getattr(self, "_" + kind.replace("-", "_"))(name, mid)
                    finally:
                        self._release(name)
            elif kind in TASK_FAULTS:
                with self.gate.local():
                    getattr(self, "_" + kind.replace("-", "_"))()
            else:
                with self.gate.exclusive():
                    getattr(self, "_" + kind.replace("-", "_"))()
        except Exception as exc:  # a fault that could not be injected is reported, not hidden
            self.errors.append(f"{kind}: {exc!r}")
            self.echo(f"  ! {kind} failed: {exc!r}")

    def _base(self, kind: str, name: str, mid: bool) -> Event:
        return {"kind": kind, "target": name, "pid": self.fleet.procs[name].pid, "mid_task": mid, "t": time.time()}

    def _kill(self, name: str, mid: bool) -> None:
        event = self._base("kill", name, mid)
        self.fleet.kill(name)
        event["t"] = time.time()  # the moment it was certainly dead
        self.fleet.spawn(name)
        # Ready before another fault may pick it: a replica that starts while its link is cut
        # exits at once (see the report of the first soak run), which is a finding of its own,
        # not something every kill should stumble into.
        self.fleet.wait_ready([name])
        event["t_end"] = time.time()
        self.record(event)

    def _stop(self, name: str, mid: bool) -> None:
        event = self._base("stop", name, mid)
        self.fleet.signal(name, signal.SIGSTOP)
        time.sleep(self.p.lease_ttl * 1.5 + self.p.poll_interval)
        self.fleet.signal(name, signal.SIGCONT)
        event["t_end"] = time.time()
        self.record(event)

    def _cut(self, name: str, mid: bool) -> None:
        self._partition("cut", name, mid)

    def _blackhole(self, name: str, mid: bool) -> None:
        self._partition("blackhole", name, mid)

    def _partition(self, kind: str, name: str, mid: bool) -> None:
        """Cut or blackhole one replica's Redis connection past its lease TTL, then heal it."""
        event = self._base(kind, name, mid)
        getattr(self.proxies[name], kind)()
        time.sleep(self.p.lease_ttl * 1.3)
        self.proxies[name].heal()
        event["t_end"] = time.time()
        self.record(event)

    def _delay(self, name: str, mid: bool) -> None:
        seconds = round(self.p.lease_ttl / 10, 3)
        event = self._base("delay", name, mid)
        event["seconds"] = seconds
        self.proxies[name].delay(seconds)
        time.sleep(self.p.lease_ttl * 1.5)
        self.proxies[name].heal()
        event["t_end"] = time.time()
        self.record(event)

    def _slow_reply(self, name: str, mid: bool) -> None:
        """Delay what Redis sends one replica (not what it sends Redis) past the lease TTL: its
        renewals still land, too far apart to keep its leases, and a lease it is granted
        reaches it after the lease may have lapsed. A holder that counts its lease from when
        it sent the request starts nothing on it; one that counts from the reply does, while
        another replica may already run the same queue."""
        seconds = round(self.p.lease_ttl * 2, 3)
        event = self._base("slow-reply", name, mid)
        event["seconds"] = seconds
        self.proxies[name].delay(seconds, direction="replies")
        try:
            time.sleep(self.p.lease_ttl + self.p.poll_interval)  # its leases lapse or move on
            event |= self._outrun(name, seconds)
        finally:
            self.proxies[name].heal()
        time.sleep(seconds)  # replies already held back still arrive late
        event["t_end"] = time.time()
        self.record(event)

    def _outrun(self, name: str, seconds: float) -> Event:
        """Make the slow replica win a claim, and another take the queue over while the slow
        one's reply is still on the way.

        A replica whose replies come late loses every race for a claim, so the others are kept
        busy first: a task on each of their slots that holds until a release file appears.
        Then a long task goes on every other queue; once the slow replica's claim shows up in
        Redis, its lease is left to lapse and the others are released, so one of them takes
        that queue over and runs the task the slow replica is about to start. Only possible
        when the others have fewer slots than there are queues (the slow-reply profile);
        otherwise the delay alone is the fault."""
        slots = sum(1 for n in self.fleet.live_pids().values() if n != name) * self.p.concurrency
        if self.backend is None or not 0 < slots < len(self.queues):
            time.sleep(2 * seconds + self.p.lease_ttl)
            return {"outrun": "not attempted"}
        release = self.path.parent / f"release-{uuid.uuid4().hex[:8]}"
        try:
            gated = [
                self._enqueue_task(q, {"hold": 30.0, "until": str(release)})
                for q in self.rng.sample(self.queues, slots)
            ]
            deadline = time.monotonic() + 5 * self.p.lease_ttl
            for line in gated:
                if self._wait_line(line["task_id"], "start", max(0.0, deadline - time.monotonic())) is None:
                    return {"outrun": "the other replicas did not all get busy"}
            rest = sorted(set(self.queues) - {line["queue"] for line in gated})
            for q in rest:
                self._enqueue_task(q, {"hold": seconds + self.p.lease_ttl})
            assert self.backend is not None
            deadline = time.monotonic() + 4 * seconds + self.p.lease_ttl
            claimed = None
            while claimed is None and time.monotonic() < deadline:
                held = [q for q in rest if self.backend.client.exists(self.backend.keys.stream(q).lease)]
                claimed = held[0] if held else None
                time.sleep(0.005)
            if claimed is None:
                return {"outrun": "the slow replica claimed nothing"}
            claimed_at = time.time()
            time.sleep(self.p.lease_ttl + 0.05)  # its lease lapses
            release.touch()
            time.sleep(seconds)  # its late reply arrives meanwhile
            return {"outrun": "claimed", "claimed": claimed, "claimed_at": claimed_at}
        finally:
            release.touch()

    # -- faults that bring their own task or target a queue --

    def _enqueue_task(self, queue: str, kwargs: dict[str, Any]) -> Event:
        """Enqueue one scenario task for a fault, journaled like any producer's acceptance (the
        checker holds it to the same order and no-loss rules)."""
        assert self.backend is not None
        seq = next(self._seq)
        task_id = new_task_id()
        with self._tail_lock:  # watched before it can start, so no line of it is missed
            self.tail.watch(task_id)
        line = enqueue_stamped(self.backend, queue, seq, kwargs, give_up_at=time.time() + 30, task_id=task_id)
        line["producer"] = INJECTOR
        append_line(self.path.parent / f"accepted-{INJECTOR}.jsonl", line)
        if line["status"] == "failed":
            raise RuntimeError(f"could not enqueue the fault's task on {queue}: {line.get('error')}")
        return line

    def _wait_line(self, task_id: str, event: str, timeout: float, after: int = 0) -> Event | None:
        """The first ``event`` line (start, end, fail) of a watched task past its ``after``-th
        line, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._tail_lock:
                self.tail.watch(task_id)
                self.tail.poll()
                lines = list(self.tail.watched[task_id][after:])
            found = next((e for e in lines if e["event"] == event), None)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(0.005)

    def _vandal(self) -> None:
        """RPUSH malformed entries straight into a live queue's pending list, as a buggy or
        hostile writer would: pyfiq must dead-letter each one (``undecodable``, raw bytes kept)
        and carry on with the tasks behind them."""
        assert self.backend is not None
        queue = self.rng.choice(self.queues)
        record = TaskRecord(f"pyfiq.scenario.step.{queue}", [-1], {"hold": self.p.hold})
        payload = record.encode(self.backend.settings.serializer)
        tag = uuid.uuid4().hex
        entries = [
            f"vandal-{tag}".encode(),  # not an entry at all
            b"\xff\xfe\x00vandal|" + tag.encode() + b"\x80",  # not even text
            f"{uuid.uuid4().hex}|zz|0|".encode() + payload,  # an entry but for its enqueue time
        ]
        event: Event = {"kind": "vandal", "target": queue, "t": time.time(), "entries": [e.hex() for e in entries]}
        self.backend.client.rpush(self.backend.keys.stream(queue).pending, *entries)
        event["t_end"] = time.time()
        self.record(event)

    def _async_stop(self) -> None:
        """Stop an asyncio replica's worker with ``stop(timeout=0.3)`` while a plain (sync) task
        runs in one of its threads, and keep the process alive well past the task and a lease
        TTL, as an application that stops consuming but keeps serving does. The lease must not
        be handed over while that thread still runs the task."""
        hold = round(self.p.lease_ttl * 2 + 0.5, 3)
        asyncio_replicas = {n for n in self.names if self.drivers.get(n) == "asyncio"}
        for _ in range(6):  # until an asyncio replica is the one that runs it
            queue = self.rng.choice(self.queues)
            line = self._enqueue_task(queue, {"hold": hold})
            start = self._wait_line(line["task_id"], "start", timeout=15)
            if start is None:
                continue
            with self._lock:
                name = self.fleet.live_pids().get(start["pid"])
                if name in asyncio_replicas and name not in self.gate.busy:
                    self.gate.busy.add(name)
                    break
            self._wait_line(line["task_id"], "end", timeout=hold + 5 * self.p.lease_ttl)
        else:
            self.echo("  ! async-stop: no asyncio replica picked up the slow task; skipped")
            return
        assert name is not None
        try:
            event = self._base("async-stop", name, True)
            event |= {"queue": queue, "seq": line["seq"], "task_id": line["task_id"], "hold": hold}
            self.fleet.signal(name, signal.SIGUSR1)
            time.sleep(hold + self.p.lease_ttl)
            event["t_exit"] = time.time()
            rc, _ = self.fleet.terminate(name, timeout=max(15.0, hold * 2))
            event["rc"] = rc
            self.fleet.spawn(name)
            self.fleet.wait_ready([name])
            event["t_end"] = time.time()
            self.record(event)
        finally:
            self._release(name)

    def _gil(self) -> None:
        """Enqueue a task that holds the GIL for 2.5 lease TTLs: its replica's heartbeat cannot
        run, the lease lapses under it, and the task must end dead-lettered for outliving its
        lease, not re-run on every take-over until it counts as poison."""
        seconds = round(self.p.lease_ttl * 2.5, 3)
        queue = self.rng.choice(self.queues)
        line = self._enqueue_task(queue, {"gil": seconds})
        event: Event = {"kind": "gil", "target": queue, "t": time.time(), "seconds": seconds}
        event |= {"seq": line["seq"], "task_id": line["task_id"]}
        if self._wait_line(line["task_id"], "start", timeout=15) is None:
            self.echo(f"  ! gil: the task on {queue} did not start within 15 s")
        # Let the take-overs it causes play out before the next fault.
        time.sleep(seconds + self.p.lease_ttl + self.p.poll_interval)
        event["t_end"] = time.time()
        self.record(event)

    def _redis(self, kind: str, crash: bool, clock_shift_ms: int | None = None) -> None:
        assert self.redis is not None
        mode = self.redis.appendfsync
        event: Event = {"kind": kind, "target": "redis", "appendfsync": mode, "t": time.time()}
        event["shift_ms"] = self.redis.clock_shift_ms if clock_shift_ms is None else clock_shift_ms
        event["previous_shift_ms"] = self.redis.clock_shift_ms
        self.redis.stop(kill=crash)
        event["t_down"] = time.time()
        time.sleep(0.3)
        if crash:  # the next crash runs under the next fsync policy
            self._aof_index = (self._aof_index + 1) % len(self.aof_modes)
        self.redis.start(self.aof_modes[self._aof_index], clock_shift_ms=clock_shift_ms)
        event["t_end"] = time.time()
        event["next_appendfsync"] = self.redis.appendfsync
        self.record(event)

    def _clock(self) -> None:
        """A graceful Redis restart (the shard counters survive in the AOF) with Redis's wall
        clock set back, or, the next time, true again: fencing tokens must keep rising."""
        assert self.redis is not None
        self._redis("clock", crash=False, clock_shift_ms=CLOCK_LAG_MS if self.redis.clock_shift_ms == 0 else 0)
        # Leases taken, renewed and released on the new clock before anything else happens.
        time.sleep(2 * self.p.lease_ttl)

    def _redis_restart(self) -> None:
        self._redis("redis-restart", crash=False)

    def _redis_crash(self) -> None:
        self._redis("redis-crash", crash=True)

    def _rolling_restart(self) -> None:
        event: Event = {"kind": "rolling-restart", "target": "all", "t": time.time(), "stops": []}
        for name in self.names:
            self._mid_task(name)  # so the stop has a running task to finish and a queue to hand over
            pid = self.fleet.procs[name].pid
            t = time.time()
            rc, took = self.fleet.terminate(name, timeout=max(15.0, self.p.lease_ttl * 5))
            event["stops"].append({"replica": name, "pid": pid, "t": t, "t_exit": t + took, "rc": rc})
            self.fleet.spawn(name)
            self.fleet.wait_ready([name])
        event["t_end"] = time.time()
        self.record(event)

    # -- the schedule --

    def run(self, kinds: Sequence[str], deadline: float) -> None:
        """Inject the fixed schedule (one lane), or random faults of ``kinds`` on
        ``profile.lanes`` lanes until ``deadline`` or ``max_faults``."""
        started = [0]
        lock = threading.Lock()
        fixed = [k for k in (self.p.schedule or ()) if k in kinds]
        weights = dict(self.p.weights)

        def next_kind() -> str | None:
            with lock:
                if started[0] >= self.p.max_faults or time.time() > deadline:
                    return None
                if self.p.schedule is not None:
                    if started[0] >= len(fixed):
                        return None
                    kind = fixed[started[0]]
                else:  # a kind asked for by name but not weighed by the profile: weight 1
                    kind = self.rng.choices(list(kinds), [weights.get(k) or 1.0 for k in kinds])[0]
                started[0] += 1
                return kind

        def lane() -> None:
            while (kind := next_kind()) is not None:
                self.inject(kind)
                for dead in self.fleet.reap():
                    self.echo(f"  ! {dead['replica']} (pid {dead['pid']}) exited unexpectedly: rc={dead['rc']}")
                time.sleep(self.p.gap)

        count = self.p.lanes if self.p.schedule is None else 1
        lanes = [threading.Thread(target=lane, daemon=True) for _ in range(count)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()


# -- the verdict ---------------------------------------------------------------------------------


@dataclass
class Verdict:
    ok: bool
    breaches: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        head = "verdict: PASS" if self.ok else "verdict: FAIL"
        return "\n".join([*self.lines, *(f"BREACH: {b}" for b in self.breaches), head])


def read_accepted(run_dir: Path) -> list[Event]:
    lines: list[Event] = []
    for path in sorted(run_dir.glob(ACCEPTED_GLOB)):
        lines += read_lines(path)
    return lines


def _fault_window(f: Event, ttl: float, poll: float) -> tuple[float, float]:
    """When a fault could have made a replica lose a lease or an acknowledgement."""
    start = float(f["t"])
    end = float(f["t_end"]) if "t_end" in f else start
    return start, end + ttl + poll + TAKEOVER_SLACK


def verify(
    run_dir: Path,
    *,
    lease_ttl: float,
    poll_interval: float,
    dead: dict[str, list[int]] | None = None,
    remaining: dict[str, int] | None = None,
    unexpected_exits: Sequence[Event] = (),
    log_counts: dict[str, int] | None = None,
    dead_letters: Sequence[Event] | None = None,
) -> Verdict:
    """Check one run's journals. ``dead``: sequence numbers found dead-lettered per queue;
    ``remaining``: tasks still pending or in flight per queue when the run ended;
    ``dead_letters``: every dead-letter record of the run's queues (``queue``, ``reason``,
    ``seq`` or None, ``raw`` in hex), which the vandal and GIL checks need."""
    accepted_lines = read_accepted(run_dir)
    journal = read_journal(run_dir / EXECUTIONS)
    faults = read_lines(run_dir / FAULTS)
    if dead is None and dead_letters is not None:
        dead = defaultdict(list)
        for d in dead_letters:
            if d.get("seq") is not None:
                dead[d["queue"]].append(int(d["seq"]))
    dead = dead or {}
    breaches: list[str] = []
    stats: dict[str, Any] = {}
    _unshift_redis_clock(accepted_lines, faults)
    # What can explain a lost lease: the injected faults, and each run of a GIL-holding task
    # (its whole process froze meanwhile).
    causes = faults + _gil_holds(journal, faults)

    # What Redis accepted, in Redis's order.
    exact: dict[str, list[Event]] = defaultdict(list)
    unsure: list[Event] = []
    failed_enqueues = 0
    for line in accepted_lines:
        if line["status"] == "accepted":
            exact[line["queue"]].append(line)
        elif line["status"] == "duplicate":
            unsure.append(line)
        else:
            failed_enqueues += 1
    accepted: dict[str, list[int]] = {}
    interleavings = 0
    for q, q_lines in exact.items():
        q_lines.sort(key=lambda e: (e["order"][0], e["order"][1]))
        accepted[q] = [e["seq"] for e in q_lines]
        interleavings += sum(1 for a, b in itertools.pairwise(q_lines) if a["producer"] != b["producer"])
    accepted_at = {(e["queue"], e["seq"]): e["t"] for e in accepted_lines if "t" in e}
    exact_keys = {(q, s) for q, seqs in accepted.items() for s in seqs}
    producers = {e["producer"] for e in accepted_lines if e.get("producer") not in (None, INJECTOR)}

    # Loss and order (pyfiq.scenario.check) over the tasks whose place is known; overlaps
    # over every execution.
    report = check([e for e in journal if (e["queue"], e["seq"]) in exact_keys], accepted, dead)
    overlaps = check(journal, {})
    ended = {(e["queue"], e["seq"]) for e in journal if e["event"] == "end"}
    dead_keys = {(q, s) for q, seqs in dead.items() for s in seqs}
    lost = [(q, s) for q, seqs in report.lost.items() for s in seqs]
    lost += [(e["queue"], e["seq"]) for e in unsure if (e["queue"], e["seq"]) not in ended | dead_keys]

    # A task lost in a Redis crash under appendfsync=everysec, accepted within the window
    # before the crash, is Redis's documented durability limit, not pyfiq's.
    crashes = [f for f in faults if f["kind"] == "redis-crash"]
    durability_lost: list[tuple[str, int]] = []
    pyfiq_lost: list[tuple[str, int]] = []
    for key in lost:
        t = accepted_at.get(key)
        if t is not None and any(
            c["appendfsync"] == "everysec" and c["t"] - EVERYSEC_WINDOW <= t <= c["t"] for c in crashes
        ):
            durability_lost.append(key)
        else:
            pyfiq_lost.append(key)
    if pyfiq_lost:
        breaches.append(f"{len(pyfiq_lost)} accepted tasks lost, e.g. {pyfiq_lost[:5]}")
    for q, firsts in report.order_violations.items():
        expected = [s for s in accepted[q] if s in set(firsts)]
        at = next((i for i, (a, b) in enumerate(zip(firsts, expected, strict=False)) if a != b), None)
        breaches.append(f"{q}: first executions broke acceptance order at position {at}")

    # Re-executions: each must follow a fault on the replica that ran the task before (or on
    # Redis), or a graceful stop during the task's retry back-off.
    by_task: dict[str, list[Event]] = defaultdict(list)
    first_seen: dict[int, float] = {}
    for e in journal:
        by_task[e["task_id"]].append(e)
        first_seen[e["pid"]] = min(first_seen.get(e["pid"], e["t"]), e["t"])

    def explains(f: Event, culprit: Event, since: float, until: float) -> bool | None:
        """Whether fault ``f`` can explain a lease or acknowledgement lost by ``culprit``'s
        process between ``since`` and ``until``: None if not, True if only as a connection the
        fault reset and the process found dead on its next use, which can be much later (a
        pooled connection, with no retry on connection errors)."""
        if f["kind"] not in EXPLAINING_FAULTS or f["t"] > until:
            return None
        if f["target"] not in (culprit["replica"], "redis"):
            return None
        if _fault_window(f, lease_ttl, poll_interval)[1] >= since:
            return False
        same_process = f.get("pid") == culprit["pid"] if f["target"] != "redis" else None
        if f["kind"] in ("cut", "blackhole") and same_process:
            return True
        if f["kind"] in REDIS_FAULTS and first_seen.get(culprit["pid"], float("inf")) < f["t"]:
            return True
        return None

    stops = [dict(s, kind="graceful-stop") for f in faults if f["kind"] == "rolling-restart" for s in f["stops"]]
    reexec_by_kind: Counter[str] = Counter()
    unexplained_reexec: list[Event] = []
    reexecutions = 0
    for events in by_task.values():
        events.sort(key=lambda e: e["t"])
        starts_ = [e for e in events if e["event"] == "start"]
        for i, rerun in enumerate(starts_):
            if i == 0 or rerun["attempt"] != 1:
                continue
            reexecutions += 1
            prev = starts_[i - 1]
            prev_last = [e for e in events if e["pid"] == prev["pid"] and e["t"] < rerun["t"]][-1]
            cause = None
            # Usually the earlier run was interrupted (a fault on its replica, or on Redis). A
            # re-run under an *older* fence is the other way round: a holder paused or cut off
            # after it was handed the task wakes up and runs it although the new holder already
            # has; fencing keeps it from acknowledging, not from running (README: "Fencing
            # protects the queue, not your side effects").
            stale = rerun["fence"] < prev["fence"]
            culprit = rerun if stale else prev
            candidates = [
                (f, late)
                for f in causes
                if (late := explains(f, culprit, min(prev["t"], rerun["t"]), rerun["t"])) is not None
            ]
            if candidates:
                # The first fault after the interrupted run began, else one already under way.
                later = [c for c in candidates if c[0]["t"] >= prev["t"]]
                f, late = min(later, key=lambda c: c[0]["t"]) if later else max(candidates, key=lambda c: c[0]["t"])
                cause = (
                    f["kind"]
                    + (" (stale holder)" if stale else "")
                    + (" (connection found dead later)" if late else "")
                )
            if cause is None:
                for s in stops:
                    if s["pid"] == prev["pid"] and prev_last["event"] == "fail" and s["t"] <= rerun["t"]:
                        cause = "graceful-stop-during-retry"
                        break
            if cause is None:
                unexplained_reexec.append(rerun)
            else:
                reexec_by_kind[cause] += 1
    if unexplained_reexec:
        breaches.append(
            f"{len(unexplained_reexec)} re-executions with no crash or lease loss to explain them, e.g. "
            + "; ".join(f"{e['queue']} #{e['seq']} on {e['replica']} at {e['t']:.3f}" for e in unexplained_reexec[:3])
        )

    # Overlaps: none unexplained; the fence-explained ones only around a fault. check() takes
    # the earlier-started run as the one whose lease lapsed; a stale holder can also *start*
    # late: the later-started run then has the lower fence. A holder checks its lease right
    # before it starts a task, counting from when it sent the request that granted or renewed
    # it, so only a freeze of the whole process after that check (SIGSTOP, a task holding the
    # GIL) explains it; a slow network does not.
    pause_slack = lease_ttl + poll_interval + TAKEOVER_SLACK

    def paused(pid: int, t: float) -> bool:
        return any(
            f["kind"] in PAUSE_FAULTS
            and f.get("pid") == pid
            and f["t"] <= t <= float(f["t_end"] if "t_end" in f else f["t"]) + pause_slack
            for f in causes
        )

    unexplained_overlaps = []
    stale_overlaps = 0
    for a, b in overlaps.overlaps_unexplained:
        if b["fence"] < a["fence"] and paused(b["pid"], b["t"]):
            stale_overlaps += 1
        else:
            unexplained_overlaps.append((a, b))
    if unexplained_overlaps:
        a, b = unexplained_overlaps[0]
        breaches.append(
            f"{len(unexplained_overlaps)} overlapping executions of one queue not explained by a lapsed "
            f"lease, e.g. {a['queue']} #{a['seq']} on {a['replica']} (fence {a['fence']}) and #{b['seq']} on "
            f"{b['replica']} (fence {b['fence']})"
        )
    lapsed_without_fault = _lapses_without_fault(journal, causes, lease_ttl, poll_interval)
    if lapsed_without_fault:
        breaches.append(f"{lapsed_without_fault} overlaps (lapsed leases) with no fault on that replica")

    # Takeover after each fault that made a replica drop its queues; hand-off after each
    # graceful stop; resumption after each Redis restart.
    starts_by_queue: dict[str, list[Event]] = defaultdict(list)
    ends_by_pid_queue: dict[tuple[int, str], list[float]] = defaultdict(list)
    for e in sorted(journal, key=lambda e: e["t"]):
        if e["event"] == "start":
            starts_by_queue[e["queue"]].append(e)
        elif e["event"] == "end":
            ends_by_pid_queue[(e["pid"], e["queue"])].append(e["t"])
    open_at = _open_runs_at(journal)
    takeovers: dict[str, list[float]] = defaultdict(list)
    mid_task_faults = rerun_first = interrupted = raised = 0
    bound = lease_ttl + poll_interval + TAKEOVER_SLACK
    for f in faults:
        if f["kind"] not in TAKEOVER_FAULTS:
            continue
        held = open_at(f["pid"], f["t"])
        mid_task_faults += bool(held)
        for run in held:
            q = run["queue"]
            reruns = [e for e in by_task[run["task_id"]] if e["event"] == "start" and e["fence"] > run["fence"]]
            if not [e for e in reruns if e["t"] > f["t"]]:
                continue  # it finished and was acknowledged before the fault took hold
            interrupted += 1
            # The next start on the queue under a newer lease (a stale holder's late start is
            # not a takeover).
            nxt = next((e for e in starts_by_queue[q] if e["t"] > f["t"] and e["fence"] > run["fence"]), None)
            if nxt is None:
                breaches.append(f"{q}: nothing ran after the {f['kind']} of {f['target']} at {f['t']:.3f}")
                continue
            # G3: the interrupted task (or the one whose acknowledgement could not reach Redis)
            # runs again first, before anything behind it.
            if nxt["task_id"] == run["task_id"]:
                rerun_first += 1
                raised += nxt["deliveries"] > run["deliveries"]
            else:
                breaches.append(
                    f"{q}: after the {f['kind']} of {f['target']}, #{nxt['seq']} ran before the "
                    f"interrupted #{run['seq']}"
                )
            took = nxt["t"] - f["t"]
            takeovers[f["kind"]].append(took)
            if took > bound:
                breaches.append(f"{q}: takeover after {f['kind']} of {f['target']} took {took:.2f}s > {bound:.2f}s")
    handoffs: list[float] = []
    for s in stops:
        if s["rc"] != 0:
            breaches.append(f"graceful stop of {s['replica']} (pid {s['pid']}) ended with {s['rc']}")
        for q in {e["queue"] for e in open_at(s["pid"], s["t"])}:
            finish = [t for t in ends_by_pid_queue[(s["pid"], q)] if t >= s["t"]]
            if not finish:
                continue
            nxt = next((e for e in starts_by_queue[q] if e["t"] > finish[0] and e["pid"] != s["pid"]), None)
            if nxt is None or accepted_at.get((q, nxt["seq"]), float("inf")) > finish[0]:
                continue  # the queue had nothing more to hand over
            handoffs.append(nxt["t"] - finish[0])
    if handoffs and max(handoffs) >= lease_ttl:
        breaches.append(f"a graceful hand-off took {max(handoffs):.2f}s, as long as a lease TTL: no hand-off")
    resumes: list[float] = []
    redis_loss: list[Event] = []
    for f in faults:
        if f["kind"] not in REDIS_FAULTS:
            continue
        nxt = min((e["t"] for es in starts_by_queue.values() for e in es if e["t"] > f["t_end"]), default=None)
        if nxt is not None:
            resumes.append(nxt - f["t_end"])
        before = {k for k in lost if f["t"] - EVERYSEC_WINDOW <= accepted_at.get(k, 0) <= f["t"]}
        redis_loss.append(
            {
                "kind": f["kind"],
                "appendfsync": f["appendfsync"],
                "lost_tasks": len(before),
                "acknowledged_writes_lost": _counter_rollback(exact, f),
            }
        )
    for r in redis_loss:
        if r["appendfsync"] == "always" and (r["lost_tasks"] or r["acknowledged_writes_lost"]):
            breaches.append(f"Redis {r['kind']} with appendfsync=always lost {r}")
        if r["kind"] in ("redis-restart", "clock") and (r["lost_tasks"] or r["acknowledged_writes_lost"]):
            breaches.append(f"a graceful Redis restart lost {r}")

    # Fencing tokens in start order, per queue: a start under a lower token than one already
    # started means work began on a lapsed lease (a reply that came too late, a stop that let
    # the lease go) or the token went backwards (a Redis clock set back). Only a process freeze
    # excuses it, and only a Redis restart that lost writes (the counter with them) resets the
    # comparison: then only Redis's clock keeps the token rising, which is the documented limit.
    counter_losses = [
        f["t_down"]
        for f, r in zip((f for f in faults if f["kind"] in REDIS_FAULTS), redis_loss, strict=True)
        if r["lost_tasks"] or r["acknowledged_writes_lost"]
    ]
    stale_starts: list[tuple[Event, Event]] = []
    paused_stale_starts = 0
    for q_starts in starts_by_queue.values():
        top: Event | None = None
        for e in q_starts:
            if top is not None and any(top["t"] < t <= e["t"] for t in counter_losses):
                top = None
            if top is None or e["fence"] >= top["fence"]:
                top = e
            elif paused(e["pid"], e["t"]):
                paused_stale_starts += 1
            else:
                stale_starts.append((top, e))
    if stale_starts:
        top, e = stale_starts[0]
        breaches.append(
            f"{len(stale_starts)} task starts under a fencing token lower than one already started on their "
            f"queue (a task started on a lapsed lease, or the token went backwards), e.g. {e['queue']} #{e['seq']} "
            f"on {e['replica']} at {e['t']:.3f} (fence {e['fence']}) after #{top['seq']} on {top['replica']} "
            f"at {top['t']:.3f} (fence {top['fence']})"
        )

    # A graceful stop that timed out in a live process: no other replica may start on the
    # queue while the task it left running in a thread still runs.
    run_ends = {(e["pid"], e["task_id"], e["attempt"]): e["t"] for e in journal if e["event"] != "start"}
    stop_drills = [f for f in faults if f["kind"] == "async-stop"]
    for f in stop_drills:
        for a in open_at(f["pid"], f["t"]):
            until = min(run_ends.get((a["pid"], a["task_id"], a["attempt"]), f["t_exit"]), f["t_exit"])
            b = next((e for e in starts_by_queue[a["queue"]] if f["t"] < e["t"] < until and e["pid"] != a["pid"]), {})
            if b:
                breaches.append(
                    f"{a['queue']}: #{b['seq']} started on {b['replica']} (fence {b['fence']}) {until - b['t']:.2f}s "
                    f"before #{a['seq']} ended on {f['target']}, whose asyncio worker was stopped with a "
                    f"{STOP_DRILL_TIMEOUT}s timeout while that task ran in a thread of the live process "
                    f"(fence {a['fence']}): the lease was given up under a running task"
                )

    # Vandal entries: each dead-lettered as undecodable with its raw bytes, and the queue went
    # on past it (the first task accepted behind it started within the takeover bound).
    vandals = [f for f in faults if f["kind"] == "vandal"]
    vandal_missing: list[str] = []
    vandal_wrong: list[str] = []
    stalls: list[float] = []
    for f in vandals:
        q = f["target"]
        for raw_hex in f["entries"] if dead_letters is not None else ():
            raw = bytes.fromhex(raw_hex)
            reasons = [d["reason"] for d in dead_letters or () if d["queue"] == q and raw in bytes.fromhex(d["raw"])]
            if not reasons:
                vandal_missing.append(f"{q}: {raw[:48]!r}")
            elif "undecodable" not in reasons:
                vandal_wrong.append(f"{q}: {raw[:48]!r} as {reasons}")
        behind = [e for e in exact.get(q, []) if e.get("sent", e["t"]) > f["t_end"]]
        first = behind[0] if behind else None
        start = next((e for e in starts_by_queue[q] if first and e["seq"] == first["seq"]), None)
        if first is None or start is None:
            continue
        window_end = start["t"]
        if any(
            g["kind"] != "vandal"
            and _fault_window(g, lease_ttl, poll_interval)[0] <= window_end
            and _fault_window(g, lease_ttl, poll_interval)[1] >= f["t"]
            for g in causes
        ):
            continue  # another fault may have slowed the queue meanwhile
        took = start["t"] - max(f["t_end"], first["t"])
        stalls.append(took)
        if took > bound:
            breaches.append(
                f"{q}: the first task behind the vandal entries started {took:.2f}s after it was accepted "
                f"> {bound:.2f}s: the queue stalled on them"
            )
    if vandal_missing:
        breaches.append(
            f"{len(vandal_missing)} vandal entries are not in the dead letters (lost), e.g. {vandal_missing[:2]}"
        )
    if vandal_wrong:
        breaches.append(
            f"{len(vandal_wrong)} vandal entries were dead-lettered but not as undecodable, e.g. {vandal_wrong[:2]}"
        )

    # A task that held the GIL past its lease: dead-lettered for that, never counted as a
    # consumer that died (poison).
    gil_outcomes: dict[str, list[str]] = {}
    for f in faults:
        if f["kind"] != "gil" or dead_letters is None:
            continue
        reasons = [d["reason"] for d in dead_letters if d["queue"] == f["target"] and d.get("seq") == f["seq"]]
        gil_outcomes[f"{f['target']} #{f['seq']}"] = reasons
        runs = sum(1 for e in by_task[f["task_id"]] if e["event"] == "start")
        if not reasons:
            breaches.append(
                f"{f['target']}: the task holding the GIL for {f['seconds']}s (#{f['seq']}, {runs} runs) did not end "
                f"dead-lettered for outliving its lease"
            )
        elif "poison" in reasons:
            breaches.append(
                f"{f['target']}: the task holding the GIL for {f['seconds']}s (#{f['seq']}) ran {runs} times and was "
                f"dead-lettered as poison: a task that outlived its lease was counted as a consumer death"
            )

    for ev in unexpected_exits:
        breaches.append(f"{ev['replica']} (pid {ev['pid']}) exited unexpectedly with {ev['rc']}")
    left = {q: n for q, n in (remaining or {}).items() if n}
    if left:
        breaches.append(f"queues not drained at the end: {left}")

    # Throughput.
    starts_all = [e for e in journal if e["event"] == "start"]
    ends_all = [e for e in journal if e["event"] == "end"]
    span = (max(e["t"] for e in ends_all) - min(e["t"] for e in starts_all)) if ends_all and starts_all else 0.0
    first_count = len({(e["queue"], e["seq"]) for e in starts_all})
    throughput = round(first_count / span, 1) if span > 0 else 0.0

    fault_counts = Counter(f["kind"] for f in faults)
    if stops:
        fault_counts["graceful-stop"] = len(stops)
    all_takeovers = [t for ts in takeovers.values() for t in ts]
    stats.update(
        {
            "accepted": sum(len(v) for v in accepted.values()) + len(unsure),
            "accepted_place_unknown": len(unsure),
            "failed_enqueues": failed_enqueues,
            "producers": len(producers),
            "producer_interleavings": interleavings,
            "queues": len(accepted),
            "executions": len(starts_all),
            "first_executions": first_count,
            "reexecutions": reexecutions,
            "reexecutions_by_cause": dict(reexec_by_kind),
            "reexecutions_unexplained": len(unexplained_reexec),
            "retries_in_place": sum(1 for e in starts_all if e["attempt"] > 1),
            "lost": len(pyfiq_lost),
            "lost_to_redis_durability": len(durability_lost),
            "dead_lettered": sum(len(v) for v in dead.values()),
            "order_violations": len(report.order_violations),
            "overlaps_unexplained": len(unexplained_overlaps),
            "overlaps_explained_by_fencing": overlaps.overlaps_explained + stale_overlaps,
            "faults": dict(fault_counts),
            "faults_mid_task": mid_task_faults,
            "interrupted": interrupted,
            "interrupted_rerun_first": rerun_first,
            "interrupted_rerun_delivery_raised": raised,
            "takeover_max": _max(all_takeovers),
            "takeover_median": _median(all_takeovers),
            "takeover_by_kind": {k: {"n": len(v), "max": _max(v), "median": _median(v)} for k, v in takeovers.items()},
            "takeover_bound": round(bound, 3),
            "handoff_max": _max(handoffs),
            "handoff_median": _median(handoffs),
            "redis_resume_max": _max(resumes),
            "redis_losses": redis_loss,
            "lease_ttl": lease_ttl,
            "stale_starts": len(stale_starts),
            "stale_starts_after_a_pause": paused_stale_starts,
            "async_stop_drills": len(stop_drills),
            "vandal_entries": sum(len(f["entries"]) for f in vandals),
            "vandal_entries_lost": len(vandal_missing),
            "vandal_entries_misfiled": len(vandal_wrong),
            "vandal_stall_max": _max(stalls),
            "gil_tasks_dead_lettered_as": gil_outcomes,
            "throughput_tasks_per_s": throughput,
            "span_s": round(span, 1),
            "replica_log_counts": log_counts or {},
        }
    )
    out: list[str] = [
        f"producers: {len(producers)} processes, {stats['accepted']} tasks accepted on {len(accepted)} queues "
        f"({interleavings} producer switches in the acceptance order; {len(unsure)} accepted on a retry, "
        f"place unknown; {failed_enqueues} enqueues given up)",
        "faults: "
        + (", ".join(f"{k}={v}" for k, v in sorted(fault_counts.items())) or "none")
        + f" ({mid_task_faults} replica faults hit a task mid-run; {interrupted} running tasks were "
        f"interrupted; {rerun_first} of them ran again first, {raised} with a raised delivery count)",
        *report.lines(),
        f"lost tasks (every accepted task): {len(pyfiq_lost)}; lost to Redis AOF everysec in a crash: "
        f"{len(durability_lost)}; dead-lettered: {stats['dead_lettered']}",
        f"re-executions: {reexecutions} ({dict(reexec_by_kind)}), unexplained: {len(unexplained_reexec)}",
        f"overlaps: {len(unexplained_overlaps)} unexplained, {overlaps.overlaps_explained + stale_overlaps} explained "
        f"by a lapsed lease with a lower fencing token ({stale_overlaps} of them a stale holder starting late)",
        f"takeover after kill/stop/cut/blackhole: max {stats['takeover_max']}s, median {stats['takeover_median']}s "
        f"(lease TTL {lease_ttl}s, bound {bound:.2f}s) {stats['takeover_by_kind']}",
        f"graceful hand-off: max {stats['handoff_max']}s, median {stats['handoff_median']}s; "
        f"first task after a Redis restart: max {stats['redis_resume_max']}s",
        "Redis restarts: "
        + (
            "; ".join(
                f"{n}x {kind} (appendfsync={mode}): {lost_n} tasks and {writes} acknowledged writes lost"
                for (kind, mode), (n, lost_n, writes) in sorted(_redis_summary(redis_loss).items())
            )
            or "none"
        ),
        f"fencing tokens: {len(stale_starts)} starts under a lower token than one already started on their "
        f"queue ({paused_stale_starts} more right after a process freeze)",
        f"asyncio stop drills: {len(stop_drills)}; GIL-holding tasks dead-lettered as: "
        + (json.dumps(gil_outcomes) if gil_outcomes else "none"),
        f"vandal entries: {stats['vandal_entries']} written, "
        + (
            f"{len(vandal_missing)} lost, {len(vandal_wrong)} dead-lettered under another reason"
            if dead_letters is not None
            else "dead letters not read"
        )
        + f"; slowest queue past them: {stats['vandal_stall_max']}s",
        f"throughput: {throughput} tasks/s over {stats['span_s']}s ({len(starts_all)} executions)",
    ]
    if log_counts:
        out.append("replica logs: " + ", ".join(f"{k}={v}" for k, v in sorted(log_counts.items())))
    return Verdict(ok=not breaches, breaches=breaches, lines=out, stats=stats)


def _redis_summary(losses: list[Event]) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(kind, appendfsync) -> (restarts, tasks lost, acknowledged writes lost)."""
    out: dict[tuple[str, str], tuple[int, int, int]] = {}
    for r in losses:
        n, lost, writes = out.get((r["kind"], r["appendfsync"]), (0, 0, 0))
        out[(r["kind"], r["appendfsync"])] = (n + 1, lost + r["lost_tasks"], writes + r["acknowledged_writes_lost"])
    return out


def _open_runs_at(journal: list[Event]) -> Callable[[int, float], list[Event]]:
    """A function (pid, t) -> the executions that pid had started and not finished at t."""
    by_pid: dict[int, list[Event]] = defaultdict(list)
    for e in sorted(journal, key=lambda e: e["t"]):
        by_pid[e["pid"]].append(e)

    def open_at(pid: int, t: float) -> list[Event]:
        runs: dict[tuple[str, int], Event] = {}
        for e in by_pid.get(pid, []):
            if e["t"] > t:
                break
            key = (e["task_id"], e["attempt"])
            if e["event"] == "start":
                runs[key] = e
            else:
                runs.pop(key, None)
        return list(runs.values())

    return open_at


def _lapses_without_fault(journal: list[Event], faults: list[Event], ttl: float, poll: float) -> int:
    """Fence-explained overlaps whose older execution's replica had no fault around it."""
    runs: dict[str, list[Event]] = defaultdict(list)
    for e in journal:
        if e["event"] == "start":
            runs[e["queue"]].append(e)
    ends = {(e["pid"], e["task_id"], e["attempt"]): e["t"] for e in journal if e["event"] != "start"}
    count = 0
    for starts_ in runs.values():
        starts_.sort(key=lambda e: e["t"])
        for i, a in enumerate(starts_):
            until = ends.get((a["pid"], a["task_id"], a["attempt"]))
            if until is None:
                continue  # killed mid-task: nothing of it ran on
            for b in starts_[i + 1 :]:
                if b["t"] >= until:
                    break
                if a["pid"] == b["pid"] or a["fence"] >= b["fence"]:
                    continue
                # A graceful stop, even one that timed out, must not let a lease go under a
                # running task: it explains no overlap.
                if not any(
                    f["target"] in (a["replica"], "redis")
                    and f["kind"] in EXPLAINING_FAULTS
                    and f["kind"] != "async-stop"
                    and _fault_window(f, ttl, poll)[0] <= b["t"]
                    and _fault_window(f, ttl, poll)[1] >= a["t"]
                    for f in faults
                ):
                    count += 1
    return count


def _unshift_redis_clock(accepted_lines: list[Event], faults: list[Event]) -> None:
    """Put each acceptance's Redis time back on the true clock, in place.

    A clock fault restarts Redis with its wall clock shifted, and acceptances stamped with it
    would sort before earlier ones. The shift in force is whichever of the run's shifts puts
    the Redis time inside the producer's own send-to-reply window (the shifts are seconds
    apart, the windows milliseconds wide)."""
    shifts = {0} | {int(f.get("shift_ms", 0)) for f in faults if f["kind"] in REDIS_FAULTS}
    if shifts == {0}:
        return
    for e in accepted_lines:
        if "order" not in e:
            continue
        redis_s = e["order"][0] / 1e6
        high = float(e["t"])
        low = float(e.get("sent") or high)

        def distance(shift_ms: int, redis_s: float = redis_s, low: float = low, high: float = high) -> float:
            at = redis_s - shift_ms / 1000
            return max(low - at, 0.0, at - high)

        shift = min(sorted(shifts), key=distance)
        if shift:
            e["order"] = [int(e["order"][0] - shift * 1000), e["order"][1]]
            e["redis_clock_shift_ms"] = shift


def _gil_holds(journal: list[Event], faults: list[Event]) -> list[Event]:
    """One pause per run of a GIL-holding task: its process froze from the run's start to its
    end (or, killed, for the time the task asked for)."""
    asked = {f["task_id"]: float(f["seconds"]) for f in faults if f["kind"] == "gil"}
    holds: list[Event] = []
    if not asked:
        return holds
    ends = {(e["pid"], e["task_id"], e["attempt"]): e["t"] for e in journal if e["event"] != "start"}
    for e in journal:
        if e["event"] == "start" and e["task_id"] in asked:
            end = ends.get((e["pid"], e["task_id"], e["attempt"]), e["t"] + asked[e["task_id"]])
            holds.append({"kind": "gil-hold", "target": e["replica"], "pid": e["pid"], "t": e["t"], "t_end": end})
    return holds


def _counter_rollback(exact: dict[str, list[Event]], crash: Event) -> int:
    """Acknowledged writes a Redis restart lost: per queue, how far the acceptance counter went
    back (the counter is INCRed in the same transaction as every accepted enqueue)."""
    lost = 0
    for lines in exact.values():
        # Redis's own clock (read in the acceptance transaction) tells which side of the
        # restart an acceptance fell on.
        before = [e["order"][1] for e in lines if e["order"][0] / 1e6 < crash["t_down"]]
        after = [e["order"][1] for e in lines if e["order"][0] / 1e6 > crash["t_down"]]
        if before and after:
            lost += max(0, max(before) - (min(after) - 1))
    return lost


# -- one run ------------------------------------------------------------------------------------


@dataclass
class Result:
    verdict: Verdict
    run_dir: Path
    profile: Profile
    wall_s: float


def run_scenario(
    profile: Profile,
    *,
    redis_url: str | None = None,
    aof: str = "both",
    run_dir: Path | None = None,
    seed: int | None = None,
    driver: str | None = None,
    kinds: Sequence[str] | None = None,
    echo: Callable[[str], None] = print,
) -> Result:
    """Run one scenario end to end and check it."""
    wall = time.monotonic()
    if kinds and profile.schedule is not None and not set(kinds) & set(profile.schedule):
        # A fixed schedule without any of the kinds asked for: each of them once instead.
        profile = replace(profile, schedule=tuple(kinds), max_faults=max(profile.max_faults, len(kinds)))
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="pyfiq-scenario-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    rng = random.Random(seed)
    aof_modes = ["everysec", "always"] if aof == "both" else [aof]
    queues = queue_names(profile.queues)
    prefix = f"scenario-{uuid.uuid4().hex[:8]}"
    journal = run_dir / EXECUTIONS
    settings = Settings(
        prefix=prefix, shards=profile.shards, lease_ttl=profile.lease_ttl, poll_interval=profile.poll_interval
    )
    with contextlib.ExitStack() as stack:
        redis_proc: RedisProcess | None = None
        if redis_url is None:
            redis_proc = RedisProcess(run_dir / "redis", appendfsync=aof_modes[0]).start()
            stack.callback(redis_proc.stop, kill=True)
            url = redis_proc.url
        else:
            url = redis_url
        parsed = urlparse(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        try:
            require_loopback(host)
            loopback = parsed.scheme == "redis"
        except ValueError:
            loopback = False
        names = [f"replica-{i + 1}" for i in range(profile.replicas)]
        proxies: dict[str, FaultProxy] = {}
        if loopback:
            for name in names:
                proxies[name] = FaultProxy(port, host).start()
                stack.callback(proxies[name].close)
        db = parsed.path or "/0"

        def replica_url(name: str) -> str:
            return f"redis://127.0.0.1:{proxies[name].port}{db}" if name in proxies else url

        driver = driver or profile.driver
        drivers = ["threaded", "asyncio"] if driver == "mixed" else [driver]

        def argv(name: str) -> list[str]:
            return replica_argv(
                replica_url(name),
                prefix=prefix,
                shards=profile.shards,
                queues=queues,
                lease_ttl=profile.lease_ttl,
                poll_interval=profile.poll_interval,
                max_deliveries=profile.max_deliveries,
                concurrency=profile.concurrency,
                driver=drivers[names.index(name) % len(drivers)],
                name=name,
            )

        env = {k: v for k, v in os.environ.items() if k not in ("PYFIQ_ECHO",)}
        env[JOURNAL_ENV] = str(journal)
        env[DRILL_ENV] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        extra = [q for q in queues if q not in QUEUES]
        if extra:
            env[EXTRA_QUEUES_ENV] = ",".join(extra)
        fleet = Fleet(argv, env, run_dir / "logs")
        stack.callback(fleet.close)
        observer = RedisQueueBackend(url, settings)
        stack.callback(observer.close)

        echo(
            f"run {prefix} in {run_dir}: {profile.replicas} replicas ({'/'.join(drivers)}), {len(queues)} queues, "
            f"{profile.producers} producers, lease TTL {profile.lease_ttl}s, redis {url}"
            + ("" if proxies else " (no network faults: Redis is not on loopback)")
        )
        for name in names:
            fleet.spawn(name)
        fleet.wait_ready(names)

        budget = profile.duration + 30
        producers: list[subprocess.Popen[bytes]] = []
        for i in range(profile.producers):
            with open(run_dir / "logs" / f"producer-{i}.log", "wb") as out:
                producers.append(
                    popen(
                        producer_argv(
                            url,
                            prefix=prefix,
                            shards=profile.shards,
                            queues=queues,
                            count=10**7,
                            rate=profile.rate,
                            hold=profile.hold,
                            journal_dir=run_dir,
                            max_seconds=budget,
                            fail_every=profile.fail_every,
                        ),
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

        def kill_producers() -> None:
            for p in producers:
                if p.poll() is None:
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)

        stack.callback(kill_producers)

        tail = JournalTail(journal)
        deadline = time.monotonic() + 20
        while tail.ends < 10 * len(queues):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no work got done; see {run_dir}/logs")
            time.sleep(0.05)
            tail.poll()

        injector = Injector(
            profile=profile,
            fleet=fleet,
            names=names,
            proxies=proxies,
            redis_proc=redis_proc,
            aof_modes=aof_modes,
            tail=tail,
            faults_path=run_dir / FAULTS,
            rng=rng,
            echo=echo,
            backend=observer,
            queues=queues,
            drivers={name: drivers[i % len(drivers)] for i, name in enumerate(names)},
        )
        if kinds:
            wanted = injector.available(kinds)
        elif profile.schedule is not None:
            wanted = injector.available(dict.fromkeys(profile.schedule))
        else:  # the random mix: the kinds the profile weighs
            wanted = injector.available(k for k, w in profile.weights if w > 0)
        if profile.schedule is not None:
            echo(f"faults: fixed schedule {', '.join(k for k in profile.schedule if k in wanted)}")
        else:
            echo(f"faults: random, of {', '.join(wanted)}")
        injector.run(wanted, time.time() + profile.duration)
        echo(f"injected: {dict(injector.done)}")

        # Producers stop gracefully (SIGTERM ends the loop after the current enqueue).
        for p in producers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        producer_failures = []
        for i, p in enumerate(producers):
            try:
                rc = p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = None
            if rc != 0:
                log = (run_dir / "logs" / f"producer-{i}.log").read_text(errors="replace")[-1500:]
                producer_failures.append(f"producer {i} ended with {rc}: {log}")

        remaining = _wait_drained(observer, queues, profile.drain_timeout, fleet)
        fleet.reap()
        for name in names:  # graceful stop at the end: hands every lease over
            if fleet.alive(name):
                fleet.terminate(name, timeout=15)
        dead_letters = read_dead_letters(observer, queues)
        (run_dir / DEAD_LETTERS).write_text("".join(json.dumps(d) + "\n" for d in dead_letters))
        log_counts = fleet.log_counts()
        unexpected = list(fleet.unexpected)
        if redis_url is not None:  # someone else's Redis: leave nothing of this run behind
            with contextlib.suppress(redis.RedisError):
                keys = list(observer.client.scan_iter(match=f"{prefix}:*", count=1000))
                for i in range(0, len(keys), 500):
                    observer.client.delete(*keys[i : i + 500])

    verdict = verify(
        run_dir,
        lease_ttl=profile.lease_ttl,
        poll_interval=profile.poll_interval,
        remaining=remaining,
        unexpected_exits=unexpected,
        log_counts=log_counts,
        dead_letters=dead_letters,
    )
    for msg in injector.errors:
        verdict.breaches.append(f"fault injection failed: {msg}")
    for msg in producer_failures:
        verdict.breaches.append(msg)
    verdict.ok = not verdict.breaches
    verdict.stats["wall_s"] = round(time.monotonic() - wall, 1)
    verdict.lines.append(f"wall time: {verdict.stats['wall_s']}s; journals and logs: {run_dir}")
    (run_dir / "verdict.json").write_text(
        json.dumps({"ok": verdict.ok, "breaches": verdict.breaches, "stats": verdict.stats}, indent=2, default=str)
    )
    return Result(verdict, run_dir, profile, time.monotonic() - wall)


def read_dead_letters(backend: RedisQueueBackend, queues: Sequence[str]) -> list[Event]:
    """Every dead letter of ``queues`` (and of any stream the dead-letter index names), for
    the checker: queue, reason, the scenario sequence number when the task decodes, and the
    stored record's raw bytes in hex (a vandal entry is found in them)."""
    out: list[Event] = []
    for stream in sorted(set(queues) | set(backend.dead_letter_streams())):
        for d in backend.dead_letters(stream, 100_000):
            seq = None
            if d.record is not None and d.record.args:
                with contextlib.suppress(TypeError, ValueError):
                    seq = int(d.record.args[0])
            out.append({"queue": stream, "reason": d.reason, "seq": seq, "raw": bytes(d.raw).hex()})
    return out


def _wait_drained(
    backend: RedisQueueBackend, queues: Sequence[str], timeout: float, fleet: Fleet | None = None
) -> dict[str, int]:
    """Wait until no queue has pending or in-flight tasks; returns what is left per queue."""
    deadline = time.monotonic() + timeout
    left: dict[str, int] = {}
    while True:
        try:
            left = {}
            for q in queues:
                info = backend.queue_info(q)
                left[q] = int(info["pending"]) + int(info["inflight"])
            if not any(left.values()):
                return left
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        if fleet is not None:
            fleet.reap()
        if time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# -- command line -------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """The pyfiq scenario runner: replicas, producers, faults and a checker."""


def _queues_option(f: Any) -> Any:
    return click.option(
        "--queues",
        default=",".join(QUEUES),
        show_default=True,
        help="Comma-separated scenario queues.",
    )(f)


@cli.command("run")
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="short", show_default=True)
@click.option("--redis", "url", default=None, help="Use this Redis instead of starting one (no Redis faults then).")
@click.option("--aof", type=click.Choice(["everysec", "always", "both"]), default="both", show_default=True,
              help="appendfsync of the Redis the runner starts; 'both' switches after each crash.")  # fmt: skip
@click.option("--replicas", type=click.IntRange(2, 32), default=None, help="Override the profile's replica count.")
@click.option("--queues", "queue_count", type=click.IntRange(1, 64), default=None, help="Override the queue count.")
@click.option("--producers", type=click.IntRange(1, 16), default=None, help="Override the producer count.")
@click.option("--duration", type=float, default=None, help="Bound of the fault phase in seconds.")
@click.option("--max-faults", type=int, default=None, help="Bound of the number of faults.")
@click.option("--faults", default=None, help=f"Comma-separated fault kinds among {', '.join(FAULT_KINDS)}.")
@click.option("--driver", type=click.Choice(["threaded", "asyncio", "mixed"]), default=None,
              help="Replica drivers (default: the profile's, mixed for short and soak).")  # fmt: skip
@click.option("--dir", "run_dir", type=click.Path(path_type=Path), default=None, help="Where journals and logs go.")
@click.option("--seed", type=int, default=None)
def run_command(
    profile_name: str,
    url: str | None,
    aof: str,
    replicas: int | None,
    queue_count: int | None,
    producers: int | None,
    duration: float | None,
    max_faults: int | None,
    faults: str | None,
    driver: str | None,
    run_dir: Path | None,
    seed: int | None,
) -> None:
    """Run a fault-injection scenario and check it; exit status 0 means no breach."""
    profile = PROFILES[profile_name]
    changes: dict[str, Any] = {}
    for key, value in (
        ("replicas", replicas),
        ("queues", queue_count),
        ("producers", producers),
        ("duration", duration),
        ("max_faults", max_faults),
    ):
        if value is not None:
            changes[key] = value
    if changes:
        profile = replace(profile, **changes)
    kinds = None
    if faults:
        kinds = [k.strip() for k in faults.split(",") if k.strip()]
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise click.BadParameter(f"unknown fault kinds {sorted(unknown)}", param_hint="--faults")
    result = run_scenario(
        profile, redis_url=url, aof=aof, run_dir=run_dir, seed=seed, driver=driver, kinds=kinds, echo=click.echo
    )
    click.echo(result.verdict.text())
    sys.exit(0 if result.verdict.ok else 1)


@cli.command("producer")
@click.option("--redis", "url", default=lambda: os.environ.get("PYFIQ_REDIS_URL", "redis://localhost:6379/0"),
              show_default="$PYFIQ_REDIS_URL or redis://localhost:6379/0")  # fmt: skip
@click.option("--prefix", default="pyfiq-scenario", show_default=True)
@click.option("--shards", default=4, show_default=True, type=click.IntRange(1, 16384))
@_queues_option
@click.option("--count", default=200, show_default=True, type=click.IntRange(1), help="Tasks per queue.")
@click.option("--rate", default=50.0, show_default=True, type=float, help="Enqueues per second (0: no pause).")
@click.option("--hold", default=0.02, show_default=True, type=float, help="Seconds each task sleeps.")
@click.option("--dir", "journal_dir", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Directory of the acceptance journal.")  # fmt: skip
@click.option("--max-seconds", default=600.0, show_default=True, type=float)
@click.option("--fail-every", default=97, show_default=True, type=int, help="Every Nth task fails once (0: none).")
def producer_command(
    url: str,
    prefix: str,
    shards: int,
    queues: str,
    count: int,
    rate: float,
    hold: float,
    journal_dir: Path,
    max_seconds: float,
    fail_every: int,
) -> None:
    """Enqueue journaled scenario tasks, recording each acceptance; SIGTERM ends it cleanly."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    journal_dir.mkdir(parents=True, exist_ok=True)
    producer, accepted = produce(
        url,
        prefix=prefix,
        shards=shards,
        queues=[q for q in queues.split(",") if q],
        count=count,
        rate=rate,
        hold=hold,
        journal_dir=journal_dir,
        max_seconds=max_seconds,
        fail_every=fail_every,
        stop=stop,
    )
    click.echo(f"producer {producer}: {accepted} tasks accepted")


@cli.command("check")
@click.option("--redis", "url", default=lambda: os.environ.get("PYFIQ_REDIS_URL", "redis://localhost:6379/0"),
              show_default="$PYFIQ_REDIS_URL or redis://localhost:6379/0")  # fmt: skip
@click.option("--prefix", default="pyfiq-scenario", show_default=True)
@click.option("--shards", default=4, show_default=True, type=click.IntRange(1, 16384))
@click.option("--dir", "run_dir", type=click.Path(path_type=Path), required=True,
              help="Directory holding executions.jsonl and accepted-*.jsonl (and faults.jsonl if any).")  # fmt: skip
@click.option("--lease-ttl", default=10.0, show_default=True, type=float)
@click.option("--poll-interval", default=1.0, show_default=True, type=float)
@click.option("--drain-timeout", default=120.0, show_default=True, type=float, help="Wait this long for the queues.")
@click.option("--offline", is_flag=True, help="Check the journals only (no Redis: dead letters and leftovers unknown).")
def check_command(
    url: str,
    prefix: str,
    shards: int,
    run_dir: Path,
    lease_ttl: float,
    poll_interval: float,
    drain_timeout: float,
    offline: bool,
) -> None:
    """Wait until the queues drain, then check the journals; exit status 0 means no breach."""
    queues = sorted({e["queue"] for e in read_accepted(run_dir)}) if run_dir.is_dir() else []
    if not queues:
        click.echo(f"no accepted tasks in {run_dir}: nothing to check")
        sys.exit(1)
    remaining: dict[str, int] | None = None
    dead_letters: list[Event] | None = None
    if not offline:
        backend = RedisQueueBackend(url, Settings(prefix=prefix, shards=shards))
        try:
            remaining = _wait_drained(backend, queues, drain_timeout)
            time.sleep(0.5)  # the last end lines are written after the acknowledgement
            dead_letters = read_dead_letters(backend, queues)
        except redis.RedisError as exc:
            click.echo(f"Redis at {url} unreachable: {exc} (use --offline to check the journals alone)")
            sys.exit(1)
        finally:
            backend.close()
    verdict = verify(
        run_dir, lease_ttl=lease_ttl, poll_interval=poll_interval, remaining=remaining, dead_letters=dead_letters
    )
    click.echo(verdict.text())
    sys.exit(0 if verdict.ok else 1)


@cli.command("health")
@click.option("--redis", "url", default=lambda: os.environ.get("PYFIQ_REDIS_URL", "redis://localhost:6379/0"),
              show_default="$PYFIQ_REDIS_URL or redis://localhost:6379/0")  # fmt: skip
@click.option("--pid", type=int, default=None, help="Also require this process to be a running pyfiq replica.")
def health_command(url: str, pid: int | None) -> None:
    """Exit 0 if Redis answers PING (and process PID is a live pyfiq replica): a healthcheck."""
    if pid is not None:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            click.echo(f"no process {pid}", err=True)
            sys.exit(1)
        if b"pyfiq" not in argv or b"replica" not in argv:
            click.echo(f"process {pid} is not a pyfiq replica: {argv!r}", err=True)
            sys.exit(1)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        click.echo(f"redis unreachable: {exc}", err=True)
        sys.exit(1)
    finally:
        client.close()


if __name__ == "__main__":
    cli()
