"""Lease losses with the default TTL while busy processes saturate every core."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pyfiq
from pyfiq import RedisQueueBackend, Settings, ThreadedWorker, fifo
from pyfiq.hooks import Hooks, LeaseChange

from .harness import BOUND, TALLY, RedisServer, Run, end, keyed_stamp, log, new_prefix, spawn, times


class LeaseEvents(Hooks):
    """A hooks listener counting lease events of one queue."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.counts: dict[str, int] = {}

    def on_lease(self, stream: str, event: LeaseChange) -> None:
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
    if queue not in BOUND:
        BOUND[queue] = fifo(queue=queue, name=f"bench.{queue}", key=lambda k, i, hold: k, max_retries=0)(keyed_stamp)
    BOUND[queue].enqueue_many(calls, backend=backend)
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


def section(run: Run) -> None:
    """Leases kept under a saturated CPU, against a quiet run."""
    report, server, quick = run.report, run.server, run.quick
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
