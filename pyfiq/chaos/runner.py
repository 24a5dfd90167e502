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
An operator's actions against a holder with tasks taken ahead: a skip of the head it runs
(``skip``), a pause and a later resume (``pause``), dead letters requeued to the front of a
stream, in one step or in pages (``requeue-front``); and a worker stopped with a short timeout
mid-task, followed by a SIGKILL of another replica (``stop-kill``).

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

from ..backend.backend import REQUEUE_STEP, RedisQueueBackend
from ..backend.halts import MARGIN_SECONDS as PAUSE_MARGIN
from ..config import GROUP_PREFETCH, Settings
from ..engine.keys import queue_of, stream_name
from ..engine.protocol import ScriptCalls
from ..engine.scheduler import poll_owners
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
    step_name,
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
#: An operator's actions against a live holder with tasks taken ahead (``backend.skip``,
#: ``pause``/``resume``, ``requeue_dead_letters(front=True)``), each on a queue of its own.
OPERATOR_FAULTS = ("skip", "pause", "requeue-front")
#: Faults that pick their own target: a queue (``vandal``, the operator's) or whichever replica
#: runs the task they enqueue (``async-stop``, ``gil``, ``stop-kill``).
TASK_FAULTS = ("vandal", "async-stop", "gil", "stop-kill", *OPERATOR_FAULTS)
FAULT_KINDS = (*REPLICA_FAULTS, *REDIS_FAULTS, *TASK_FAULTS, "rolling-restart")
#: Faults after which another replica must take the victim's queues over (lease lapse);
#: ``stop-kill`` is a SIGKILL right after another replica's stop timed out.
TAKEOVER_FAULTS = ("kill", "stop", "cut", "blackhole", "stop-kill")
#: Whole-process freezes (SIGSTOP; a task holding the GIL, derived from the journal): the one
#: excuse for starting a task on a lease that lapsed meanwhile, since no check made before the
#: freeze can see it coming.
PAUSE_FAULTS = ("stop", "gil-hold")
#: Faults that can explain a lost lease or acknowledgement (hence a re-execution).
EXPLAINING_FAULTS = (*REPLICA_FAULTS, *REDIS_FAULTS, "async-stop", "gil-hold", "stop-kill")
#: How far back each ``clock`` fault sets Redis's wall clock (they alternate with a true clock).
CLOCK_LAG_MS = -3000
#: Slack on top of lease TTL + poll interval for a takeover on a busy 2-core machine.
TAKEOVER_SLACK = 2.0
#: Window of writes before a Redis crash that appendfsync=everysec may lose (Redis docs: 1 s,
#: up to 2 s when a background fsync is slow).
EVERYSEC_WINDOW = 2.0
#: Producer name of the tasks the injector enqueues for its own faults.
INJECTOR = "injector"
#: Long tasks a ``stop-kill`` places, at most, until one runs on a replica with a share of the
#: safety poll: the fleet picks who runs a task, and in runs of the drill about half did.
LONG_TASK_ATTEMPTS = 10


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
        # The GIL drill too: each one freezes a replica for 2.5 TTLs, so it stays rare. A paged
        # requeue fills and empties 500+ dead letters: rarer than the other operator actions.
        weights=(
            *Profile.weights,
            ("gil", 0.05),
            ("skip", 0.3),
            ("pause", 0.3),
            ("requeue-front", 0.15),
            ("stop-kill", 0.2),
        ),
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
        # Each operator action against a holder with tasks taken ahead (a skip whose head ends
        # at once and one whose head runs on, a requeue in one step and one in pages: the
        # injector alternates them), then a worker stop that times out and a SIGKILL elsewhere.
        # Queues on every shard, so that the stop finds one on a shard the stopped replica
        # polled, with a few to spare while it looks for a replica with such a share.
        "operator": _drill(
            "operator", 6, queues=6, schedule=("skip", "skip", "pause", "requeue-front", "requeue-front", "stop-kill")
        ),
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
    name: str | None = None,
) -> Event:
    """Enqueue ``pyfiq.chaos.scenario.step(seq, **kwargs)`` on ``queue`` and return what Redis
    accepted, with its exact place in the acceptance order.

    One MULTI/EXEC runs INCR of the queue's acceptance counter, the pyfiq enqueue script and
    TIME, so (Redis time, counter) orders acceptances exactly across producers and across
    Redis restarts. A connection error leaves the outcome unknown: the enqueue is retried
    under a dedup key, and a retry that finds the first attempt accepted (``duplicate``)
    records an acceptance whose place is unknown. ``name``: the task's registered name
    (default: the queue's step).
    """
    (line,) = enqueue_stamped_many(backend, queue, [(seq, kwargs, task_id)], give_up_at=give_up_at, name=name)
    return line


