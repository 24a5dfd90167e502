"""Small helpers every kind of test uses: fast settings, a key prefix of one's own, waiting for
a condition (a test failure, not an exception, when it never comes), and a producer loop."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import pytest

from pyfiq import RedisQueueBackend

FAST = {"lease_ttl": 1.5, "poll_interval": 0.2, "shards": 4}


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, message: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for: {message or predicate}")
        time.sleep(interval)


def drained(backend: RedisQueueBackend, *streams: str) -> bool:
    for s in streams:
        info = backend.queue_info(s)
        if info["pending"] or info["inflight"]:
            return False
    return True


L = TypeVar("L", bound="ProducerLoop")


class ProducerLoop:
    """Calls ``self.step(n)`` for n = 0, 1, ... in a background thread, ``pause`` seconds apart,
    from ``with`` to its end; whatever a step raises is kept in ``errors``. Subclasses set
    ``errors`` (a list) and call ``_loop()`` once built."""

    pause = 0.003
    errors: list[BaseException]

    def step(self, n: int) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.step(n)
            except Exception as exc:
                self.errors.append(exc)
            n += 1
            time.sleep(self.pause)

    def __enter__(self: L) -> L:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def lines_until(proc: subprocess.Popen[str], needle: str, timeout: float = 20) -> list[str]:
    """The lines ``proc`` wrote to stderr up to the first that contains ``needle``."""
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line.rstrip("\n"))
        if needle in line:
            return seen
    raise AssertionError(f"no {needle!r} in {seen}")
