"""The fault-injection scenario runner: many replicas, proven.

One run starts a ``redis-server`` with AOF (or uses ``--redis URL``), N replica processes
(``python -m pyfiq replica``, each behind its own loopback :class:`~pyfiq.chaos.faults.FaultProxy`),
M scenario queues and P producer processes (``python -m pyfiq.chaos.runner producer``) enqueuing to
the same queues concurrently, then injects a schedule of faults, drains, and checks the
outcome from the journals:

- ``executions.jsonl``: every start/end/fail of a task (written by ``pyfiq.chaos.scenario.step`` in
  the replicas);
- ``accepted-<producer>.jsonl``: every task Redis accepted, with its place in Redis's own
  order (a counter and Redis's clock read in the same MULTI/EXEC as the enqueue, so the
  acceptance order across concurrent producers is exact, not guessed from client clocks);
- ``faults.jsonl``: every fault the runner injected, with its target and its time span;
- ``dead-letters.jsonl``: every dead letter left at the end (reason, raw bytes).

Faults: SIGKILL, SIGSTOP, a cut, blackholed, delayed or reply-delayed (``slow-reply``) link of
one replica; Redis restarted, crashed, or restarted with its wall clock shifted (``clock``,
through the ``clock_shift.c`` LD_PRELOAD shim); malformed entries pushed into a live queue
(``vandal``); an asyncio worker stopped with a short timeout mid-task in a process that lives
on (``async-stop``); a task holding the GIL past the lease TTL (``gil``); a rolling restart.

``verify`` turns them into a :class:`Verdict`, one checker per property (``CHECKERS``: each reads
the run's :class:`RunFacts` and returns a :class:`Finding`, its breaches and its figures);
:class:`Scenario` is one run, step by step. The docker-compose ``checker`` service runs
the same function through ``python -m pyfiq.chaos.runner check``, its ``producer`` service the same
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
from functools import cached_property
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple
from urllib.parse import urlparse

import click
import redis

from ..config import Settings
from ..engine.protocol import Ops
from ..redis.backend import RedisQueueBackend
from ..task import TaskRecord, new_task_id
from .faults import FaultProxy, free_port, require_loopback
from .scenario import (
    DRILL_ENV,
    EXTRA_QUEUES_ENV,
    JOURNAL_ENV,
    QUEUES,
    STOP_DRILL_TIMEOUT,
    Report,
    check,
    queue_names,
    read_journal,
)

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
CLOCK_SHIM_SOURCE = Path(__file__).with_name("clock_shift.c")
_clock_shim: Path | None = None
_clock_shim_lock = threading.Lock()


def build_clock_shim() -> Path:
    """Compile ``clock_shift.c`` (once per process, into a temporary directory) and return the
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
    ack_mode: str = "group",
) -> list[str]:
    """The replica command (the same one the compose ``app`` service runs, with the default
    acknowledgement mode)."""
    argv = [
        sys.executable, "-m", "pyfiq", "worker", "pyfiq.chaos.scenario",
        "--redis", url, "--prefix", prefix, "--shards", str(shards), "--queues", ",".join(queues),
        "--lease-ttl", str(lease_ttl), "--poll-interval", str(poll_interval),
        "--max-deliveries", str(max_deliveries), "--concurrency", str(concurrency),
        "--driver", driver, "--log-level", log_level,
    ]  # fmt: skip
    if name is not None:
        argv += ["--name", name]
    if ack_mode != "group":
        argv += ["--ack-mode", ack_mode]
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
    """Enqueue ``pyfiq.chaos.scenario.step(seq, **kwargs)`` on ``queue`` and return what Redis
    accepted, with its exact place in the acceptance order.

    One MULTI/EXEC runs INCR of the queue's acceptance counter, the pyfiq enqueue script and
    TIME, so (Redis time, counter) orders acceptances exactly across producers and across
    Redis restarts. A connection error leaves the outcome unknown: the enqueue is retried
    under a dedup key, and a retry that finds the first attempt accepted (``duplicate``)
    records an acceptance whose place is unknown.
    """
    record = TaskRecord(f"pyfiq.chaos.scenario.step.{queue}", [seq], dict(kwargs))
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
    ((task_id, new),) = Ops.parse_enqueue(call, reply)
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
        sys.executable, "-m", "pyfiq.chaos.runner", "producer",
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
            # A replica whose every reply is late needs several round trips before it claims:
            # the end of the run it was in, a look at the shards, the claim itself, and when its
            # threads need one more pooled connection than before, that connection's handshake
            # (three or four commands, each waiting out the delay: measured up to 12 s).
            placed = time.monotonic()
            deadline = placed + 8 * seconds + self.p.lease_ttl
            claimed = None
            while claimed is None and time.monotonic() < deadline:
                held = [q for q in rest if self.backend.client.exists(self.backend.keys.stream(q).lease)]
                claimed = held[0] if held else None
                time.sleep(0.005)
            if claimed is None:
                return {"outrun": "the slow replica claimed nothing"}
            claimed_at, claim_after = time.time(), round(time.monotonic() - placed, 3)
            time.sleep(self.p.lease_ttl + 0.05)  # its lease lapses
            release.touch()
            time.sleep(seconds)  # its late reply arrives meanwhile
            return {"outrun": "claimed", "claimed": claimed, "claimed_at": claimed_at, "claim_after": claim_after}
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
        record = TaskRecord(f"pyfiq.chaos.scenario.step.{queue}", [-1], {"hold": self.p.hold})
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
    """The outcome of a check: ``ok`` if no breach, the report lines, and the figures (``stats``)."""

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


@dataclass
class Acceptances:
    """What Redis accepted, per queue in Redis's own order (exact across producers)."""

    #: Acceptances whose place is known, per queue, in Redis's order.
    exact: dict[str, list[Event]]
    #: The same, as sequence numbers.
    seqs: dict[str, list[int]]
    #: Accepted on a retry (``duplicate``): the task is in, its place is unknown.
    unsure: list[Event]
    #: Enqueues the producers gave up on.
    failed: int
    #: Producer switches in the acceptance order, all queues together.
    interleavings: int
    #: (queue, seq) -> when the producer had the acceptance back.
    at: dict[tuple[str, int], float]
    producers: set[str]

    @classmethod
    def of(cls, lines: list[Event]) -> Acceptances:
        exact: dict[str, list[Event]] = defaultdict(list)
        unsure: list[Event] = []
        failed = 0
        for line in lines:
            if line["status"] == "accepted":
                exact[line["queue"]].append(line)
            elif line["status"] == "duplicate":
                unsure.append(line)
            else:
                failed += 1
        for q_lines in exact.values():
            q_lines.sort(key=lambda e: (e["order"][0], e["order"][1]))
        return cls(
            exact=exact,
            seqs={q: [e["seq"] for e in q_lines] for q, q_lines in exact.items()},
            unsure=unsure,
            failed=failed,
            interleavings=sum(
                a["producer"] != b["producer"] for q_lines in exact.values() for a, b in itertools.pairwise(q_lines)
            ),
            at={(e["queue"], e["seq"]): e["t"] for e in lines if "t" in e},
            producers={e["producer"] for e in lines if e.get("producer") not in (None, INJECTOR)},
        )


