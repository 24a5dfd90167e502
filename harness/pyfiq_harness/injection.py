"""The injector's shared ground: a gate between faults that may run side by side and those
that need the run to themselves, and the base every fault builds on.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pyfiq.backend.backend import RedisQueueBackend
from pyfiq.engine.keys import queue_of
from pyfiq.ops.scenario_tasks import (
    step_name,
)
from pyfiq.task import new_task_id

from .clock import build_clock_shim
from .fleet import Fleet
from .journal import Event, JournalTail, append_line
from .producers import enqueue_stamped_many
from .profiles import INJECTOR, NETWORK_FAULTS, REDIS_FAULTS, TASK_FAULTS, Profile
from .proxy import FaultProxy
from .servers import RedisProcess


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


class InjectorBase:
    """What every fault shares: the run it works on, the journal of faults, the choice of a
    victim replica or queue, and the tasks a fault enqueues and follows."""

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

    def _base(self, kind: str, name: str, mid: bool) -> Event:
        return {"kind": kind, "target": name, "pid": self.fleet.procs[name].pid, "mid_task": mid, "t": time.time()}

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
