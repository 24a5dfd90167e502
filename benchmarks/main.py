"""``python -m benchmarks`` (or ``python scripts/bench.py``): the sections, in order, and the
command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import NamedTuple

from . import (
    cost,
    delays,
    drain,
    enqueue,
    idle,
    idle_foreign,
    latency,
    lease_load,
    memory,
    peers,
    requeue,
    reruns,
    results,
    takeover,
)
from .ceiling import measure_ceiling, report_ceiling
from .drain import run_drains
from .harness import PEERS, RedisServer, Report, Run, cleanup, log, machine, per_s, quiet_logging
from .idle import child_idle
from .latency import child_latency
from .peers import child_peer
from .requeue import child_probe

SECTIONS = (
    "ceiling",
    "drain",
    "cost",
    "enqueue",
    "peers",
    "reruns",
    "takeover",
    "lease-load",
    "idle",
    "memory",
    "latency",
    "results",
    "delays",
    "requeue",
    "idle-foreign",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=None, help="tasks per drain (default 20000, 200 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test); skips the 10000-queue idle case")
    p.add_argument("--skip-peers", action="store_true", help="do not run RQ, Dramatiq, Huey")
    p.add_argument("--only", default=None, help=f"comma-separated sections among {','.join(SECTIONS)}")
    p.add_argument("--json", default="bench-results.json", help="where to write the results (default %(default)s)")
    # Internal: this file re-runs itself as a child for the peers, the idle worker and the probe.
    p.add_argument("--child", choices=("peer", "idle", "probe", "latency"), help=argparse.SUPPRESS)
    p.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--queues", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    p.add_argument("--ceiling-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(SECTIONS)
        if unknown:
            p.error(f"unknown sections {sorted(unknown)}; choose among {','.join(SECTIONS)}")
    return args


#: Each section after the ceiling, in the order they run, by its module's ``section``.
SECTION_RUNS: dict[str, Callable[[Run], None]] = {
    "drain": drain.section,
    "cost": cost.section,
    "enqueue": enqueue.section,
    "peers": peers.section,
    "reruns": reruns.section,
    "takeover": takeover.section,
    "lease-load": lease_load.section,
    "idle": idle.section,
    "memory": memory.section,
    "latency": latency.section,
    "results": results.section,
    "delays": delays.section,
    "requeue": requeue.section,
    "idle-foreign": idle_foreign.section,
}


def selected_sections(args: argparse.Namespace) -> set[str]:
    selected = set(args.only.split(",")) if args.only else set(SECTIONS)
    if args.skip_peers or args.quick:
        selected.discard("peers")
    return selected


def describe_machine(report: Report, executable: str, n: int, quick: bool) -> None:
    mach = machine(executable)
    report.data["machine"] = mach
    report.data["command"] = shlex.join([os.path.basename(sys.executable), *sys.argv])
    report.data["tasks"] = n
    report.data["quick"] = quick
    print(
        f"machine: {mach['cpu']}, {mach['cores']} cores ({mach['usable_cores']} usable), {mach['os']}, "
        f"{mach['python']}, redis-server {mach['redis_server']}, redis-py {mach['versions']['redis']}, "
        f"hiredis {mach['versions']['hiredis']}, pyfiq {mach['versions']['pyfiq']}",
        flush=True,
    )


def run(args: argparse.Namespace, report: Report, workdir: Path) -> None:
    quick = args.quick
    n = args.tasks or (200 if quick else 20000)
    selected = selected_sections(args)
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not installed (e.g. apt-get install redis-server)")
    quiet_logging()
    describe_machine(report, executable, n, quick)
    # The baseline: a median of runs at the start, and (for the ratios) one run right before and
    # one right after each throughput measurement, since the machine's speed drifts.
    ceiling = CeilingPlan(*((0.2, 3, 2000) if quick else (1.5, 3, 50000)))
    server = RedisServer(executable, workdir / "redis", aof=False).start()
    try:
        log(f"ceiling on redis-server :{server.port} (no persistence)")
        c = measure_ceiling(server, ceiling.seconds, ceiling.runs, ceiling.requests)
        report.data["ceiling"] = c
        report_ceiling(report, "ceiling", c)
        ctx = Run(report, server, n, quick, 0.2 if quick else 1.0, workdir)
        for name, section in SECTION_RUNS.items():
            if name in selected:
                section(ctx)
        if not quick and selected - {"ceiling"}:
            log("ceiling again (drift check)")
            c_end = measure_ceiling(server, ceiling.seconds, 1, 0)
            report.data["ceiling_end"] = c_end
            report.row("ceiling", "redis-py EVALSHA at the end (drift)", per_s(c_end["evalsha_per_s"]))
    finally:
        server.stop()
    if "drain" in selected:
        drain_on_aof(report, executable, workdir, ceiling, n, 0.2 if quick else 1.0)


class CeilingPlan(NamedTuple):
    """How long each ceiling run lasts, how many make its median, and redis-benchmark's requests."""

    seconds: float
    runs: int
    requests: int


def drain_on_aof(
    report: Report, executable: str, workdir: Path, ceiling: CeilingPlan, n: int, ceiling_s: float
) -> None:
    """The drains again on a server with AOF (appendfsync everysec), against its own ceiling."""
    aof = RedisServer(executable, workdir / "redis-aof", aof=True).start()
    try:
        log(f"ceiling on redis-server :{aof.port} (appendonly yes, appendfsync everysec)")
        c = measure_ceiling(aof, ceiling.seconds, ceiling.runs, ceiling.requests)
        report.data["ceiling_aof"] = c
        report_ceiling(report, "ceiling AOF", c)
        c_client = c.get("redis_benchmark_evalsha_per_s")
        report.data["drain_aof"] = run_drains(report, "drain AOF", aof, n, ceiling_s, c_client)
    finally:
        aof.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "peer":
        child_peer(args)
        return 0
    if args.child == "idle":
        child_idle(args)
        return 0
    if args.child == "probe":
        child_probe(args)
        return 0
    if args.child == "latency":
        child_latency(args)
        return 0

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    report = Report()
    started = perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="pyfiq-bench-") as tmp:
            try:
                run(args, report, Path(tmp))
            finally:
                cleanup()
    finally:
        report.data["wall_seconds"] = perf_counter() - started
        Path(args.json).write_text(json.dumps(report.data, indent=2, default=str) + "\n")
    print()
    print(report.table())
    print(f"\n{report.data['command']}: {report.data['wall_seconds']:.0f} s; JSON in {args.json}")
    return 0