@dataclass
class Executions:
    """The execution journal, indexed the ways the checkers look it up."""

    lines: list[Event]
    #: Every line of a task, in time order.
    by_task: dict[str, list[Event]]
    #: When each process wrote its first line.
    first_seen: dict[int, float]
    #: Start lines per queue, in time order.
    starts_by_queue: dict[str, list[Event]]
    #: End times per (pid, queue), in time order.
    ends_by_pid_queue: dict[tuple[int, str], list[float]]
    #: When each run, (pid, task id, attempt), ended or failed.
    ends: dict[tuple[int, str, int], float]
    #: (pid, t) -> the runs that process had started and not finished at t.
    open_at: Callable[[int, float], list[Event]]

    @classmethod
    def of(cls, journal: list[Event]) -> Executions:
        by_task: dict[str, list[Event]] = defaultdict(list)
        first_seen: dict[int, float] = {}
        for e in journal:
            by_task[e["task_id"]].append(e)
            first_seen[e["pid"]] = min(first_seen.get(e["pid"], e["t"]), e["t"])
        for events in by_task.values():
            events.sort(key=lambda e: e["t"])
        starts_by_queue: dict[str, list[Event]] = defaultdict(list)
        ends_by_pid_queue: dict[tuple[int, str], list[float]] = defaultdict(list)
        for e in sorted(journal, key=lambda e: e["t"]):
            if e["event"] == "start":
                starts_by_queue[e["queue"]].append(e)
            elif e["event"] == "end":
                ends_by_pid_queue[(e["pid"], e["queue"])].append(e["t"])
        ends = {(e["pid"], e["task_id"], e["attempt"]): e["t"] for e in journal if e["event"] != "start"}
        return cls(journal, by_task, first_seen, starts_by_queue, ends_by_pid_queue, ends, _open_runs_at(journal))


class Overlaps(NamedTuple):
    """Overlapping executions of one queue, sorted out (see ``RunFacts.overlaps``)."""

    unexplained: list[tuple[Event, Event]]
    #: Explained by a stale holder starting late, right after its process froze.
    stale_late: int
    #: Explained by a lapsed lease: the later run holds the higher fencing token.
    by_fence: int


@dataclass
class RunFacts:
    """The shared inputs of every checker, built once: one run's journals, the settings they
    are judged by, and what the caller found in Redis and in the fleet at the end."""

    lease_ttl: float
    poll_interval: float
    accepted: Acceptances
    executions: Executions
    faults: list[Event]
    #: What can explain a lost lease: the injected faults, and each run of a GIL-holding task
    #: (its whole process froze meanwhile).
    causes: list[Event]
    #: Sequence numbers found dead-lettered, per queue.
    dead: dict[str, list[int]]
    #: Every dead-letter record (queue, reason, seq or None, raw in hex); None: not read.
    dead_letters: Sequence[Event] | None
    #: Tasks still pending or in flight per queue at the end; None: not known.
    remaining: dict[str, int] | None
    unexpected_exits: Sequence[Event]
    log_counts: dict[str, int] | None

    @classmethod
    def read(
        cls,
        run_dir: Path,
        *,
        lease_ttl: float,
        poll_interval: float,
        dead: dict[str, list[int]] | None = None,
        remaining: dict[str, int] | None = None,
        unexpected_exits: Sequence[Event] = (),
        log_counts: dict[str, int] | None = None,
        dead_letters: Sequence[Event] | None = None,
    ) -> RunFacts:
        """Read the journals of ``run_dir`` (see ``verify`` for the other arguments)."""
        accepted_lines = read_accepted(run_dir)
        journal = read_journal(run_dir / EXECUTIONS)
        faults = read_lines(run_dir / FAULTS)
        if dead is None and dead_letters is not None:
            dead = defaultdict(list)
            for d in dead_letters:
                if d.get("seq") is not None:
                    dead[d["queue"]].append(int(d["seq"]))
        _unshift_redis_clock(accepted_lines, faults)
        return cls(
            lease_ttl=lease_ttl,
            poll_interval=poll_interval,
            accepted=Acceptances.of(accepted_lines),
            executions=Executions.of(journal),
            faults=faults,
            causes=faults + _gil_holds(journal, faults),
            dead=dead or {},
            dead_letters=dead_letters,
            remaining=remaining,
            unexpected_exits=unexpected_exits,
            log_counts=log_counts,
        )

    @property
    def takeover_bound(self) -> float:
        """The longest a queue may wait for another replica after its holder went away."""
        return self.lease_ttl + self.poll_interval + TAKEOVER_SLACK

    def window(self, f: Event) -> tuple[float, float]:
        """When fault ``f`` could have made a replica lose a lease or an acknowledgement."""
        return _fault_window(f, self.lease_ttl, self.poll_interval)

    def paused(self, pid: int, t: float) -> bool:
        """Whether process ``pid`` was frozen (SIGSTOP, a task holding the GIL) shortly before ``t``."""
        return any(
            f["kind"] in PAUSE_FAULTS
            and f.get("pid") == pid
            and f["t"] <= t <= float(f["t_end"] if "t_end" in f else f["t"]) + self.takeover_bound
            for f in self.causes
        )

    @cached_property
    def stops(self) -> list[Event]:
        """The graceful stops of the rolling restarts."""
        return [
            dict(s, kind="graceful-stop") for f in self.faults if f["kind"] == "rolling-restart" for s in f["stops"]
        ]

    @cached_property
    def report(self) -> Report:
        """Loss and order (``pyfiq.chaos.scenario.check``) over the tasks whose place is known."""
        exact_keys = {(q, s) for q, seqs in self.accepted.seqs.items() for s in seqs}
        journal = [e for e in self.executions.lines if (e["queue"], e["seq"]) in exact_keys]
        return check(journal, self.accepted.seqs, self.dead)

    @cached_property
    def lost(self) -> list[tuple[str, int]]:
        """Accepted tasks that neither ended nor were dead-lettered, whatever lost them."""
        ended = {(e["queue"], e["seq"]) for e in self.executions.lines if e["event"] == "end"}
        dead_keys = {(q, s) for q, seqs in self.dead.items() for s in seqs}
        lost = [(q, s) for q, seqs in self.report.lost.items() for s in seqs]
        return lost + [
            (e["queue"], e["seq"]) for e in self.accepted.unsure if (e["queue"], e["seq"]) not in ended | dead_keys
        ]

    @cached_property
    def overlaps(self) -> Overlaps:
        """Overlaps over every execution. ``check()`` takes the earlier-started run as the one
        whose lease lapsed; a stale holder can also *start* late: the later-started run then
        has the lower fence."""
        every = check(self.executions.lines, {})
        unexplained: list[tuple[Event, Event]] = []
        stale_late = 0
        for a, b in every.overlaps_unexplained:
            # A holder checks its lease right before it starts a task, counting from when it
            # sent the request that granted or renewed it, so only a freeze of the whole
            # process after that check explains a late start; a slow network does not.
            if b["fence"] < a["fence"] and self.paused(b["pid"], b["t"]):
                stale_late += 1
            else:
                unexplained.append((a, b))
        return Overlaps(unexplained, stale_late, every.overlaps_explained)

    @cached_property
    def redis_restarts(self) -> list[tuple[Event, Event]]:
        """Each Redis restart with what it lost: the lost tasks accepted within EVERYSEC_WINDOW
        before it, and acknowledged writes (how far the acceptance counters went back)."""
        out = []
        for f in self.faults:
            if f["kind"] not in REDIS_FAULTS:
                continue
            before = {k for k in self.lost if f["t"] - EVERYSEC_WINDOW <= self.accepted.at.get(k, 0) <= f["t"]}
            loss = {"kind": f["kind"], "appendfsync": f["appendfsync"], "lost_tasks": len(before)}
            loss["acknowledged_writes_lost"] = _counter_rollback(self.accepted.exact, f)
            out.append((f, loss))
        return out


