"""The streams benchmark must keep running (tiny sizes; no timing assertions)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_streams_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_streams.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    data = json.loads(out.read_text())
    assert data["throughput"] and all(r["executed"] == r["tasks"] for r in data["throughput"])
    assert all(r["tasks_per_s"] > 0 for r in data["throughput"])
    assert data["latency"]["latency_p99_ms"] >= data["latency"]["latency_p50_ms"] > 0


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is needed to create a cluster")
def test_streams_benchmark_cluster_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_streams.py"), "--quick", "--cluster", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    rows = json.loads(out.read_text())["cluster"]
    assert rows and all(r["single_tasks_per_s"] > 0 and r["cluster_tasks_per_s"] > 0 for r in rows)
    for row in rows:
        assert all(r["executed"] == r["tasks"] for side in ("single", "cluster") for r in row["runs"][side])
