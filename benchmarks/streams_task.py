"""The many-streams benchmark's task, as each replica runs it (``--import
benchmarks.streams_task``): it counts its runs and their latency, and at exit writes them to a
file of its own under ``$PYFIQ_BENCH_OUT`` for the driver (``benchmarks.streams``) to add up."""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

import pyfiq

QUEUE = "bench-streams"
OUT_ENV = "PYFIQ_BENCH_OUT"


_first = _last = 0.0
_count = 0
_latency_ms: list[float] = []


def _dump() -> None:
    out = os.environ.get(OUT_ENV)
    if out and _count:
        data = {"first": _first, "last": _last, "count": _count, "latency_ms": _latency_ms}
        Path(out, f"{os.getpid()}.json").write_text(json.dumps(data))


atexit.register(_dump)


@pyfiq.fifo(queue=QUEUE, name="bench.streams.noop", key=lambda key, seq: key)
def noop(key: str, seq: int) -> None:
    global _first, _last, _count
    now = time.time()
    if not _count:
        _first = now
    _count += 1
    _latency_ms.append(now * 1000 - pyfiq.current_task().enqueued_ms)
    _last = time.time()