@dataclass
class Finding:
    """What one checker found: its breaches (none: the property held) and its figures, which
    go to the verdict's stats."""

    breaches: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def census(run: RunFacts) -> Finding:
    """No property, only figures: what was accepted, run and injected, and the throughput."""
    accepted = run.accepted
    starts = [e for e in run.executions.lines if e["event"] == "start"]
    ends = [e for e in run.executions.lines if e["event"] == "end"]
    span = (max(e["t"] for e in ends) - min(e["t"] for e in starts)) if ends and starts else 0.0
    first_count = len({(e["queue"], e["seq"]) for e in starts})
    fault_counts = Counter(f["kind"] for f in run.faults)
    if run.stops:
        fault_counts["graceful-stop"] = len(run.stops)
    figures = {
        "accepted": sum(len(v) for v in accepted.seqs.values()) + len(accepted.unsure),
        "accepted_place_unknown": len(accepted.unsure),
        "failed_enqueues": accepted.failed,
        "producers": len(accepted.producers),
        "producer_interleavings": accepted.interleavings,
        "queues": len(accepted.seqs),
        "executions": len(starts),
        "first_executions": first_count,
        "retries_in_place": sum(1 for e in starts if e["attempt"] > 1),
        "faults": dict(fault_counts),
        "lease_ttl": run.lease_ttl,
        "throughput_tasks_per_s": round(first_count / span, 1) if span > 0 else 0.0,
        "span_s": round(span, 1),
        "replica_log_counts": run.log_counts or {},
    }
    return Finding(figures=figures)


def check_lost_tasks(run: RunFacts) -> Finding:
    """Every accepted task ended or was dead-lettered. A task lost in a Redis crash under
    appendfsync=everysec, accepted within the window before the crash, is Redis's documented
    durability limit, not pyfiq's: counted apart, not a breach."""
    crashes = [f for f in run.faults if f["kind"] == "redis-crash"]
    durability_lost: list[tuple[str, int]] = []
    pyfiq_lost: list[tuple[str, int]] = []
    for key in run.lost:
        t = run.accepted.at.get(key)
        if t is not None and any(
            c["appendfsync"] == "everysec" and c["t"] - EVERYSEC_WINDOW <= t <= c["t"] for c in crashes
        ):
            durability_lost.append(key)
        else:
            pyfiq_lost.append(key)
    finding = Finding()
    if pyfiq_lost:
        finding.breaches.append(f"{len(pyfiq_lost)} accepted tasks lost, e.g. {pyfiq_lost[:5]}")
    finding.figures = {
        "lost": len(pyfiq_lost),
        "lost_to_redis_durability": len(durability_lost),
        "dead_lettered": sum(len(v) for v in run.dead.values()),
    }
    return finding


def check_first_execution_order(run: RunFacts) -> Finding:
    """On each queue, first executions follow Redis's acceptance order."""
    finding = Finding(figures={"order_violations": len(run.report.order_violations)})
    for q, firsts in run.report.order_violations.items():
        expected = [s for s in run.accepted.seqs[q] if s in set(firsts)]
        at = next((i for i, (a, b) in enumerate(zip(firsts, expected, strict=False)) if a != b), None)
        finding.breaches.append(f"{q}: first executions broke acceptance order at position {at}")
    return finding


def check_reexecutions(run: RunFacts) -> Finding:
    """Each re-execution (a first attempt started again) follows a fault on the replica that
    ran the task before (or on Redis), or a graceful stop during the task's retry back-off."""
    by_cause: Counter[str] = Counter()
    unexplained: list[Event] = []
    count = 0
    for events in run.executions.by_task.values():
        starts = [e for e in events if e["event"] == "start"]
        for prev, rerun in itertools.pairwise(starts):
            if rerun["attempt"] != 1:
                continue
            count += 1
            cause = _rerun_cause(run, events, prev, rerun)
            if cause is None:
                unexplained.append(rerun)
            else:
                by_cause[cause] += 1
    finding = Finding()
    if unexplained:
        finding.breaches.append(
            f"{len(unexplained)} re-executions with no crash or lease loss to explain them, e.g. "
            + "; ".join(f"{e['queue']} #{e['seq']} on {e['replica']} at {e['t']:.3f}" for e in unexplained[:3])
        )
    finding.figures = {
        "reexecutions": count,
        "reexecutions_by_cause": dict(by_cause),
        "reexecutions_unexplained": len(unexplained),
    }
    return finding


def _rerun_cause(run: RunFacts, events: list[Event], prev: Event, rerun: Event) -> str | None:
    """What explains ``rerun``, a task started again after its run ``prev`` (``events``: the
    task's lines): a fault, a graceful stop during its retry back-off, or nothing (None)."""
    prev_last = [e for e in events if e["pid"] == prev["pid"] and e["t"] < rerun["t"]][-1]
    # Usually the earlier run was interrupted (a fault on its replica, or on Redis). A re-run
    # under an *older* fence is the other way round: a holder paused or cut off after it was
    # handed the task wakes up and runs it although the new holder already has; fencing keeps
    # it from acknowledging, not from running (README: "Fencing protects the queue, not your
    # side effects").
    stale = rerun["fence"] < prev["fence"]
    culprit = rerun if stale else prev
    since = min(prev["t"], rerun["t"])
    candidates = [(f, late) for f in run.causes if (late := _explains(run, f, culprit, since, rerun["t"])) is not None]
    if candidates:
        # The first fault after the interrupted run began, else one already under way.
        later = [c for c in candidates if c[0]["t"] >= prev["t"]]
        f, late = min(later, key=lambda c: c[0]["t"]) if later else max(candidates, key=lambda c: c[0]["t"])
        kind: str = f["kind"]
        return kind + (" (stale holder)" if stale else "") + (" (connection found dead later)" if late else "")
    for s in run.stops:
        if s["pid"] == prev["pid"] and prev_last["event"] == "fail" and s["t"] <= rerun["t"]:
            return "graceful-stop-during-retry"
    return None


