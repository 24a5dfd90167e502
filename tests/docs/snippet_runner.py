"""Runs documentation snippets, each in a process of its own, several at once.

``python tests/docs/snippet_runner.py JOBS.json RESULTS.json``. The parent imports pyfiq and the
libraries the pages use once, then forks a child per snippet: a fresh interpreter state for each
block (its own registry, workers and connections) without paying an interpreter start per block.
Each child gets its own Redis database of the suite's server, flushed first, and its own working
directory; every local Redis URL in its source names that database, ``PYFIQ_REDIS_URL`` too, and
any connection to port 6379 (the Redis a developer runs) is refused, so no snippet can reach it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from snippets import for_the_suite

#: Imported before the first fork, so that no child pays for them (each is optional).
PRELOAD = (
    "pyfiq",
    "pyfiq.testing",
    "pyfiq.backend.memory",
    "pyfiq.dashboard",
    "pyfiq.dashboard.app",
    "fakeredis",
    "pytest",
    "fastapi",
    "fastapi.testclient",
    "starlette.applications",
    "uvicorn",
)
FORBIDDEN_PORT = 6379


def _refuse_the_developers_redis() -> None:
    """Make every connection to port 6379 fail loudly in this process."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address: Any) -> None:
        if isinstance(address, tuple) and len(address) >= 2 and address[1] == FORBIDDEN_PORT:
            raise ConnectionRefusedError(
                f"a documentation snippet tried to reach {address[0]}:{FORBIDDEN_PORT}: name Redis as "
                "redis://localhost (the runner points it at the suite's server) or memory://"
            )

    def guarded_connect(self: socket.socket, address: Any) -> None:
        check(address)
        connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return connect_ex(self, address)

    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign]


def _child(job: dict[str, Any], url: str, workdir: Path) -> NoReturn:
    os.setpgrp()  # so that a timeout kills whatever the snippet started too
    code = 1
    try:
        workdir.mkdir(parents=True)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(workdir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        os.chdir(workdir)
        sys.path.insert(0, str(workdir))
        os.environ["PYFIQ_REDIS_URL"] = url
        _refuse_the_developers_redis()
        import redis

        with contextlib.closing(redis.Redis.from_url(url)) as client:
            client.flushdb()
        source = for_the_suite(job["source"], url)
        if job.get("test_file"):
            import pytest

            (workdir / job["test_file"]).write_text(source)
            code = int(pytest.main(["-q", "-p", "no:cacheprovider", job["test_file"]]))
        else:
            scope = {"__name__": "__main__", "__file__": str(workdir / "snippet.py")}
            # Padded so that a traceback names the page and shows its own lines.
            exec(compile("\n" * job["line"] + source, job["file"], "exec"), scope)  # running the docs is the point
            code = 0
    except SystemExit as stop:
        code = 0 if stop.code in (None, 0) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code)  # leftover threads of the snippet must not hold the child open


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def run(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run every job of ``config``; job id -> ok, stdout, stderr, seconds."""
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    if threading.active_count() != 1:
        raise RuntimeError(f"a preloaded module started a thread; forking would copy it: {threading.enumerate()}")
    root = Path(config["workdir"])
    pending = list(config["jobs"])
    free = list(config["databases"])
    running: dict[int, tuple[dict[str, Any], int, float, Path]] = {}
    results: dict[str, dict[str, Any]] = {}
    while pending or running:
        while pending and free:
            job, db = pending.pop(0), free.pop(0)
            workdir = root / f"{len(results) + len(running):03d}"
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(job, f"{config['redis']}/{db}", workdir)
            running[pid] = (job, db, time.monotonic(), workdir)
        time.sleep(0.01)
        for pid, (job, db, started, workdir) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            late = not done and time.monotonic() - started > config["timeout"]
            if late:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            elif not done:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # anything the snippet left running
            del running[pid]
            free.append(db)
            stderr = _read(workdir / "stderr")
            if late:
                stderr += f"\n[killed after {config['timeout']} s: a snippet must end on its own]"
            results[job["id"]] = {
                "ok": not late and os.waitstatus_to_exitcode(status) == 0,
                "stdout": _read(workdir / "stdout"),
                "stderr": stderr,
                "seconds": round(time.monotonic() - started, 3),
            }
    return results


if __name__ == "__main__":
    jobs_path, results_path = sys.argv[1:3]
    Path(results_path).write_text(json.dumps(run(json.loads(Path(jobs_path).read_text()))))
