"""The idle cost: one idle worker over many registered queues, and a fleet of idle replicas."""

from __future__ import annotations

import argparse
import signal
import subprocess
import threading
import time
from pathlib import Path
from time import perf_counter
from typing import Any

from pyfiq import RedisQueueBackend, Settings, ThreadedWorker, fifo

from .harness import (
    CHILD,
    ROOT,
    CommandStats,
    RedisServer,
    Run,
    command_stats,
    end,
    log,
    new_prefix,
    noop,
    proc_cpu_seconds,
    quiet_logging,
    read_until,
    spawn,
    stats_delta,
    times,
    vm_rss_kib,
)


def measure_idle(
    server: RedisServer, queue_counts: list[int], warmup: float, window: float, logdir: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = server.client()
    assert server.proc is not None
    for count in queue_counts:
        log(f"idle: one ThreadedWorker, {count} registered queues, {window:.0f} s window")
        server.flush()
        argv = [*CHILD, "--child", "idle", "--url", server.url, "--prefix", new_prefix()]
        argv += ["--queues", str(count), "--timeout", str(warmup + window + 120)]
        with open(logdir / f"idle-{count}.log", "wb") as err:
            proc = spawn(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        try:
            assert proc.stdout is not None
            if not read_until(proc.stdout, b"ready", 120):
                raise RuntimeError(f"the idle worker with {count} queues did not start")
            time.sleep(warmup)
            s0, cpu0, t0 = command_stats(client), proc_cpu_seconds(proc.pid), perf_counter()
            rcpu0 = proc_cpu_seconds(server.proc.pid)
            time.sleep(window)
            s1, cpu1, t1 = command_stats(client), proc_cpu_seconds(proc.pid), perf_counter()
            rcpu1 = proc_cpu_seconds(server.proc.pid)
            rss = vm_rss_kib(proc.pid)
        finally:
            end(proc)
        secs = t1 - t0
        delta = stats_delta(s0, s1)
        calls = sum(c for c, _ in delta.values())
        evalsha, usec = delta.get("evalsha", (0, 0))
        out[f"queues_{count}"] = {
            "commands_per_s": calls / secs,
            "evalsha_per_s": evalsha / secs,
            "redis_script_usec_per_s": usec / secs,
            "worker_cpu_percent": 100 * (cpu1 - cpu0) / secs,
            "redis_cpu_percent": 100 * (rcpu1 - rcpu0) / secs,
            "worker_rss_kib": rss,
            "by_command_per_s": {cmd: c / secs for cmd, (c, _) in sorted(delta.items())},
        }
    client.close()
    return out


def measure_idle_fleet(
    server: RedisServer, replicas: int, warmup: float, window: float, logdir: Path, queues: int = 4
) -> dict[str, Any]:
    """``replicas`` idle worker processes of ``queues`` queues each on one prefix: what they send
    Redis together in their first ``warmup`` seconds (from the moment all are ready), and once
    their views of each other have settled."""
    log(f"idle: {replicas} idle replica processes x {queues} queues, {warmup:.0f} s to settle, {window:.0f} s window")
    server.flush()
    client = server.client()
    assert server.proc is not None
    argv = [*CHILD, "--child", "idle", "--url", server.url, "--prefix", new_prefix()]
    argv += ["--queues", str(queues), "--timeout", str(warmup + window + 120)]
    procs = []
    try:
        for i in range(replicas):
            with open(logdir / f"idle-fleet-{i}.log", "wb") as err:
                procs.append(spawn(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=err))
        for proc in procs:
            assert proc.stdout is not None
            if not read_until(proc.stdout, b"ready", 120):
                raise RuntimeError("an idle replica process did not start")
        w0, wcpu0, wt0 = command_stats(client), proc_cpu_seconds(server.proc.pid), perf_counter()
        time.sleep(warmup)
        s0, rcpu0, t0 = command_stats(client), proc_cpu_seconds(server.proc.pid), perf_counter()
        time.sleep(window)
        s1, rcpu1, t1 = command_stats(client), proc_cpu_seconds(server.proc.pid), perf_counter()
    finally:
        for proc in procs:
            end(proc)
        client.close()
    start = redis_load(stats_delta(w0, s0), t0 - wt0, rcpu0 - wcpu0)
    return {
        "replicas": replicas,
        "queues": queues,
        "start": start,
        **redis_load(stats_delta(s0, s1), t1 - t0, rcpu1 - rcpu0),
    }


def redis_load(delta: CommandStats, secs: float, redis_cpu_s: float) -> dict[str, Any]:
    """What Redis did per second over a window: commands (scripts' own included), script calls
    and their time, its CPU share, and the rate of each command."""
    evalsha, usec = delta.get("evalsha", (0, 0))
    return {
        "commands_per_s": sum(c for c, _ in delta.values()) / secs,
        "evalsha_per_s": evalsha / secs,
        "redis_script_usec_per_s": usec / secs,
        "redis_cpu_percent": 100 * redis_cpu_s / secs,
        "by_command_per_s": {cmd: c / secs for cmd, (c, _) in sorted(delta.items())},
    }


def child_idle(args: argparse.Namespace) -> None:
    quiet_logging()
    for i in range(args.queues):
        fifo(queue=f"idle-{i}", name=f"bench.idle.{i}")(noop)
    worker = ThreadedWorker(RedisQueueBackend(args.url, Settings(prefix=args.prefix)))  # every registered queue
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    worker.start()
    print("ready", flush=True)
    stop.wait(args.timeout)
    worker.stop(timeout=5)


def section(run: Run) -> None:
    """Idle commands per second, one worker and a fleet."""
    report, server, quick, workdir = run.report, run.server, run.quick, run.workdir
    counts = [1, 100] if quick else [1, 100, 10000]
    idle = measure_idle(server, counts, 0.5 if quick else 2.0, 1.0 if quick else 5.0, workdir)
    report.data["idle"] = idle
    for count in counts:
        r = idle[f"queues_{count}"]
        report.row(
            "idle",
            f"1 idle worker, {count} registered queues",
            f"{r['commands_per_s']:,.1f} cmd/s",
            f"{r['evalsha_per_s']:.1f} EVALSHA/s, worker CPU {r['worker_cpu_percent']:.1f}%, "
            f"Redis scripts {r['redis_script_usec_per_s'] / 1e4:.2f}%",
        )
    # Settled: every replica has read the others' beats afresh (VIEW_REFRESH_BEATS).
    fleet_n, settle = (3, 2.0) if quick else (10, 12.0)
    fleet = measure_idle_fleet(server, fleet_n, settle, 1.0 if quick else 10.0, workdir)
    fleet["ratio_to_one"] = fleet["commands_per_s"] / idle["queues_1"]["commands_per_s"]
    idle["fleet"] = fleet
    start = fleet["start"]
    report.row(
        "idle",
        f"{fleet_n} idle replica processes x {fleet['queues']} queues, together, settled",
        f"{fleet['commands_per_s']:,.1f} cmd/s",
        f"{times(fleet['ratio_to_one'], '1 idle worker')}; sent: {sent_per_s(fleet):.1f}/s "
        f"({fleet['evalsha_per_s']:.1f} EVALSHA/s); Redis CPU {fleet['redis_cpu_percent']:.2f}%",
    )
    report.row(
        "idle",
        f"the same fleet, its first {settle:.0f} s (from all ready)",
        f"{start['commands_per_s']:,.1f} cmd/s",
        f"sent: {sent_per_s(start):.1f}/s",
    )


def sent_per_s(load: dict[str, Any]) -> float:
    """Commands an idle fleet's clients send, per second: its scripts and the connections'
    health-check PINGs (``commands_per_s`` also counts what the scripts run inside Redis)."""
    rates: dict[str, float] = load["by_command_per_s"]
    return rates.get("evalsha", 0.0) + rates.get("ping", 0.0)