def _explains(run: RunFacts, f: Event, culprit: Event, since: float, until: float) -> bool | None:
    """Whether fault ``f`` can explain a lease or acknowledgement lost by ``culprit``'s process
    between ``since`` and ``until``: None if not, True if only as a connection the fault reset
    and the process found dead on its next use, which can be much later (a pooled connection,
    with no retry on connection errors)."""
    if f["kind"] not in EXPLAINING_FAULTS or f["t"] > until:
        return None
    if f["target"] not in (culprit["replica"], "redis"):
        return None
    if run.window(f)[1] >= since:
        return False
    same_process = f.get("pid") == culprit["pid"] if f["target"] != "redis" else None
    if f["kind"] in ("cut", "blackhole") and same_process:
        return True
    if f["kind"] in REDIS_FAULTS and run.executions.first_seen.get(culprit["pid"], float("inf")) < f["t"]:
        return True
    return None


def check_overlaps(run: RunFacts) -> Finding:
    """Executions of one queue overlap only on a lapsed lease: the later run under a higher
    fencing token, or a stale holder starting late right after its process froze; and a lease
    lapses only around a fault on its holder's replica (or on Redis)."""
    overlaps = run.overlaps
    finding = Finding()
    if overlaps.unexplained:
        a, b = overlaps.unexplained[0]
        finding.breaches.append(
            f"{len(overlaps.unexplained)} overlapping executions of one queue not explained by a lapsed "
            f"lease, e.g. {a['queue']} #{a['seq']} on {a['replica']} (fence {a['fence']}) and #{b['seq']} on "
            f"{b['replica']} (fence {b['fence']})"
        )
    lapsed_without_fault = _lapses_without_fault(run.executions.lines, run.causes, run.lease_ttl, run.poll_interval)
    if lapsed_without_fault:
        finding.breaches.append(f"{lapsed_without_fault} overlaps (lapsed leases) with no fault on that replica")
    finding.figures = {
        "overlaps_unexplained": len(overlaps.unexplained),
        "overlaps_explained_by_fencing": overlaps.by_fence + overlaps.stale_late,
    }
    return finding


def check_takeovers(run: RunFacts) -> Finding:
    """After each fault that made a replica drop its queues (kill, stop, cut, blackhole), each
    task it was running runs again first on its queue (G3), under a newer lease, within the
    take-over bound (lease TTL + poll interval + TAKEOVER_SLACK)."""
    bound = run.takeover_bound
    finding = Finding()
    takeovers: dict[str, list[float]] = defaultdict(list)
    mid_task = interrupted = rerun_first = raised = 0
    for f in run.faults:
        if f["kind"] not in TAKEOVER_FAULTS:
            continue
        held = run.executions.open_at(f["pid"], f["t"])
        mid_task += bool(held)
        for task_run, nxt in _interrupted(run, f, held):
            interrupted += 1
            q = task_run["queue"]
            if nxt is None:
                finding.breaches.append(f"{q}: nothing ran after the {f['kind']} of {f['target']} at {f['t']:.3f}")
                continue
            # The interrupted task (or the one whose acknowledgement could not reach Redis)
            # runs again first, before anything behind it; with group acknowledgements, after
            # the tasks that had ended on that holder whose acknowledgement had not landed.
            again = _rerun_after_unacknowledged(run, f, task_run)
            if again is not None:
                rerun_first += 1
                raised += again["deliveries"] > task_run["deliveries"]
            else:
                finding.breaches.append(
                    f"{q}: after the {f['kind']} of {f['target']}, #{nxt['seq']} ran before the "
                    f"interrupted #{task_run['seq']}"
                )
            took = nxt["t"] - f["t"]
            takeovers[f["kind"]].append(took)
            # Redis expires leases on its wall clock: one restarted with its clock set back
            # keeps every lease that much longer, which no replica can shorten.
            allowed = bound + _clock_setback(run, f["t"] - run.lease_ttl, f["t"] + bound)
            if took > allowed:
                finding.breaches.append(
                    f"{q}: takeover after {f['kind']} of {f['target']} took {took:.2f}s > {allowed:.2f}s"
                )
    every = [t for ts in takeovers.values() for t in ts]
    finding.figures = {
        "faults_mid_task": mid_task,
        "interrupted": interrupted,
        "interrupted_rerun_first": rerun_first,
        "interrupted_rerun_delivery_raised": raised,
        "takeover_max": _max(every),
        "takeover_median": _median(every),
        "takeover_by_kind": {k: {"n": len(v), "max": _max(v), "median": _median(v)} for k, v in takeovers.items()},
        "takeover_bound": round(bound, 3),
    }
    return finding


def _clock_setback(run: RunFacts, since: float, until: float) -> float:
    """Seconds by which a Redis restart between ``since`` and ``until`` set Redis's clock back."""
    return max(
        (
            max(0, int(g.get("previous_shift_ms", 0)) - int(g.get("shift_ms", 0))) / 1000
            for g in run.faults
            if g["kind"] in ("clock", "redis-restart", "redis-crash") and since <= g["t"] <= until
        ),
        default=0.0,
    )


def _interrupted(run: RunFacts, f: Event, held: list[Event]) -> Iterator[tuple[Event, Event | None]]:
    """The runs of ``held`` that fault ``f`` interrupted, each with the next start on its queue
    under a newer lease (None: nothing ran after)."""
    for task_run in held:
        reruns = [
            e
            for e in run.executions.by_task[task_run["task_id"]]
            if e["event"] == "start" and e["fence"] > task_run["fence"]
        ]
        if not [e for e in reruns if e["t"] > f["t"]]:
            continue  # it finished and was acknowledged before the fault took hold
        # A stale holder's late start under an older lease is not a takeover.
        starts = run.executions.starts_by_queue[task_run["queue"]]
        yield task_run, next((e for e in starts if e["t"] > f["t"] and e["fence"] > task_run["fence"]), None)


def _rerun_after_unacknowledged(run: RunFacts, f: Event, task_run: Event) -> Event | None:
    """The interrupted run's task started again under a newer lease, if every start before it
    on its queue since fault ``f`` is a task that had ended on the same holder before ``f`` (its
    acknowledgement was on its way, as group acknowledgements allow); else None."""
    starts = run.executions.starts_by_queue[task_run["queue"]]
    for e in starts:
        if e["t"] <= f["t"] or e["fence"] <= task_run["fence"]:
            continue
        if e["task_id"] == task_run["task_id"]:
            return e
        ended_here = any(
            x["event"] == "end" and x["pid"] == task_run["pid"] and x["t"] <= f["t"]
            for x in run.executions.by_task[e["task_id"]]
        )
        if not ended_here:
            return None
    return None


