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


def test_demo_leaves_no_temporary_directory_behind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pyfiq", "demo", "--tasks", "4"], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_redis_demo_names_its_prefix_and_deletes_its_keys(redis_server) -> None:  # type: ignore[no-untyped-def]
    import re

    result = subprocess.run(
        [sys.executable, "-m", "pyfiq", "demo", "--tasks", "4", "--redis", redis_server.url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prefix = re.search(r"key prefix (pyfiq-demo-\w+)", result.stdout)
    assert prefix is not None, result.stdout[:2000]
    assert list(redis_server.client().scan_iter(f"{prefix.group(1)}:*")) == []
    assert f"keys under {prefix.group(1)}:" in result.stdout


def test_ctrl_c_prints_the_summary_so_far_and_exits_130(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyfiq", "demo", "--tasks", "200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 60
    while not any(" start " in line for line in seen[-1:]) and time.monotonic() < deadline:
        seen.append(proc.stdout.readline())  # until the first task starts: well into the run
        assert seen[-1], "the demo ended before its first task started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    out = "".join(seen) + out
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "interrupted: the summary so far" in out and "summary" in out
    assert list(tmp_path.iterdir()) == []
