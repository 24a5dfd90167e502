"""Dead letters at scale: the longest single Redis call of the dead-letter operations, by
SLOWLOG, against the median PING round trip of another client.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import redis

from pyfiq import RedisQueueBackend, Settings
from pyfiq.engine.outcomes import dead_letter_header
from pyfiq.task import TaskRecord

from .harness import (
    CHILD,
    ROOT,
    RedisServer,
    Report,
    Run,
    command_stats,
    end,
    log,
    ms,
    new_prefix,
    percentile,
    read_until,
    spawn,
)

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
            "exhausted",
            replica="bench",
            deliveries=3,
            attempts=3,
            name="bench.dead",
            error=exc,
            at_ms=int(time.time() * 1000),
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
        argv = [*CHILD, "--child", "probe", "--url", url]
        with open(logdir / "probe.log", "wb") as err:
            self.proc = spawn(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
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


def section(run: Run) -> None:
    """Dead-letter operations on many records."""
    report, server, quick, workdir = run.report, run.server, run.quick, run.workdir
    n_dead, count = (20_000, 2_000) if quick else (1_000_000, 10_000)
    r = measure_requeue(server, n_dead, count, 0.2 if quick else 1.0, workdir)
    report.data["requeue"] = r
    report_requeue(report, r)