def check_handoffs(run: RunFacts) -> Finding:
    """Each graceful stop of a rolling restart exits cleanly and hands its queues over at
    once: the next task of a queue it ran starts on another replica well within a lease TTL
    of the last one it finished."""
    finding = Finding()
    handoffs: list[float] = []
    for s in run.stops:
        if s["rc"] != 0:
            finding.breaches.append(f"graceful stop of {s['replica']} (pid {s['pid']}) ended with {s['rc']}")
        for q in {e["queue"] for e in run.executions.open_at(s["pid"], s["t"])}:
            finish = [t for t in run.executions.ends_by_pid_queue[(s["pid"], q)] if t >= s["t"]]
            if not finish:
                continue
            starts = run.executions.starts_by_queue[q]
            nxt = next((e for e in starts if e["t"] > finish[0] and e["pid"] != s["pid"]), None)
            if nxt is None or run.accepted.at.get((q, nxt["seq"]), float("inf")) > finish[0]:
                continue  # the queue had nothing more to hand over
            handoffs.append(nxt["t"] - finish[0])
    if handoffs and max(handoffs) >= run.lease_ttl:
        finding.breaches.append(f"a graceful hand-off took {max(handoffs):.2f}s, as long as a lease TTL: no hand-off")
    finding.figures = {"handoff_max": _max(handoffs), "handoff_median": _median(handoffs)}
    return finding


def check_redis_restarts(run: RunFacts) -> Finding:
    """A Redis restart loses no task and no acknowledged write when graceful or under
    appendfsync=always; also times the first task after each restart."""
    resumes: list[float] = []
    for f, _ in run.redis_restarts:
        starts = run.executions.starts_by_queue.values()
        nxt = min((e["t"] for es in starts for e in es if e["t"] > f["t_end"]), default=None)
        if nxt is not None:
            resumes.append(nxt - f["t_end"])
    losses = [loss for _, loss in run.redis_restarts]
    finding = Finding(figures={"redis_resume_max": _max(resumes), "redis_losses": losses})
    for r in losses:
        if r["appendfsync"] == "always" and (r["lost_tasks"] or r["acknowledged_writes_lost"]):
            finding.breaches.append(f"Redis {r['kind']} with appendfsync=always lost {r}")
        if r["kind"] in ("redis-restart", "clock") and (r["lost_tasks"] or r["acknowledged_writes_lost"]):
            finding.breaches.append(f"a graceful Redis restart lost {r}")
    return finding


def check_fencing_order(run: RunFacts) -> Finding:
    """Fencing tokens in start order, per queue: a start under a lower token than one already
    started means work began on a lapsed lease (a reply that came too late, a stop that let
    the lease go) or the token went backwards (a Redis clock set back). Only a process freeze
    excuses it, and only a Redis restart that lost writes (the counter with them) resets the
    comparison: then only Redis's clock keeps the token rising, which is the documented limit."""
    counter_losses = [f["t_down"] for f, r in run.redis_restarts if r["lost_tasks"] or r["acknowledged_writes_lost"]]
    stale_starts: list[tuple[Event, Event]] = []
    after_a_pause = 0
    for q_starts in run.executions.starts_by_queue.values():
        top: Event | None = None
        for e in q_starts:
            if top is not None and any(top["t"] < t <= e["t"] for t in counter_losses):
                top = None
            if top is None or e["fence"] >= top["fence"]:
                top = e
            elif run.paused(e["pid"], e["t"]):
                after_a_pause += 1
            else:
                stale_starts.append((top, e))
    finding = Finding(figures={"stale_starts": len(stale_starts), "stale_starts_after_a_pause": after_a_pause})
    if stale_starts:
        top, e = stale_starts[0]
        finding.breaches.append(
            f"{len(stale_starts)} task starts under a fencing token lower than one already started on their "
            f"queue (a task started on a lapsed lease, or the token went backwards), e.g. {e['queue']} #{e['seq']} "
            f"on {e['replica']} at {e['t']:.3f} (fence {e['fence']}) after #{top['seq']} on {top['replica']} "
            f"at {top['t']:.3f} (fence {top['fence']})"
        )
    return finding


def check_async_stop(run: RunFacts) -> Finding:
    """After an asyncio worker's stop timed out in a live process (the ``async-stop`` drill),
    no other replica starts on the queue while the task it left running in a thread runs."""
    drills = [f for f in run.faults if f["kind"] == "async-stop"]
    finding = Finding(figures={"async_stop_drills": len(drills)})
    for f in drills:
        for a in run.executions.open_at(f["pid"], f["t"]):
            until = min(run.executions.ends.get((a["pid"], a["task_id"], a["attempt"]), f["t_exit"]), f["t_exit"])
            starts = run.executions.starts_by_queue[a["queue"]]
            b = next((e for e in starts if f["t"] < e["t"] < until and e["pid"] != a["pid"]), {})
            if b and not _lease_lost_to_another_fault(run, f, a, b):
                finding.breaches.append(
                    f"{a['queue']}: #{b['seq']} started on {b['replica']} (fence {b['fence']}) {until - b['t']:.2f}s "
                    f"before #{a['seq']} ended on {f['target']}, whose asyncio worker was stopped with a "
                    f"{STOP_DRILL_TIMEOUT}s timeout while that task ran in a thread of the live process "
                    f"(fence {a['fence']}): the lease was given up under a running task"
                )
    return finding


#: Faults after which a replica's lease may lapse under a running task: an overlap they explain
#: is judged by the overlap checks, not blamed on an asyncio stop that happened meanwhile.
LEASE_LOSING = frozenset(
    {"blackhole", "cut", "stop", "delay", "slow-reply", "kill", "redis-restart", "redis-crash", "clock"}
)


def _lease_lost_to_another_fault(run: RunFacts, drill: Event, a: Event, b: Event) -> bool:
    return any(
        g is not drill
        and g["kind"] in LEASE_LOSING
        and g.get("pid") in (None, a["pid"])
        and g["t"] <= b["t"]
        and g.get("t_end", g["t"]) >= a["t"] - run.lease_ttl
        for g in run.faults
    )


def check_vandal_entries(run: RunFacts) -> Finding:
    """Each vandal entry is dead-lettered as ``undecodable`` with its raw bytes, and its queue
    goes on past it: the first task accepted behind it starts within the take-over bound."""
    vandals = [f for f in run.faults if f["kind"] == "vandal"]
    bound = run.takeover_bound
    finding = Finding()
    missing: list[str] = []
    misfiled: list[str] = []
    stalls: list[float] = []
    for f in vandals:
        _file_vandal_entries(run, f, missing, misfiled)
        took = _vandal_stall(run, f)
        if took is None:
            continue
        stalls.append(took)
        if took > bound:
            finding.breaches.append(
                f"{f['target']}: the first task behind the vandal entries started {took:.2f}s after it was accepted "
                f"> {bound:.2f}s: the queue stalled on them"
            )
    if missing:
        finding.breaches.append(f"{len(missing)} vandal entries are not in the dead letters (lost), e.g. {missing[:2]}")
    if misfiled:
        finding.breaches.append(
            f"{len(misfiled)} vandal entries were dead-lettered but not as undecodable, e.g. {misfiled[:2]}"
        )
    finding.figures = {
        "vandal_entries": sum(len(f["entries"]) for f in vandals),
        "vandal_entries_lost": len(missing),
        "vandal_entries_misfiled": len(misfiled),
        "vandal_stall_max": _max(stalls),
    }
    return finding


