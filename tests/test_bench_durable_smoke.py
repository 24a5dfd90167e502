"""The durable-mode cost benchmark at a tiny size, so that it cannot rot: it runs to the end
and reports a positive rate and ratio for each operation. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_durable_quick_run_reports_each_ratio(tmp_path: Path) -> None:
    out = tmp_path / "durable.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_durable.py"), "--quick", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads(out.read_text())
    for name in ("single", "enqueue_many_100", "threads_16", "drain"):
        assert data[name]["plain_per_s"] > 0 and data[name]["durable_per_s"] > 0 and data[name]["ratio"] > 0
