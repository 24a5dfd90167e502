"""Every benchmark at a tiny size, through the command users run, so that none can rot. No
timing assertions: only that each runs to the end and reports positive figures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import pyfiq

ROOT = Path(__file__).resolve().parent.parent


def check_main(data: dict[str, Any], stdout: str) -> None:
    """The ceiling, the drain, the enqueue, the take-over with default settings, leases under a
    saturated CPU, the dead-letter requeue at scale, the idle worker beside another queue's
    backlog, what storing results costs, and what waiting delayed tasks cost."""
    assert data["ceiling"]["evalsha_per_s"] > 0
    for aof in ("drain", "drain_aof"):
        assert set(data[aof]) == {"default", "strict", "group_100", "inline_100"}
        for run in data[aof].values():
            assert run["complete"]
            assert run["tasks"] == data["tasks"]
            assert run["tasks_per_s"] > 0
            assert run["ratio_to_ceiling"] > 0
    for kind in ("single", "enqueue_many_100", "rpush_pipeline_100", "threads_16", "asyncio_100"):
        assert data["enqueue"][kind]["tasks_per_s"] > 0
    requeue = data["requeue"]
    assert requeue["by_id"]["result"] == 1 and requeue["page"]["result"] == 100
    assert requeue["count"]["result"] == requeue["count"]["count"]
    assert requeue["count"]["script_calls"] > 1, "a requeue of many is cut into bounded script calls"
    assert requeue["count"]["longest_call_s"] > 0 and requeue["ping"]["median_s"] > 0
    assert requeue["count"]["probe"]["pings"] > 0
    assert requeue["left"]["dead"] == requeue["dead_letters"] - 1 - requeue["count"]["count"]
    foreign = data["idle_foreign"]
    assert len(foreign) >= 2
    for run in foreign.values():
        assert run["still_due_after"] == run["foreign_due_streams"], "nobody consumes queue a"
        assert run["evalsha_per_s"] > 0
    for window in (data["lease_load"]["quiet"], data["lease_load"]["saturated"]):
        assert window["tasks_run"] > 0 and window["leases_acquired"] >= window["streams"]
        assert window["lowest_lease_left_s"] is not None, "every lease was held at once"
    assert data["lease_load"]["saturated"]["busy_processes"] > 0
    assert data["takeover"]["sigkill"]["lease_ttl_s"] == pyfiq.Settings().lease_ttl
    results = data["results"]
    assert results["ratio"] > 0 and min(results["plain_per_s"] + results["store_result_per_s"]) > 0
    assert results["latency_tasks"] > 0 and results["latency_p99_s"] >= results["latency_p50_s"] > 0
    delays = data["delays"]
    # An idle fleet with nothing waiting may send nothing at all in a short window.
    assert min(delays["none"]) >= 0 and min(delays["few"] + delays["many"]) > 0
    assert delays["bytes_per_waiting_task"] > 0
    assert delays["lateness_tasks"] > 0 and delays["lateness_min_s"] >= 0, "a delayed task started before its due time"
    cost = data["cost"]
    for phase in (
        "enqueue_many_default",
        "drain_default",
        "drain_strict",
        "drain_bulk",
        "enqueue_single",
        "enqueue_threads",
    ):
        assert cost[phase]["commandstats_usec_per_task"] > 0 and cost[phase]["redis_cpu_usec_per_task"] >= 0
        assert cost[phase]["calls_per_task"]["evalsha"] > 0
    assert cost["batched_default"]["commandstats_usec_per_task"] > 0
    latency = data["latency"]
    assert latency["tasks"] > 0 and latency["p99_s"] >= latency["p50_s"] > 0
    fleet = data["idle"]["fleet"]
    # Settled, an idle fleet may send nothing in the quick run's one-second window; not at its start.
    assert fleet["commands_per_s"] >= 0 and fleet["start"]["commands_per_s"] > 0 and fleet["queues"] == 4
    assert "machine:" in stdout


def check_streams(data: dict[str, Any], stdout: str) -> None:
    assert data["throughput"] and all(r["executed"] == r["tasks"] for r in data["throughput"])
    assert all(r["tasks_per_s"] > 0 for r in data["throughput"])
    assert data["latency"]["latency_p99_ms"] >= data["latency"]["latency_p50_ms"] > 0


def check_streams_cluster(data: dict[str, Any], stdout: str) -> None:
    rows = data["cluster"]
    assert rows and all(r["single_tasks_per_s"] > 0 and r["cluster_tasks_per_s"] > 0 for r in rows)
    for row in rows:
        assert all(r["executed"] == r["tasks"] for side in ("single", "cluster") for r in row["runs"][side])


def check_durable(data: dict[str, Any], stdout: str) -> None:
    for name in ("single", "enqueue_many_100", "threads_16", "drain"):
        assert data[name]["plain_per_s"] > 0 and data[name]["durable_per_s"] > 0 and data[name]["ratio"] > 0


class Bench(NamedTuple):
    script: str
    args: tuple[str, ...]
    timeout: float
    check: Callable[[dict[str, Any], str], None]


BENCHES = {
    "main": Bench("bench.py", ("--quick", "--skip-peers"), 100, check_main),
    "streams": Bench("bench_streams.py", ("--quick",), 120, check_streams),
    "streams-cluster": Bench("bench_streams.py", ("--quick", "--cluster"), 180, check_streams_cluster),
    "durable": Bench("bench_durable.py", ("--quick",), 120, check_durable),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", BENCHES)
def test_benchmark_quick_run_reports_positive_figures(name: str, tmp_path: Path) -> None:
    bench = BENCHES[name]
    if name == "streams-cluster" and shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is needed to create a cluster")
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / bench.script), *bench.args, "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=bench.timeout,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-5000:]}"
    bench.check(json.loads(out.read_text()), proc.stdout)