def _file_vandal_entries(run: RunFacts, f: Event, missing: list[str], misfiled: list[str]) -> None:
    """Add the entries of vandal fault ``f`` that are not in the dead letters to ``missing``,
    and those dead-lettered under another reason to ``misfiled`` (none if not read)."""
    q = f["target"]
    for raw_hex in f["entries"] if run.dead_letters is not None else ():
        raw = bytes.fromhex(raw_hex)
        reasons = [d["reason"] for d in run.dead_letters or () if d["queue"] == q and raw in bytes.fromhex(d["raw"])]
        if not reasons:
            missing.append(f"{q}: {raw[:48]!r}")
        elif "undecodable" not in reasons:
            misfiled.append(f"{q}: {raw[:48]!r} as {reasons}")


def _vandal_stall(run: RunFacts, f: Event) -> float | None:
    """How long the first task accepted behind vandal fault ``f`` waited to start; None if no
    task came behind it or another fault may have slowed the queue meanwhile."""
    q = f["target"]
    behind = [e for e in run.accepted.exact.get(q, []) if e.get("sent", e["t"]) > f["t_end"]]
    first = behind[0] if behind else None
    start = next((e for e in run.executions.starts_by_queue[q] if first and e["seq"] == first["seq"]), None)
    if first is None or start is None:
        return None
    if any(g["kind"] != "vandal" and run.window(g)[0] <= start["t"] and run.window(g)[1] >= f["t"] for g in run.causes):
        return None
    took: float = start["t"] - max(f["t_end"], first["t"])
    return took


def check_gil_tasks(run: RunFacts) -> Finding:
    """A task that held the GIL past its lease ends dead-lettered for that, never counted as a
    consumer that died (``poison``)."""
    outcomes: dict[str, list[str]] = {}
    finding = Finding(figures={"gil_tasks_dead_lettered_as": outcomes})
    for f in run.faults:
        if f["kind"] != "gil" or run.dead_letters is None:
            continue
        reasons = [d["reason"] for d in run.dead_letters if d["queue"] == f["target"] and d.get("seq") == f["seq"]]
        outcomes[f"{f['target']} #{f['seq']}"] = reasons
        runs = sum(1 for e in run.executions.by_task[f["task_id"]] if e["event"] == "start")
        if not reasons:
            finding.breaches.append(
                f"{f['target']}: the task holding the GIL for {f['seconds']}s (#{f['seq']}, {runs} runs) did not end "
                f"dead-lettered for outliving its lease"
            )
        elif "poison" in reasons:
            finding.breaches.append(
                f"{f['target']}: the task holding the GIL for {f['seconds']}s (#{f['seq']}) ran {runs} times and was "
                f"dead-lettered as poison: a task that outlived its lease was counted as a consumer death"
            )
    return finding


def check_replica_exits(run: RunFacts) -> Finding:
    """No replica exits unless the runner ended it."""
    return Finding(
        [f"{e['replica']} (pid {e['pid']}) exited unexpectedly with {e['rc']}" for e in run.unexpected_exits]
    )


def check_drained(run: RunFacts) -> Finding:
    """Nothing is left pending or in flight when the run ends."""
    left = {q: n for q, n in (run.remaining or {}).items() if n}
    return Finding([f"queues not drained at the end: {left}"] if left else [])


#: Every checker, in the order the verdict lists their breaches.
CHECKERS: tuple[Callable[[RunFacts], Finding], ...] = (
    census,
    check_lost_tasks,
    check_first_execution_order,
    check_reexecutions,
    check_overlaps,
    check_takeovers,
    check_handoffs,
    check_redis_restarts,
    check_fencing_order,
    check_async_stop,
    check_vandal_entries,
    check_gil_tasks,
    check_replica_exits,
    check_drained,
)

#: The order of the figures in the verdict's stats (and ``verdict.json``), kept stable across
#: runs so that two verdicts compare line by line; a figure not listed here comes last.
STATS_ORDER = (
    "accepted", "accepted_place_unknown", "failed_enqueues", "producers", "producer_interleavings", "queues",
    "executions", "first_executions", "reexecutions", "reexecutions_by_cause", "reexecutions_unexplained",
    "retries_in_place", "lost", "lost_to_redis_durability", "dead_lettered", "order_violations",
    "overlaps_unexplained", "overlaps_explained_by_fencing", "faults", "faults_mid_task", "interrupted",
    "interrupted_rerun_first", "interrupted_rerun_delivery_raised", "takeover_max", "takeover_median",
    "takeover_by_kind", "takeover_bound", "handoff_max", "handoff_median", "redis_resume_max", "redis_losses",
    "lease_ttl", "stale_starts", "stale_starts_after_a_pause", "async_stop_drills", "vandal_entries",
    "vandal_entries_lost", "vandal_entries_misfiled", "vandal_stall_max", "gil_tasks_dead_lettered_as",
    "throughput_tasks_per_s", "span_s", "replica_log_counts",
)  # fmt: skip


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
    """Check one run's journals with every checker. ``dead``: sequence numbers found
    dead-lettered per queue; ``remaining``: tasks still pending or in flight per queue when
    the run ended; ``dead_letters``: every dead-letter record of the run's queues (``queue``,
    ``reason``, ``seq`` or None, ``raw`` in hex), which the vandal and GIL checks need."""
    run = RunFacts.read(
        run_dir,
        lease_ttl=lease_ttl,
        poll_interval=poll_interval,
        dead=dead,
        remaining=remaining,
        unexpected_exits=unexpected_exits,
        log_counts=log_counts,
        dead_letters=dead_letters,
    )
    findings = [checker(run) for checker in CHECKERS]
    figures = {key: value for finding in findings for key, value in finding.figures.items()}
    stats = {key: figures.pop(key) for key in STATS_ORDER if key in figures} | figures
    breaches = [breach for finding in findings for breach in finding.breaches]
    return Verdict(ok=not breaches, breaches=breaches, lines=_summary(run, stats), stats=stats)


