"""The replica processes: the command each runs, and the fleet that starts, signals, restarts
and reaps them.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .journal import Event
from .servers import popen


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
        sys.executable, "-m", "pyfiq", "worker", "pyfiq_harness.replica",
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