def enqueue_stamped_many(
    backend: RedisQueueBackend,
    queue: str,
    tasks: Sequence[tuple[int, dict[str, Any], str | None]],
    *,
    give_up_at: float,
    name: str | None = None,
) -> list[Event]:
    """``enqueue_stamped`` of several (seq, kwargs, task id or None) in one MULTI/EXEC: they
    reach the queue together, so a holder that claims it finds them all (and takes them ahead)."""
    records = [
        (task_id or new_task_id(), TaskRecord(name or step_name(queue), [seq], dict(kwargs)))
        for seq, kwargs, task_id in tasks
    ]
    items = backend.encode(records)
    calls = [
        backend.ops.enqueue(queue, [item], [f"scenario-{seq}"]) for item, (seq, _, _) in zip(items, tasks, strict=True)
    ]
    counter = order_key(queue, backend.keys)
    sent = time.time()
    attempts = 0
    while True:
        attempts += 1
        try:
            pipe = backend.client.pipeline(transaction=True)
            for call in calls:
                pipe.incr(counter)
                backend.call(call, client=pipe)
            pipe.time()
            *replies, (sec, usec) = pipe.execute()
            break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.time() > give_up_at:
                return [
                    {"queue": queue, "seq": seq, "status": "failed", "attempts": attempts, "error": repr(exc)}
                    for seq, _, _ in tasks
                ]
            time.sleep(min(0.02 * 2**attempts, 0.5))
    lines = []
    for i, (call, (seq, _, _)) in enumerate(zip(calls, tasks, strict=True)):
        number, reply = replies[2 * i], replies[2 * i + 1]
        ((task_id, new),) = ScriptCalls.parse_enqueue(call, reply)
        lines.append(
            {
                "queue": queue,
                "seq": seq,
                "task_id": task_id,
                "status": "accepted" if new else "duplicate",
                "order": [int(sec) * 1_000_000 + int(usec), int(number)],
                "sent": sent,
                "t": time.time(),
                "attempts": attempts,
            }
        )
    return lines


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
        producers: Sequence[subprocess.Popen[bytes]] = (),
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
        #: The producer processes, which ``stop-kill`` holds still for a moment.
        self.producers = producers
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
        #: Queues a fault is working on (its tasks, its dead letters, its pause): one at a time,
        #: so that one fault's dead letters or pause never meet another's rules.
        self.queues_busy: set[str] = set()
        #: Keyed streams the faults created, for the drain.
        self.streams: list[str] = []
        self._requeues = 0
        self._skips = 0

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

    def _claim(self, pid: int) -> str | None:
        """The live replica of ``pid``, marked busy; None if it is gone or in another fault."""
        with self._lock:
            name = self.fleet.live_pids().get(pid)
            if name is None or name in self.gate.busy:
                return None
            self.gate.busy.add(name)
            return name

    def _take_queue(self, among: Iterable[str] | None = None, wait: float = 30.0) -> str:
        """A queue no other fault works on (among ``among``, default all), marked busy."""
        candidates = list(self.queues if among is None else among)
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                free = [q for q in candidates if q not in self.queues_busy]
                if free:
                    queue = self.rng.choice(free)
                    self.queues_busy.add(queue)
                    return queue
            if time.monotonic() > deadline:
                raise RuntimeError(f"no queue free for the fault among {candidates}")
            time.sleep(0.05)

    def _free_queues(self, *queues: str) -> None:
        with self._lock:
            self.queues_busy.difference_update(queues)

    @contextlib.contextmanager
    def _operator(self) -> Iterator[RedisQueueBackend]:
        """A client of the operator's own for one action. The runner's shared one may hold idle
        connections that a Redis restart has closed since, and a script call sent on one fails
        once (``Connection closed by server``) instead of reconnecting: a fault of the
        runner's instrument, not of what it tests."""
        assert self.backend is not None
        backend = RedisQueueBackend(self.backend.url, self.backend.settings)
        try:
            yield backend
        finally:
            backend.close()

    def _release_file(self) -> Path:
        """A path that does not exist yet: a task given it as ``until`` holds until it does."""
        return self.path.parent / f"release-{uuid.uuid4().hex[:8]}"

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
        return self._enqueue_burst(queue, [kwargs])[0]

    def _enqueue_burst(self, stream: str, kwargs: Sequence[dict[str, Any]], *, fragile: bool = False) -> list[Event]:
        """Enqueue fault tasks on ``stream`` in one transaction (``fragile``: the step without
        retries), journaled like any producer's acceptances: a holder claiming the stream
        finds them all, and takes them ahead."""
        assert self.backend is not None
        tasks = [(next(self._seq), dict(kw), new_task_id()) for kw in kwargs]
        with self._tail_lock:  # watched before they can start, so no line of them is missed
            for _, _, task_id in tasks:
                self.tail.watch(task_id)
        name = step_name(queue_of(stream), fragile=fragile)
        lines = enqueue_stamped_many(self.backend, stream, tasks, give_up_at=time.time() + 30, name=name)
        for line in lines:
            line["producer"] = INJECTOR
            append_line(self.path.parent / f"accepted-{INJECTOR}.jsonl", line)
        failed = [line for line in lines if line["status"] == "failed"]
        if failed:
            raise RuntimeError(f"could not enqueue the fault's tasks on {stream}: {failed[0].get('error')}")
        return lines

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
        queue = self._take_queue()
        try:
            self._write_vandal_entries(queue)
        finally:
            self._free_queues(queue)

    def _write_vandal_entries(self, queue: str) -> None:
        assert self.backend is not None
        record = TaskRecord(step_name(queue), [-1], {"hold": self.p.hold})
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
            queue = self._take_queue()
            line = self._enqueue_task(queue, {"hold": hold})
            start = self._wait_line(line["task_id"], "start", timeout=15)
            if start is None:
                self._free_queues(queue)
                continue
            with self._lock:
                name = self.fleet.live_pids().get(start["pid"])
                if name in asyncio_replicas and name not in self.gate.busy:
                    self.gate.busy.add(name)
                    break
            self._wait_line(line["task_id"], "end", timeout=hold + 5 * self.p.lease_ttl)
            self._free_queues(queue)
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
            self._free_queues(queue)

    def _gil(self) -> None:
        """Enqueue a task that holds the GIL for 2.5 lease TTLs: its replica's heartbeat cannot
        run, the lease lapses under it, and the task must end dead-lettered for outliving its
        lease, not re-run on every take-over until it counts as poison."""
        seconds = round(self.p.lease_ttl * 2.5, 3)
        queue = self._take_queue()
        try:
            line = self._enqueue_task(queue, {"gil": seconds})
            event: Event = {"kind": "gil", "target": queue, "t": time.time(), "seconds": seconds}
            event |= {"seq": line["seq"], "task_id": line["task_id"]}
            if self._wait_line(line["task_id"], "start", timeout=15) is None:
                self.echo(f"  ! gil: the task on {queue} did not start within 15 s")
            # Let the take-overs it causes play out before the next fault.
            time.sleep(seconds + self.p.lease_ttl + self.p.poll_interval)
            event["t_end"] = time.time()
            self.record(event)
        finally:
            self._free_queues(queue)

    # -- an operator's actions, and a stop that times out --

    def _skip(self) -> None:
        """Skip the head of a stream while its holder runs it, tasks it took ahead queued behind:
        the skip must dead-letter the task the holder runs, the stream must move on at once
        (the skipped execution runs on, its result no longer counts), and the tasks taken ahead
        must run once each, in order, never two at once. Every other skip lets the head end
        right after it, before the holder's next renewal, with the tasks it took ahead still in
        its hands; the others hold the head until the tasks behind it have run elsewhere."""
        assert self.backend is not None
        self._skips += 1
        early = self._skips % 2 == 1
        queue = self._take_queue()
        release = self._release_file()
        holder: str | None = None
        try:
            # One transaction: whoever claims the stream takes the tasks behind the head at once.
            head, *behind = self._enqueue_burst(queue, [{"hold": 60.0, "until": str(release)}] + [{"hold": 0.05}] * 6)
            start = self._wait_line(head["task_id"], "start", timeout=15)
            holder = self._claim(start["pid"]) if start else None
            if start is None or holder is None:
                self.echo(f"  ! skip: the head on {queue} did not start on a replica free of other faults; skipped")
                return
            # Its renewals name the task it runs, which is what a skip dead-letters.
            time.sleep(2 * self.p.lease_ttl / 5 + 0.1)
            event: Event = {"kind": "skip", "target": queue, "holder": holder, "pid": start["pid"]}
            event |= {"head_task_id": head["task_id"], "head_seq": head["seq"]}
            event["behind"] = [line["task_id"] for line in behind]
            with self._operator() as operator:
                event["t"] = time.time()
                event["skipped_task_id"] = operator.skip(queue, "scenario skip drill")
                event["t_returned"] = time.time()
            if early:
                time.sleep(self.rng.uniform(0.0, self.p.lease_ttl / 10))
            else:
                # Had the holder waited for the head to end (or for its lease to lapse), the
                # tasks behind would wait this long: the checker sees it.
                deadline = time.monotonic() + self.p.lease_ttl + self.p.poll_interval + TAKEOVER_SLACK
                for line in behind:
                    self._wait_line(line["task_id"], "end", max(0.0, deadline - time.monotonic()))
            event["t_release"] = time.time()
            release.touch()
            for line in behind:
                self._wait_line(line["task_id"], "end", timeout=15)
            self._wait_line(head["task_id"], "end", timeout=5)
            event["t_end"] = time.time()
            self.record(event)
        finally:
            release.touch()
            if holder is not None:
                self._release(holder)
            self._free_queues(queue)

    def _pause(self) -> None:
        """Pause a queue whose holder runs a burst of tasks, some taken ahead; resume it later.
        From the moment ``pause()`` returned until the resume, no task of the queue may start
        anywhere: what the holder took ahead goes back to the stream, in order."""
        assert self.backend is not None
        queue = self._take_queue()
        try:
            burst = self._enqueue_burst(queue, [{"hold": 0.15}] * 8)
            start = self._wait_line(burst[0]["task_id"], "start", timeout=15)
            event: Event = {"kind": "pause", "target": queue}
            if start is not None:
                event |= {"holder": start["replica"], "pid": start["pid"]}
            with self._operator() as operator:
                event["t"] = time.time()
                report = operator.pause(queue)
                event["t_returned"] = time.time()
                event |= {"confirmed": report.confirmed, "ended": report.ended, "unconfirmed": report.unconfirmed}
                # Several of the burst's tasks' time: one taken ahead and not handed back would
                # start meanwhile.
                time.sleep(max(1.0, self.p.lease_ttl))
                event["t_resume"] = time.time()
                operator.resume(queue)
            for line in burst:
                self._wait_line(line["task_id"], "end", timeout=15)
            event["t_end"] = time.time()
            self.record(event)
        finally:
            with contextlib.suppress(redis.RedisError), self._operator() as operator:
                operator.resume(queue)  # never leave the queue paused
            self._free_queues(queue)

    def _requeue_front(self) -> None:
        """Fill a fresh keyed stream's dead letters, then requeue them to the front while its
        holder runs a backlog, some of it taken ahead: they must run again in their original
        order, all before the backlog that was still pending. Every other requeue moves more
        than one page (``REQUEUE_STEP``), which halts the stream while it moves them."""
        assert self.backend is not None
        self._requeues += 1
        count = self.rng.randint(5, 20) + (REQUEUE_STEP if self._requeues % 2 == 0 else 0)
        queue = self._take_queue()
        stream = stream_name(queue, f"requeue-{uuid.uuid4().hex[:8]}")
        self.streams.append(stream)
        succeed = self.path.parent / f"succeed-{uuid.uuid4().hex[:8]}"
        try:
            failing = self._enqueue_burst(stream, [{"fail_unless": str(succeed)}] * count, fragile=True)
            deadline = time.monotonic() + 30 + count * 0.05
            while (dead := int(self.backend.queue_info(stream)["dead"])) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {dead} of the {count} failing tasks on {stream} were dead-lettered")
                time.sleep(0.05)
            succeed.touch()
            # More than any holder takes ahead, so that some of it is still pending at the
            # requeue; short tasks, so that the holder takes more all the while.
            backlog = self._enqueue_burst(stream, [{"hold": 0.002}] * (4 * GROUP_PREFETCH))
            if self._wait_line(backlog[0]["task_id"], "start", timeout=15) is None:
                raise RuntimeError(f"the backlog on {stream} did not start within 15 s")
            event: Event = {"kind": "requeue-front", "target": stream, "count": count}
            event["task_ids"] = [line["task_id"] for line in failing]
            with self._operator() as operator:
                event["t"] = time.time()
                event["moved"] = operator.requeue_dead_letters(stream, front=True)
                event["t_returned"] = time.time()
            for line in [*failing, *backlog]:
                self._wait_line(line["task_id"], "end", timeout=max(0.0, event["t_returned"] + 30 - time.time()))
            event["t_end"] = time.time()
            self.record(event)
        finally:
            succeed.touch()
            self._free_queues(queue)

    def _stop_kill(self) -> None:
        """Stop one replica's worker with ``stop(timeout=STOP_DRILL_TIMEOUT)`` while a long task
        runs (the process lives on, renewing that task's lease, dispatching nothing), then
        SIGKILL another replica mid-task on a queue whose shard the stopped one polled: that
        queue must still be taken over within the lease TTL plus a poll interval (plus slack)."""
        assert self.backend is not None
        holds: list[Path] = []
        queues: list[str] = []
        claimed: list[str] = []
        try:
            found = self._long_task_on_a_poller(holds, queues, claimed)
            if found is None:
                self.echo("  ! stop-kill: no replica free of other faults picked up the long task; skipped")
                return
            stopped, long_line, polled, attempts = found
            hold_long = holds[-1]
            stop: Event = {"replica": stopped, "pid": self.fleet.procs[stopped].pid, "t": time.time()}
            stop |= {"queue": long_line["queue"], "seq": long_line["seq"], "task_id": long_line["task_id"]}
            self.fleet.signal(stopped, signal.SIGUSR1)
            said = self._wait_log(stop["pid"], f"stop_drill replica={stopped} ", timeout=5)
            stop |= {"t_stopped": time.time(), "clean": None if said is None else "clean=True" in said}
            try:
                queue = self._take_queue(polled, wait=1.0) if polled else self._take_queue()
            except RuntimeError:  # taken meanwhile by a fault of the other lane
                queue = self._take_queue()
            queues.append(queue)
            victim = self._victim_task(queue, stopped, holds, claimed)
            if victim is None:
                raise RuntimeError(f"no replica but the stopped one ran the victim's task on {queue}")
            name, line = victim
            event = self._base("stop-kill", name, True)
            event |= {"queue": queue, "seq": line["seq"], "task_id": line["task_id"]}
            event |= {"polled_by_stopped": queue in polled, "attempts": attempts, "stopped": stop}
            bound = self.p.lease_ttl + self.p.poll_interval + TAKEOVER_SLACK
            # Every enqueue wakes the idle replicas to look at its shard, which finds a lapsed
            # lease whoever polls the shard: only a quiet shard shows one that nobody polls.
            # The killed replica starts again only after the take-over, since a fresh replica
            # looks at every shard until it has a view of the pollers.
            with self._producers_still():
                self.fleet.kill(name)
                event["t"] = time.time()  # the moment it was certainly dead
                timeout = max(0.0, event["t"] + bound + 1 - time.time())
                again = self._wait_line(line["task_id"], "start", timeout, after=1)
            event["takeover_s"] = None if again is None else round(again["t"] - event["t"], 3)
            self.fleet.spawn(name)
            self.fleet.wait_ready([name])
            holds[-1].touch()
            # The long task ends, the stopped worker hands its queue over; the process lives on
            # for a while, as an application that stopped consuming would.
            hold_long.touch()
            self._wait_line(long_line["task_id"], "end", timeout=5)
            time.sleep(self.p.lease_ttl)
            stop["t_exit"] = time.time()
            stop["rc"], _ = self.fleet.terminate(stopped, timeout=15)
            self.fleet.spawn(stopped)
            self.fleet.wait_ready([stopped])
            event["t_end"] = time.time()
            self.record(event)
        finally:
            for hold in holds:
                hold.touch()
            for name in claimed:
                self._release(name)
            self._free_queues(*queues)

    def _long_task_on_a_poller(
        self, holds: list[Path], queues: list[str], claimed: list[str]
    ) -> tuple[str, Event, list[str], int] | None:
        """A long task (held until the last of ``holds`` exists) running on a replica free of
        other faults, preferably one whose share of the safety poll covers a free queue:
        (replica, the task's acceptance, the free queues on the shards it polls, attempts).
        Which replica claims a task is the fleet's choice, so it tries up to LONG_TASK_ATTEMPTS
        times; what it takes goes to ``holds``, ``queues`` and ``claimed``."""
        assert self.backend is not None
        # Long tasks that went to a replica with no share are left running a while: with both
        # its slots full, the next one goes to another replica.
        parked: list[tuple[Path, Event, str]] = []
        try:
            for attempt in range(LONG_TASK_ATTEMPTS):
                if len(parked) > 2:
                    self._unpark(parked)
                hold, queue = self._release_file(), self._take_queue()
                line = self._enqueue_task(queue, {"hold": 60.0, "until": str(hold)})
                start = self._wait_line(line["task_id"], "start", timeout=15)
                name = self._claim(start["pid"]) if start else None
                if name is not None:
                    shards = self._poll_share(name)
                    mine = {q for _, _, q in parked}
                    with self._lock:
                        free = [q for q in self.queues if q not in self.queues_busy or q in mine]
                    polled = [q for q in free if self.backend.keys.stream(q).shard in shards]
                    if polled or attempt == LONG_TASK_ATTEMPTS - 1:
                        holds.append(hold)
                        queues.append(queue)
                        claimed.append(name)
                        return name, line, polled, attempt + 1
                    self._release(name)
                parked.append((hold, line, queue))
            return None
        finally:
            self._unpark(parked)

    def _unpark(self, parked: list[tuple[Path, Event, str]]) -> None:
        """End the long tasks of ``parked`` (hold file, acceptance, queue) and free their queues."""
        for hold, _, _ in parked:
            hold.touch()
        for _, line, queue in parked:
            self._wait_line(line["task_id"], "end", timeout=5)
            self._free_queues(queue)
        parked.clear()

    def _poll_share(self, name: str) -> set[int]:
        """The shards replica ``name`` would poll among the replicas that Redis lists as pollers
        now: what nobody else polls as long as the fleet counts it among them."""
        assert self.backend is not None
        members = self.backend.client.zrange(self.backend.keys.pollers, 0, -1)
        pollers = {m.decode().partition("|")[2] for m in members} | {name}
        owners = poll_owners(sorted(pollers), self.backend.keys.shards)
        return {shard for shard, owner in enumerate(owners) if owner == name}

    def _victim_task(self, queue: str, stopped: str, holds: list[Path], claimed: list[str]) -> tuple[str, Event] | None:
        """A long task on ``queue`` (held until the last of ``holds`` exists) running on a
        replica other than ``stopped`` and free of other faults: (that replica, the task's
        acceptance)."""
        for _ in range(3):
            holds.append(self._release_file())
            line = self._enqueue_task(queue, {"hold": 60.0, "until": str(holds[-1])})
            start = self._wait_line(line["task_id"], "start", timeout=15)
            name = self._claim(start["pid"]) if start else None
            if name is not None and name != stopped:
                claimed.append(name)
                return name, line
            if name is not None:
                self._release(name)
            holds[-1].touch()
            if start is not None:
                self._wait_line(line["task_id"], "end", timeout=5)
        return None

    @contextlib.contextmanager
    def _producers_still(self) -> Iterator[None]:
        """The producer processes stopped (SIGSTOP) meanwhile: no enqueue wakes a replica."""
        live = [proc for proc in self.producers if proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for proc in live:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)

    def _wait_log(self, pid: int, needle: str, timeout: float) -> str | None:
        """The first line of process ``pid``'s log holding ``needle``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in self.fleet.log(pid).splitlines() if needle in line), None)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

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
    #: When each run, (pid, task id, attempt, start time), ended or failed (see ``end_of``).
    ends: dict[RunKey, float]
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
        ends = _run_ends(journal)
        return cls(journal, by_task, first_seen, starts_by_queue, ends_by_pid_queue, ends, _open_runs_at(journal))

    def end_of(self, start: Event) -> float | None:
        """When the run that ``start`` began ended or failed; None if its process died first."""
        return self.ends.get(_run_key(start))


#: One run of a task: (pid, task id, attempt, start time). A task can run more than once in
#: one process under one attempt number (taken over by a later lease of that process, requeued
#: from the dead letters), so the start time tells the runs apart.
RunKey = tuple[int, str, int, float]


def _run_key(start: Event) -> RunKey:
    return (start["pid"], start["task_id"], start["attempt"], start["t"])


def _run_ends(journal: Iterable[Event]) -> dict[RunKey, float]:
    """When each run ended or failed: the first end or fail line after its start, in its
    process, of that task and attempt."""
    open_: dict[tuple[int, str, int], Event] = {}
    ends: dict[RunKey, float] = {}
    for e in sorted(journal, key=lambda e: e["t"]):
        key = (e["pid"], e["task_id"], e["attempt"])
        if e["event"] == "start":
            open_[key] = e
        elif key in open_:
            ends[_run_key(open_.pop(key))] = e["t"]
    return ends


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
    def voided(self) -> dict[tuple[int, str], float]:
        """(pid, task id) -> when an operator's skip dead-lettered the task that process was
        running: from then on that execution no longer counts (the stream moves on while it
        runs, README "Operator actions and work taken ahead")."""
        return {
            (f["pid"], f["skipped_task_id"]): float(f["t"])
            for f in self.faults
            if f["kind"] == "skip" and f.get("skipped_task_id")
        }

    @cached_property
    def requeued_at(self) -> dict[str, list[float]]:
        """Task id -> when an operator requeued it from the dead letters."""
        out: dict[str, list[float]] = defaultdict(list)
        for f in self.faults:
            if f["kind"] == "requeue-front":
                for task_id in f["task_ids"]:
                    out[task_id].append(float(f["t"]))
        return out

    @cached_property
    def overlap_lines(self) -> list[Event]:
        """The journal as the overlap checks read it: a skipped execution ends at its skip."""
        if not self.voided:
            return self.executions.lines
        lines = []
        for e in self.executions.lines:
            skipped_at = self.voided.get((e["pid"], e["task_id"]))
            if skipped_at is not None and e["event"] != "start" and e["t"] > skipped_at:
                e = {**e, "t": skipped_at}
            lines.append(e)
        return lines

    @cached_property
    def report(self) -> Report:
        """Loss and order (``pyfiq.chaos.scenario.check``) over the tasks whose place is known."""
        exact_keys = {(q, s) for q, seqs in self.accepted.seqs.items() for s in seqs}
        journal = [e for e in self.overlap_lines if (e["queue"], e["seq"]) in exact_keys]
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
        every = check(self.overlap_lines, {})
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

    def restart_before(self, key: tuple[str, int]) -> Event | None:
        """The Redis restart that could have lost acceptance ``key``: the first one to take Redis
        down (``t_down``) after the producer had the acceptance back, within EVERYSEC_WINDOW.
        The fault's own start is recorded before its signal is sent, so an acceptance can come
        back after it and still be Redis's last write."""
        at = self.accepted.at.get(key)
        if at is None:
            return None
        downs = [(float(f["t_down"] if "t_down" in f else f["t"]), i, f) for i, f in enumerate(self.faults)]
        after = [d for d in downs if d[2]["kind"] in REDIS_FAULTS and d[0] >= at]
        if not after or min(after)[0] - at > EVERYSEC_WINDOW:
            return None
        return min(after)[2]

    @cached_property
    def redis_restarts(self) -> list[tuple[Event, Event]]:
        """Each Redis restart with what it lost: the lost tasks accepted within EVERYSEC_WINDOW
        before it, and acknowledged writes (how far the acceptance counters went back)."""
        out = []
        for f in self.faults:
            if f["kind"] not in REDIS_FAULTS:
                continue
            before = {k for k in self.lost if self.restart_before(k) is f}
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
    durability_lost: list[tuple[str, int]] = []
    pyfiq_lost: list[tuple[str, int]] = []
    for key in run.lost:
        restart = run.restart_before(key)
        if restart is not None and restart["kind"] == "redis-crash" and restart["appendfsync"] == "everysec":
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
    if any(prev["t"] < t < rerun["t"] for t in run.requeued_at.get(rerun["task_id"], ())):
        return "requeue-front"
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
    lapsed_without_fault = _lapses_without_fault(run.overlap_lines, run.causes, run.lease_ttl, run.poll_interval)
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


