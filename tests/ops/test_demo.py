"""The demo is the main job: it must keep passing its own order and no-loss checks."""

from __future__ import annotations

import subprocess
import sys


def test_embedded_demo_passes_its_own_checks() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pyfiq", "demo", "--tasks", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "verdict: PASS" in result.stdout
    assert "lost tasks: 0" in result.stdout
    assert "reason=exhausted" in result.stdout
    assert ">>> killing replica-" in result.stdout