def _summary(run: RunFacts, stats: dict[str, Any]) -> list[str]:
    """The verdict's report, line by line, from the checkers' figures."""
    s = stats
    lines = [
        f"producers: {s['producers']} processes, {s['accepted']} tasks accepted on {s['queues']} queues "
        f"({s['producer_interleavings']} producer switches in the acceptance order; {s['accepted_place_unknown']} "
        f"accepted on a retry, place unknown; {s['failed_enqueues']} enqueues given up)",
        "faults: "
        + (", ".join(f"{k}={v}" for k, v in sorted(s["faults"].items())) or "none")
        + f" ({s['faults_mid_task']} replica faults hit a task mid-run; {s['interrupted']} running tasks were "
        f"interrupted; {s['interrupted_rerun_first']} of them ran again first, "
        f"{s['interrupted_rerun_delivery_raised']} with a raised delivery count)",
        *run.report.lines(),
        f"lost tasks (every accepted task): {s['lost']}; lost to Redis AOF everysec in a crash: "
        f"{s['lost_to_redis_durability']}; dead-lettered: {s['dead_lettered']}",
        f"re-executions: {s['reexecutions']} ({s['reexecutions_by_cause']}), "
        f"unexplained: {s['reexecutions_unexplained']}",
        f"overlaps: {s['overlaps_unexplained']} unexplained, {s['overlaps_explained_by_fencing']} explained "
        f"by a lapsed lease with a lower fencing token ({run.overlaps.stale_late} of them a stale holder starting "
        "late)",
        f"takeover after kill/stop/cut/blackhole: max {s['takeover_max']}s, median {s['takeover_median']}s "
        f"(lease TTL {run.lease_ttl}s, bound {run.takeover_bound:.2f}s) {s['takeover_by_kind']}",
        f"graceful hand-off: max {s['handoff_max']}s, median {s['handoff_median']}s; "
        f"first task after a Redis restart: max {s['redis_resume_max']}s",
        _redis_restarts_line(s["redis_losses"]),
        f"fencing tokens: {s['stale_starts']} starts under a lower token than one already started on their "
        f"queue ({s['stale_starts_after_a_pause']} more right after a process freeze)",
        f"asyncio stop drills: {s['async_stop_drills']}; GIL-holding tasks dead-lettered as: "
        + (json.dumps(s["gil_tasks_dead_lettered_as"]) if s["gil_tasks_dead_lettered_as"] else "none"),
        f"vandal entries: {s['vandal_entries']} written, "
        + (
            f"{s['vandal_entries_lost']} lost, {s['vandal_entries_misfiled']} dead-lettered under another reason"
            if run.dead_letters is not None
            else "dead letters not read"
        )
        + f"; slowest queue past them: {s['vandal_stall_max']}s",
        f"throughput: {s['throughput_tasks_per_s']} tasks/s over {s['span_s']}s ({s['executions']} executions)",
    ]
    if run.log_counts:
        lines.append("replica logs: " + ", ".join(f"{k}={v}" for k, v in sorted(run.log_counts.items())))
    return lines


def _redis_restarts_line(losses: list[Event]) -> str:
    """Per kind of restart and appendfsync policy: how many, and the tasks and acknowledged
    writes they lost."""
    summary: dict[tuple[str, str], tuple[int, int, int]] = {}
    for r in losses:
        n, lost, writes = summary.get((r["kind"], r["appendfsync"]), (0, 0, 0))
        summary[(r["kind"], r["appendfsync"])] = (n + 1, lost + r["lost_tasks"], writes + r["acknowledged_writes_lost"])
    return "Redis restarts: " + (
        "; ".join(
            f"{n}x {kind} (appendfsync={mode}): {lost_n} tasks and {writes} acknowledged writes lost"
            for (kind, mode), (n, lost_n, writes) in sorted(summary.items())
        )
        or "none"
    )


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
    """One scenario run: its verdict, where its journals and logs are, and how long it took."""

    verdict: Verdict
    run_dir: Path
    profile: Profile
    wall_s: float