def check_timed_out_stops(run: RunFacts) -> Finding:
    """After a worker's stop timed out in a live process (the ``async-stop`` drill, and the stop
    of a ``stop-kill``), no other replica starts on the queue while the task it left running
    runs; and such a stop never says it was clean while that task still ran."""
    drills = [(f, f) for f in run.faults if f["kind"] == "async-stop"]
    drills += [(f, f["stopped"]) for f in run.faults if f["kind"] == "stop-kill"]
    finding = Finding(figures={"async_stop_drills": sum(f["kind"] == "async-stop" for f, _ in drills)})
    for f, stop in drills:
        replica = stop.get("replica", stop.get("target"))
        for a in run.executions.open_at(stop["pid"], stop["t"]):
            end = run.executions.end_of(a) or stop["t_exit"]
            until = min(end, stop["t_exit"])
            if stop.get("clean") and end > stop["t_stopped"]:
                finding.breaches.append(
                    f"{a['queue']}: the stop of {replica} with a {STOP_DRILL_TIMEOUT}s timeout said it was clean, "
                    f"yet #{a['seq']} ran on for {end - stop['t_stopped']:.2f}s"
                )
            starts = run.executions.starts_by_queue[a["queue"]]
            b = next((e for e in starts if stop["t"] < e["t"] < until and e["pid"] != a["pid"]), {})
            if b and not _lease_lost_to_another_fault(run, f, a, b):
                finding.breaches.append(
                    f"{a['queue']}: #{b['seq']} started on {b['replica']} (fence {b['fence']}) {until - b['t']:.2f}s "
                    f"before #{a['seq']} ended on {replica}, whose worker was stopped with a "
                    f"{STOP_DRILL_TIMEOUT}s timeout while that task ran in a thread of the live process "
                    f"(fence {a['fence']}): the lease was given up under a running task"
                )
    return finding


