"""The baseline: the round-trip rate of one redis-py connection running a trivial EVALSHA, and
``redis-benchmark -c 1`` doing the same.
"""

from __future__ import annotations

import contextlib
import csv
import shutil
import statistics
import subprocess
from typing import Any

import redis

from .harness import RedisServer, Report, loop_rate, per_s, times


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