class Scenario:
    """One scenario run, step by step: start Redis and the fault proxies, the fleet and the
    producers, wait for work, inject the faults, stop the producers, drain, collect what only
    Redis and the fleet know, tear everything down, and judge the journals (``run`` does all)."""

    # Set by the steps that start them.
    observer: RedisQueueBackend
    tail: JournalTail
    injector: Injector

    def __init__(
        self,
        profile: Profile,
        *,
        redis_url: str | None = None,
        aof: str = "both",
        run_dir: Path | None = None,
        seed: int | None = None,
        driver: str | None = None,
        kinds: Sequence[str] | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.started = time.monotonic()
        if kinds and profile.schedule is not None and not set(kinds) & set(profile.schedule):
            # A fixed schedule without any of the kinds asked for: each of them once instead.
            profile = replace(profile, schedule=tuple(kinds), max_faults=max(profile.max_faults, len(kinds)))
        self.profile = profile
        #: Someone else's Redis, or None: the run starts its own (and may restart it as a fault).
        self.redis_url = redis_url
        self.url = redis_url or ""
        self.kinds = kinds
        self.echo = echo
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="pyfiq-scenario-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        self.rng = random.Random(seed)
        self.aof_modes = ["everysec", "always"] if aof == "both" else [aof]
        self.queues = queue_names(profile.queues)
        self.prefix = f"scenario-{uuid.uuid4().hex[:8]}"
        self.journal = self.run_dir / EXECUTIONS
        self.names = [f"replica-{i + 1}" for i in range(profile.replicas)]
        driver = driver or profile.driver
        self.drivers = ["threaded", "asyncio"] if driver == "mixed" else [driver]
        self.stack = contextlib.ExitStack()
        self.redis_proc: RedisProcess | None = None
        self.proxies: dict[str, FaultProxy] = {}
        self.db = "/0"
        self.env = self._replica_env()
        self.fleet = Fleet(self._replica_argv, self.env, self.run_dir / "logs")
        self.producers: list[subprocess.Popen[bytes]] = []
        # What the run found, for the checker.
        self.producer_failures: list[str] = []
        self.remaining: dict[str, int] = {}
        self.dead_letters: list[Event] = []
        self.log_counts: dict[str, int] = {}
        self.unexpected: list[Event] = []

    def run(self) -> Result:
        """Every step in order; whatever was started is torn down even if a step fails."""
        try:
            self.start_redis()
            self.start_proxies()
            self.start_fleet()
            self.start_producers()
            self.wait_for_work()
            self.inject_faults()
            self.stop_producers()
            self.drain()
            self.collect()
        finally:
            self.tear_down()
        return self.judge()

    def start_redis(self) -> None:
        """Start the run's own redis-server (AOF), unless it was given one."""
        if self.redis_url is None:
            self.redis_proc = RedisProcess(self.run_dir / "redis", appendfsync=self.aof_modes[0]).start()
            self.stack.callback(self.redis_proc.stop, kill=True)
            self.url = self.redis_proc.url

    def start_proxies(self) -> None:
        """Put a fault proxy between each replica and Redis, if Redis is on loopback (else no
        network faults)."""
        parsed = urlparse(self.url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        try:
            require_loopback(host)
            loopback = parsed.scheme == "redis"
        except ValueError:
            loopback = False
        if loopback:
            for name in self.names:
                self.proxies[name] = FaultProxy(port, host).start()
                self.stack.callback(self.proxies[name].close)
        self.db = parsed.path or "/0"

    def driver_of(self, name: str) -> str:
        """``threaded`` or ``asyncio``: the profile's mix, replica by replica."""
        return self.drivers[self.names.index(name) % len(self.drivers)]

    def ack_mode_of(self, name: str) -> str:
        """Acknowledgement modes alternate after each round of drivers, so that a fleet of
        four mixed replicas runs every driver with both ``group`` and ``inline``."""
        return ("group", "inline")[self.names.index(name) // len(self.drivers) % 2]

    def _replica_argv(self, name: str) -> list[str]:
        url = f"redis://127.0.0.1:{self.proxies[name].port}{self.db}" if name in self.proxies else self.url
        p = self.profile
        return replica_argv(
            url,
            prefix=self.prefix,
            shards=p.shards,
            queues=self.queues,
            lease_ttl=p.lease_ttl,
            poll_interval=p.poll_interval,
            max_deliveries=p.max_deliveries,
            concurrency=p.concurrency,
            driver=self.driver_of(name),
            name=name,
            ack_mode=self.ack_mode_of(name),
        )

    def _replica_env(self) -> dict[str, str]:
        """The environment of replicas and producers: the journal, the drills, unbuffered logs."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYFIQ_ECHO",)}
        env[JOURNAL_ENV] = str(self.journal)
        env[DRILL_ENV] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        extra = [q for q in self.queues if q not in QUEUES]
        if extra:
            env[EXTRA_QUEUES_ENV] = ",".join(extra)
        return env

    def start_fleet(self) -> None:
        """Start every replica and wait until each is ready; also the runner's own client (the
        faults that write to Redis, the drain, the dead letters)."""
        p = self.profile
        self.stack.callback(self.fleet.close)
        self.observer = RedisQueueBackend(
            self.url,
            Settings(prefix=self.prefix, shards=p.shards, lease_ttl=p.lease_ttl, poll_interval=p.poll_interval),
        )
        self.stack.callback(self.observer.close)
        self.echo(
            f"run {self.prefix} in {self.run_dir}: {p.replicas} replicas ({'/'.join(self.drivers)}, "
            f"acknowledging {'/'.join(sorted({self.ack_mode_of(n) for n in self.names}))}), "
            f"{len(self.queues)} queues, {p.producers} producers, lease TTL {p.lease_ttl}s, redis {self.url}"
            + ("" if self.proxies else " (no network faults: Redis is not on loopback)")
        )
        for name in self.names:
            self.fleet.spawn(name)
        self.fleet.wait_ready(self.names)

    def start_producers(self) -> None:
        """Start the producer processes (the compose ``producer`` command), each with its log."""
        p = self.profile
        for i in range(p.producers):
            argv = producer_argv(
                self.url,
                prefix=self.prefix,
                shards=p.shards,
                queues=self.queues,
                count=10**7,
                rate=p.rate,
                hold=p.hold,
                journal_dir=self.run_dir,
                max_seconds=p.duration + 30,
                fail_every=p.fail_every,
            )
            with open(self.run_dir / "logs" / f"producer-{i}.log", "wb") as out:
                self.producers.append(popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT))
        self.stack.callback(self._kill_producers)

    def _kill_producers(self) -> None:
        for proc in self.producers:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def wait_for_work(self) -> None:
        """Wait until the fleet has done some work on every queue, so faults hit a busy fleet."""
        self.tail = JournalTail(self.journal)
        deadline = time.monotonic() + 20
        while self.tail.ends < 10 * len(self.queues):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no work got done; see {self.run_dir}/logs")
            time.sleep(0.05)
            self.tail.poll()

    def inject_faults(self) -> None:
        """Inject the profile's faults (those this setup can inject) until its bounds."""
        p = self.profile
        self.injector = Injector(
            profile=p,
            fleet=self.fleet,
            names=self.names,
            proxies=self.proxies,
            redis_proc=self.redis_proc,
            aof_modes=self.aof_modes,
            tail=self.tail,
            faults_path=self.run_dir / FAULTS,
            rng=self.rng,
            echo=self.echo,
            backend=self.observer,
            queues=self.queues,
            drivers={name: self.driver_of(name) for name in self.names},
        )
        if self.kinds:
            wanted = self.injector.available(self.kinds)
        elif p.schedule is not None:
            wanted = self.injector.available(dict.fromkeys(p.schedule))
        else:  # the random mix: the kinds the profile weighs
            wanted = self.injector.available(k for k, w in p.weights if w > 0)
        if p.schedule is not None:
            self.echo(f"faults: fixed schedule {', '.join(k for k in p.schedule if k in wanted)}")
        else:
            self.echo(f"faults: random, of {', '.join(wanted)}")
        self.injector.run(wanted, time.time() + p.duration)
        self.echo(f"injected: {dict(self.injector.done)}")

    def stop_producers(self) -> None:
        """Stop the producers gracefully (SIGTERM ends the loop after the current enqueue); one
        that does not end cleanly is a breach."""
        for proc in self.producers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for i, proc in enumerate(self.producers):
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = None
            if rc != 0:
                log = (self.run_dir / "logs" / f"producer-{i}.log").read_text(errors="replace")[-1500:]
                self.producer_failures.append(f"producer {i} ended with {rc}: {log}")

    def drain(self) -> None:
        """Wait until the queues are empty, then stop every replica gracefully, which hands
        every lease over."""
        self.remaining = _wait_drained(self.observer, self.queues, self.profile.drain_timeout, self.fleet)
        self.fleet.reap()
        for name in self.names:
            if self.fleet.alive(name):
                self.fleet.terminate(name, timeout=15)

    def collect(self) -> None:
        """Keep what only Redis and the fleet know (dead letters, log markers, unexpected
        exits), and leave nothing of the run in a Redis that is not the run's own."""
        self.dead_letters = read_dead_letters(self.observer, self.queues)
        (self.run_dir / DEAD_LETTERS).write_text("".join(json.dumps(d) + "\n" for d in self.dead_letters))
        self.log_counts = self.fleet.log_counts()
        self.unexpected = list(self.fleet.unexpected)
        if self.redis_url is not None:
            with contextlib.suppress(redis.RedisError):
                keys = list(self.observer.client.scan_iter(match=f"{self.prefix}:*", count=1000))
                for i in range(0, len(keys), 500):
                    self.observer.client.delete(*keys[i : i + 500])

    def tear_down(self) -> None:
        """End whatever the steps started, last started first: producers, the runner's client,
        replicas, proxies, Redis."""
        self.stack.close()

    def judge(self) -> Result:
        """Check the journals (``verify``), add what only the runner saw (faults it could not
        inject, producers that failed), and write ``verdict.json``."""
        verdict = verify(
            self.run_dir,
            lease_ttl=self.profile.lease_ttl,
            poll_interval=self.profile.poll_interval,
            remaining=self.remaining,
            unexpected_exits=self.unexpected,
            log_counts=self.log_counts,
            dead_letters=self.dead_letters,
        )
        verdict.breaches += [f"fault injection failed: {msg}" for msg in self.injector.errors]
        verdict.breaches += self.producer_failures
        verdict.ok = not verdict.breaches
        verdict.stats["wall_s"] = round(time.monotonic() - self.started, 1)
        verdict.lines.append(f"wall time: {verdict.stats['wall_s']}s; journals and logs: {self.run_dir}")
        (self.run_dir / "verdict.json").write_text(
            json.dumps({"ok": verdict.ok, "breaches": verdict.breaches, "stats": verdict.stats}, indent=2, default=str)
        )
        return Result(verdict, self.run_dir, self.profile, time.monotonic() - self.started)


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
    scenario = Scenario(
        profile, redis_url=redis_url, aof=aof, run_dir=run_dir, seed=seed, driver=driver, kinds=kinds, echo=echo
    )
    return scenario.run()


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
    """Exit 0 if Redis answers PING (and process PID is a live pyfiq worker): a healthcheck."""
    if pid is not None:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            click.echo(f"no process {pid}", err=True)
            sys.exit(1)
        if b"pyfiq" not in argv or b"worker" not in argv:
            click.echo(f"process {pid} is not a pyfiq worker: {argv!r}", err=True)
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