#: Faults after which a replica's lease may lapse under a running task: an overlap they explain
#: is judged by the overlap checks, not blamed on a stop that timed out meanwhile.
LEASE_LOSING = frozenset(
    {"blackhole", "cut", "stop", "delay", "slow-reply", "kill", "redis-restart", "redis-crash", "clock", "stop-kill"}
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


def _faulted(run: RunFacts, pid: int, since: float, until: float) -> bool:
    """Whether a fault that can cost process ``pid`` a lease (one on that process, or on Redis)
    was under way between ``since`` and ``until``. A stop, even one that timed out, is none."""
    return any(
        g["kind"] in EXPLAINING_FAULTS
        and g["kind"] != "async-stop"
        and (g.get("pid") == pid or g["target"] == "redis")
        and run.window(g)[0] <= until
        and run.window(g)[1] >= since
        for g in run.causes
    )


def check_skips(run: RunFacts) -> Finding:
    """An operator's skip of a stream's head while its holder runs it, tasks it took ahead
    queued behind (README "Operator actions and work taken ahead"): the skip dead-letters the
    task the holder runs, not one it finished; the stream moves on at once (the holder lets go
    as soon as it hears, it does not wait out its lease); and from the skip on no two runs of
    the stream overlap, but for the skipped execution, which may run on and no longer counts.
    A higher fencing token excuses no overlap here: only a fault on the earlier run's replica."""
    skips = [f for f in run.faults if f["kind"] == "skip"]
    finding = Finding()
    moves: list[float] = []
    overlaps: list[tuple[Event, Event, Event]] = []
    for f in skips:
        q = f["target"]
        head = f"#{f['head_seq']} ({f['head_task_id']})"
        if f.get("skipped_task_id") != f["head_task_id"]:
            finding.breaches.append(
                f"{q}: the skip dead-lettered {f.get('skipped_task_id')!r}, not the head {head} its holder "
                f"{f['holder']} was running"
            )
        elif run.dead_letters is not None and not any(
            d["queue"] == q and d.get("seq") == f["head_seq"] and d["reason"] == "operator" for d in run.dead_letters
        ):
            finding.breaches.append(f"{q}: the skipped head {head} is not in the dead letters as 'operator'")
        runs = [e for e in run.executions.starts_by_queue[q] if (e["pid"], e["task_id"]) not in run.voided]
        after = [e for e in runs if e["t"] >= f["t"]]
        if after:
            moves.append(after[0]["t"] - f["t"])
            # Only a fault that can slow a claim down (a lost replica, Redis) excuses a wait.
            quiet = not any(
                g["kind"] in EXPLAINING_FAULTS and run.window(g)[0] <= after[0]["t"] <= run.window(g)[1]
                for g in run.causes
            )
            if quiet and moves[-1] > run.lease_ttl + run.poll_interval:
                finding.breaches.append(
                    f"{q}: the first task after the skip started {moves[-1]:.2f}s after it, although its holder "
                    f"{f['holder']} was running the skipped head itself and should have let go at once"
                )
        overlaps += _overlaps_since(run, runs, f)
    if overlaps:
        f, a, b = overlaps[0]
        finding.breaches.append(
            f"{len(overlaps)} overlapping runs of a stream after a skip, e.g. {a['queue']} #{a['seq']} on "
            f"{a['replica']} (fence {a['fence']}) still ran when #{b['seq']} started on {b['replica']} (fence "
            f"{b['fence']}) {b['t'] - f['t']:.3f}s after the skip of {f['target']}"
        )
    finding.figures = {"skips": len(skips), "skip_move_on_max": _max(moves), "skip_overlaps": len(overlaps)}
    return finding


def _overlaps_since(run: RunFacts, runs: list[Event], f: Event) -> list[tuple[Event, Event, Event]]:
    """Pairs of ``runs`` (one stream's starts, in time order) that overlap, the later one
    started after fault ``f`` and before it ended (plus a lease TTL), and no fault on the
    earlier one's replica to explain it."""
    found = []
    horizon = float(f["t_end"] if "t_end" in f else f["t"]) + run.lease_ttl
    for i, a in enumerate(runs):
        if a["t"] > horizon:
            break
        a_end = run.executions.end_of(a)
        if a_end is None or a_end <= f["t"]:
            continue  # ended before, or killed mid-task: nothing of it ran on
        for b in runs[i + 1 :]:
            if b["t"] >= a_end or b["t"] > horizon:
                break
            if b["t"] >= f["t"] and not _faulted(run, a["pid"], a["t"], b["t"]):
                found.append((f, a, b))
    return found


def check_pauses(run: RunFacts) -> Finding:
    """Once an operator's ``pause()`` has returned, no task of the paused queue (any stream of
    it) starts anywhere until the resume: every holder has confirmed that it starts nothing
    more, what it took ahead going back to the stream, or its lease has ended. A process
    frozen whole (SIGSTOP, a GIL hold) is the one excuse, as for any start on a lapsed lease.
    ``pause()`` returns within the lease TTL and a second (plus slack)."""
    pauses = [f for f in run.faults if f["kind"] == "pause"]
    finding = Finding()
    late: list[tuple[Event, Event]] = []
    frozen = 0
    waits = [f["t_returned"] - f["t"] for f in pauses]
    for f, wait in zip(pauses, waits, strict=True):
        if wait > run.lease_ttl + PAUSE_MARGIN + TAKEOVER_SLACK:
            finding.breaches.append(f"{f['target']}: pause() took {wait:.2f}s to return")
        for stream, starts in run.executions.starts_by_queue.items():
            if queue_of(stream) != f["target"]:
                continue
            for e in starts:
                if f["t_returned"] < e["t"] < f["t_resume"]:
                    if run.paused(e["pid"], e["t"]):
                        frozen += 1
                    else:
                        late.append((f, e))
    if late:
        f, e = late[0]
        finding.breaches.append(
            f"{len(late)} tasks started while their queue was paused, e.g. {e['queue']} #{e['seq']} on "
            f"{e['replica']} (fence {e['fence']}) {e['t'] - f['t_returned']:.3f}s after pause() returned "
            f"(confirmed by {f['confirmed']}, unconfirmed {f['unconfirmed']})"
        )
    finding.figures = {
        "pauses": len(pauses),
        "pause_wait_max": _max(waits),
        "pause_holders_confirmed": sum(len(f["confirmed"]) for f in pauses),
        "pause_holders_unconfirmed": sum(len(f["unconfirmed"]) for f in pauses),
        "starts_while_paused": len(late),
        "starts_while_paused_after_a_freeze": frozen,
    }
    return finding


def check_requeues(run: RunFacts) -> Finding:
    """Dead letters requeued to the front of a stream while its holder runs a backlog (README
    "Operator actions and work taken ahead"): every one is moved and runs again; in their
    original (acceptance) order, as one block that no other task starts in the middle of;
    ahead of the work pending at the requeue, but for what a holder had already taken (at
    most a prefetch window and the task it ran)."""
    requeues = [f for f in run.faults if f["kind"] == "requeue-front"]
    finding = Finding()
    pending_after = 0
    pending_before: list[float] = []
    for f in requeues:
        stream, ids = f["target"], set(f["task_ids"])
        if f["moved"] != len(ids):
            finding.breaches.append(f"{stream}: the requeue moved {f['moved']} of {len(ids)} dead letters")
        starts = run.executions.starts_by_queue[stream]
        first: dict[str, float] = {}
        again: dict[str, Event] = {}
        for e in starts:
            first.setdefault(e["task_id"], e["t"])
            if e["t"] > f["t"] and e["task_id"] in ids:
                again.setdefault(e["task_id"], e)
        if len(again) < len(ids):
            finding.breaches.append(f"{stream}: {len(ids) - len(again)} requeued tasks never ran again")
        if not again:
            continue
        accepted = run.accepted.exact.get(stream, [])
        expected = [a["task_id"] for a in accepted if a["task_id"] in again]
        ran = [e["task_id"] for e in sorted(again.values(), key=lambda e: e["t"])]
        if ran != expected:
            at = next((i for i, (x, y) in enumerate(zip(ran, expected, strict=False)) if x != y), len(expected))
            finding.breaches.append(
                f"{stream}: requeued tasks ran again out of their original order, from position {at} of {len(ran)}"
            )
        low, high = min(e["t"] for e in again.values()), max(e["t"] for e in again.values())
        fresh = [e for e in starts if e["task_id"] not in ids and first[e["task_id"]] == e["t"]]
        inside = [e for e in fresh if low < e["t"] < high]
        if inside:
            finding.breaches.append(
                f"{stream}: {len(inside)} other tasks started in the middle of the requeued ones, e.g. "
                f"#{inside[0]['seq']} {inside[0]['t'] - low:.3f}s after the first requeued one"
            )
        pending = {a["task_id"] for a in accepted if a["t"] <= f["t"] and a["task_id"] not in ids}
        # Counted from when the requeue had certainly taken effect: a holder may start tasks
        # while the call is on its way.
        ahead = [e for e in fresh if e["task_id"] in pending and f["t_returned"] < e["t"] < low]
        pending_after += sum(1 for e in fresh if e["task_id"] in pending and e["t"] > high)
        pending_before.append(len(ahead))
        if len(ahead) > GROUP_PREFETCH + 1:
            finding.breaches.append(
                f"{stream}: {len(ahead)} tasks pending at the requeue to the front started before the requeued "
                f"ones; a holder takes at most {GROUP_PREFETCH} ahead of the one it runs"
            )
    finding.figures = {
        "requeues": len(requeues),
        "requeued_tasks": sum(len(f["task_ids"]) for f in requeues),
        "requeues_paged": sum(len(f["task_ids"]) > REQUEUE_STEP for f in requeues),
        "requeue_pending_ran_before_max": _max(pending_before),
        "requeue_pending_ran_after": pending_after,
    }
    return finding


def check_stop_kills(run: RunFacts) -> Finding:
    """Figures of the ``stop-kill`` drills (their take-overs are judged with the others, their
    timed-out stops by ``check_timed_out_stops``): how many, and how many killed a replica on a
    shard whose safety poll the stopped replica had."""
    drills = [f for f in run.faults if f["kind"] == "stop-kill"]
    return Finding(
        figures={
            "stop_kills": len(drills),
            "stop_kills_on_a_stopped_pollers_shard": sum(bool(f.get("polled_by_stopped")) for f in drills),
        }
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
    check_timed_out_stops,
    check_skips,
    check_pauses,
    check_requeues,
    check_stop_kills,
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
    "lease_ttl", "stale_starts", "stale_starts_after_a_pause", "async_stop_drills", "stop_kills",
    "stop_kills_on_a_stopped_pollers_shard", "skips", "skip_move_on_max", "skip_overlaps", "pauses",
    "pause_wait_max", "pause_holders_confirmed", "pause_holders_unconfirmed", "starts_while_paused",
    "starts_while_paused_after_a_freeze", "requeues", "requeued_tasks", "requeues_paged",
    "requeue_pending_ran_before_max", "requeue_pending_ran_after", "vandal_entries", "vandal_entries_lost",
    "vandal_entries_misfiled", "vandal_stall_max", "gil_tasks_dead_lettered_as", "throughput_tasks_per_s", "span_s",
    "replica_log_counts",
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
        f"asyncio stop drills: {s['async_stop_drills']}; stops timed out then a SIGKILL elsewhere: {s['stop_kills']} "
        f"({s['stop_kills_on_a_stopped_pollers_shard']} on a shard the stopped replica polled); GIL-holding tasks "
        "dead-lettered as: "
        + (json.dumps(s["gil_tasks_dead_lettered_as"]) if s["gil_tasks_dead_lettered_as"] else "none"),
        f"operator: {s['skips']} skips of a running head (next task after max {s['skip_move_on_max']}s, "
        f"{s['skip_overlaps']} overlaps after them); {s['pauses']} pauses (returned after max {s['pause_wait_max']}s, "
        f"{s['pause_holders_confirmed']} holders confirmed, {s['pause_holders_unconfirmed']} unconfirmed; "
        f"{s['starts_while_paused']} starts while paused, {s['starts_while_paused_after_a_freeze']} more right after "
        f"a freeze); {s['requeues']} requeues to the front ({s['requeued_tasks']} tasks, {s['requeues_paged']} paged; "
        f"of the tasks pending then, at most {s['requeue_pending_ran_before_max']} ran before them, "
        f"{s['requeue_pending_ran_after']} after)",
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
    ends = _run_ends(journal)
    count = 0
    for starts_ in runs.values():
        starts_.sort(key=lambda e: e["t"])
        for i, a in enumerate(starts_):
            until = ends.get(_run_key(a))
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
    ends = _run_ends(journal)
    for e in journal:
        if e["event"] == "start" and e["task_id"] in asked:
            end = ends.get(_run_key(e), e["t"] + asked[e["task_id"]])
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
            producers=self.producers,
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
        streams = [*self.queues, *self.injector.streams]
        self.remaining = _wait_drained(self.observer, streams, self.profile.drain_timeout, self.fleet)
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
