"""Keyed-stream benchmark: aggregate throughput over many ordered streams and replicas, and
enqueue-to-start latency at a steady moderate load.

    python -m benchmarks.streams [--tasks 20000] [--json bench-streams.json] [--quick]
    python -m benchmarks.streams --cluster [--rounds 3]      # or: python scripts/bench_streams.py ...

Starts its own redis-server (no persistence) on a free port; replicas are real processes
(`python -m pyfiq worker`) importing this file for their task. Throughput is counted from the
first task start to the last task end across replicas, so process start-up is not included.

With --cluster it also starts a Redis Cluster of 3 primaries with one replica each (free ports
whose bus port, port + 10000, is free too) and runs the same workload on both, alternating one
Redis and the cluster cell by cell, for 100 and 1,000 streams with 1 and 2 replica processes;
it reports both figures (medians of --rounds runs) and their ratio.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import redis

from pyfiq_harness.servers import free_ports

from .streams_task import OUT_ENV, QUEUE, noop

#: The directory holding the benchmarks package, which the replicas import the task from
#: (``--import benchmarks.streams_task``).
ROOT = Path(__file__).resolve().parents[1]

# -- the driver ------------------------------------------------------------------------------


def _ping(port: int, seconds: float = 10) -> redis.Redis:
    client = redis.Redis(port=port, socket_timeout=5)
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _server(port: int, directory: Path, *extra: str) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), *extra],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


class Bench:
    """One private Redis (``cluster=False``) or a Redis Cluster of 3 primaries with one replica
    each (``cluster=True``), and the workload run against it."""

    def __init__(self, workdir: Path, *, cluster: bool = False) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.servers: list[subprocess.Popen[bytes]] = []
        try:
            if cluster:
                self._start_cluster()
            else:
                (self.port,) = free_ports(1)
                self.servers.append(_server(self.port, workdir / "redis"))
                self.primaries = [_ping(self.port)]
        except BaseException:
            self.close()
            raise
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _start_cluster(self, nodes: int = 6) -> None:
        ports = free_ports(nodes, bus=True)
        self.port = ports[0]
        for port in ports:
            self.servers.append(
                _server(port, self.workdir / f"node-{port}", "--cluster-enabled", "yes",
                        "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "2000")
            )  # fmt: skip
        clients = [_ping(port) for port in ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "1",
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip

        def ready() -> bool:
            for c in clients:
                if c.cluster("info")["cluster_state"] != "ok":
                    return False
                info = c.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
            return True

        deadline = time.monotonic() + 60
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster was not ready within 60 s")
            time.sleep(0.1)
        self.primaries = [c for c in clients if c.info("replication")["role"] == "master"]
        for c in clients:
            if c not in self.primaries:
                c.close()

    def flush(self) -> None:
        for c in self.primaries:  # a cluster's replicas follow their primary
            c.flushall()

    def close(self) -> None:
        for server in self.servers:
            server.terminate()
        for server in self.servers:
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    def run(self, replicas: int, streams: int, tasks: int, *, rate: float | None = None) -> dict[str, Any]:
        """Enqueue ``tasks`` over ``streams`` keys (all first, or at ``rate`` per second while
        the replicas run) and return throughput and latency figures."""
        from pyfiq import RedisQueueBackend, Settings

        self.flush()
        out = Path(tempfile.mkdtemp(dir=self.workdir))
        settings = Settings(prefix="bench", shards=16, lease_ttl=10, poll_interval=0.2, prefetch=10)
        backend = RedisQueueBackend(self.url, settings, cluster=self.cluster)
        env = {**os.environ, OUT_ENV: str(out), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        calls = [(f"k{i % streams}", i // streams) for i in range(tasks)]
        if rate is None:
            noop.enqueue_many(calls, backend=backend)
        argv = [
            sys.executable, "-m", "pyfiq", *(["--cluster"] if self.cluster else []), "worker", "--redis", self.url,
            "--prefix", "bench", "--shards", "16",
            "--import", "benchmarks.streams_task", "--queues", QUEUE, "--concurrency", "8", "--prefetch", "10",
            "--lease-ttl", "10", "--poll-interval", "0.2", "--log-level", "error",
        ]  # fmt: skip
        logs = [out / f"replica-{i}.log" for i in range(replicas)]
        procs = []
        for log in logs:
            with open(log, "w") as sink:  # a file, not a pipe: a replica never blocks on its log
                procs.append(subprocess.Popen(argv, env=env, stderr=sink))
        try:
            _wait_for(lambda: all("ready" in log.read_text() for log in logs), 30, "replicas to start", logs)
            if rate is not None:
                started = time.monotonic()
                for n, (key, seq) in enumerate(calls):
                    delay = started + n / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    noop.send_with_options(args=(key, seq), backend=backend)
            _wait_for(lambda: not backend.active_streams(), 60 + tasks / 100, "the streams to drain", logs)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    raise RuntimeError(f"a replica did not stop within 20 s; see {out}") from None
        parts = [json.loads(f.read_text()) for f in out.glob("*.json")]
        count = sum(p["count"] for p in parts)
        span = max(p["last"] for p in parts) - min(p["first"] for p in parts)
        latency = sorted(x for p in parts for x in p["latency_ms"])
        backend.close()
        return {
            "replicas": replicas,
            "streams": streams,
            "tasks": tasks,
            "executed": count,
            "tasks_per_s": count / span if span > 0 else float("nan"),
            "latency_p50_ms": statistics.median(latency) if latency else None,
            "latency_p99_ms": latency[int(len(latency) * 0.99) - 1] if latency else None,
        }


def _wait_for(done: Callable[[], bool], seconds: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
            raise RuntimeError(f"timed out after {seconds:.0f}s waiting for {what}\n{tails}")
        time.sleep(0.05)


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    version = next((w.split("=")[1] for w in server if w.startswith("v=")), "?")
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, redis-server {version}"


def compare(workdir: Path, tasks: int, rounds: int, quick: bool) -> list[dict[str, Any]]:
    """The same workload on one Redis and on a 3-primary cluster, alternated cell by cell so
    that drift on a shared machine hits both alike; medians of ``rounds`` runs and their ratio."""
    replica_counts = [1] if quick else [1, 2]
    stream_counts = [10] if quick else [100, 1_000]
    single = Bench(workdir / "single")
    try:
        cluster = Bench(workdir / "cluster", cluster=True)
    except BaseException:
        single.close()
        raise
    rows: list[dict[str, Any]] = []
    try:
        click.echo(f"{'replicas':>8} {'streams':>8} {'1 Redis/s':>10} {'cluster/s':>10} {'ratio':>6}")
        for replicas in replica_counts:
            for streams in stream_counts:
                n = max(tasks, 2 * streams)
                runs: dict[str, list[dict[str, Any]]] = {"single": [], "cluster": []}
                for _ in range(rounds):
                    runs["single"].append(single.run(replicas, streams, n))
                    runs["cluster"].append(cluster.run(replicas, streams, n))
                one = statistics.median(r["tasks_per_s"] for r in runs["single"])
                many = statistics.median(r["tasks_per_s"] for r in runs["cluster"])
                row = {
                    "replicas": replicas,
                    "streams": streams,
                    "tasks": n,
                    "single_tasks_per_s": one,
                    "cluster_tasks_per_s": many,
                    "ratio": many / one,
                    "runs": runs,
                }
                rows.append(row)
                click.echo(f"{replicas:>8} {streams:>8} {one:>10.0f} {many:>10.0f} {many / one:>6.2f}")
    finally:
        cluster.close()
        single.close()
    return rows


@click.command()
@click.option("--tasks", default=20_000, show_default=True)
@click.option("--quick", is_flag=True, help="Tiny sizes, for a smoke run.")
@click.option(
    "--cluster",
    is_flag=True,
    help="Instead of the full matrix: one Redis against a 3-primary cluster (100 and 1,000 streams, "
    "1 and 2 replicas), with their ratio.",
)
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1), help="Runs per cell with --cluster.")
@click.option("--json", "json_path", default="bench-streams.json", show_default=True)
def main(tasks: int, quick: bool, cluster: bool, rounds: int, json_path: str) -> None:
    if shutil.which("redis-server") is None:
        raise click.ClickException("redis-server is needed")
    if quick:
        tasks = 300
    workdir = Path(tempfile.mkdtemp(prefix="pyfiq-bench-streams-"))
    if cluster:
        if shutil.which("redis-cli") is None:
            raise click.ClickException("redis-cli is needed for --cluster")
        results: dict[str, Any] = {"machine": machine(), "cluster": []}
        click.echo(results["machine"])
        try:
            results["cluster"] = compare(workdir, tasks, 1 if quick else rounds, quick)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        Path(json_path).write_text(json.dumps(results, indent=2))
        return
    replica_counts = [1, 2] if quick else [1, 2, 4]
    stream_counts = [1, 10, 100] if quick else [1, 10, 100, 1_000, 10_000]
    bench = Bench(workdir)
    results = {"machine": machine(), "throughput": [], "latency": None}
    try:
        click.echo(results["machine"])
        click.echo(f"{'replicas':>8} {'streams':>8} {'tasks/s':>10}")
        for replicas in replica_counts:
            for streams in stream_counts:
                n = max(tasks, 2 * streams)
                r = bench.run(replicas, streams, n)
                results["throughput"].append(r)
                click.echo(f"{replicas:>8} {streams:>8} {r['tasks_per_s']:>10.0f}")
        load = bench.run(2, 100, 100 if quick else 1500, rate=50 if quick else 300)
        results["latency"] = load
        click.echo(
            f"latency enqueue->start at {50 if quick else 300} tasks/s over 100 streams, 2 replicas: "
            f"p50 {load['latency_p50_ms']:.1f} ms, p99 {load['latency_p99_ms']:.1f} ms"
        )
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    Path(json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
