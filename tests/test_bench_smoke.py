"""The benchmark at a tiny size, so that it cannot rot. No timing assertions: only that it
runs to the end and reports positive figures for the ceiling, the drain, the enqueue, the
take-over with default settings, leases under a saturated CPU, the dead-letter requeue at scale
and the idle worker beside another queue's backlog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyfiq

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_run_writes_positive_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--skip-peers", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads(out.read_text())

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
    assert "machine:" in proc.stdout
