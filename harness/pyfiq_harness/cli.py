"""The scenario runner's command line: ``run``, ``producer``, ``check``, ``enqueue-drill``,
``time-drill`` and ``health``."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import click
import redis

from pyfiq.backend.backend import RedisQueueBackend
from pyfiq.config import Settings
from pyfiq.ops.scenario_tasks import (
    QUEUES,
)

from . import time_drill
from .enqueue_drill import FAULTS, run_enqueue_drill
from .facts import read_accepted
from .journal import Event
from .producers import MAX_DELAY, MIN_DELAY, produce
from .profiles import FAULT_KINDS, PROFILES
from .scenario import _wait_drained, read_dead_letters, run_scenario
from .time_drill import PARTS as TIME_PARTS
from .verdict import verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """The pyfiq scenario runner: replicas, producers, faults and a checker."""


def _queues_option(f: Any) -> Any:
    return click.option(
        "--queues",
        default=",".join(QUEUES),
        show_default=True,
        help="Comma-separated scenario queues.",
    )(f)


@cli.command("run")
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="short", show_default=True)
@click.option("--redis", "url", default=None, help="Use this Redis instead of starting one (no Redis faults then).")
@click.option("--aof", type=click.Choice(["everysec", "always", "both"]), default="both", show_default=True,
              help="appendfsync of the Redis the runner starts; 'both' switches after each crash.")  # fmt: skip
@click.option("--replicas", type=click.IntRange(2, 32), default=None, help="Override the profile's replica count.")
@click.option("--queues", "queue_count", type=click.IntRange(1, 64), default=None, help="Override the queue count.")
@click.option("--producers", type=click.IntRange(1, 16), default=None, help="Override the producer count.")
@click.option("--duration", type=float, default=None, help="Bound of the fault phase in seconds.")
@click.option("--max-faults", type=int, default=None, help="Bound of the number of faults.")
@click.option("--faults", default=None, help=f"Comma-separated fault kinds among {', '.join(FAULT_KINDS)}.")
@click.option("--driver", type=click.Choice(["threaded", "asyncio", "mixed"]), default=None,
              help="Replica drivers (default: the profile's, mixed for short and soak).")  # fmt: skip
@click.option("--dir", "run_dir", type=click.Path(path_type=Path), default=None, help="Where journals and logs go.")
@click.option("--seed", type=int, default=None)
def run_command(
    profile_name: str,
    url: str | None,
    aof: str,
    replicas: int | None,
    queue_count: int | None,
    producers: int | None,
    duration: float | None,
    max_faults: int | None,
    faults: str | None,
    driver: str | None,
    run_dir: Path | None,
    seed: int | None,
) -> None:
    """Run a fault-injection scenario and check it; exit status 0 means no breach."""
    profile = PROFILES[profile_name]
    changes: dict[str, Any] = {}
    for key, value in (
        ("replicas", replicas),
        ("queues", queue_count),
        ("producers", producers),
        ("duration", duration),
        ("max_faults", max_faults),
    ):
        if value is not None:
            changes[key] = value
    if changes:
        profile = replace(profile, **changes)
    kinds = None
    if faults:
        kinds = [k.strip() for k in faults.split(",") if k.strip()]
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise click.BadParameter(f"unknown fault kinds {sorted(unknown)}", param_hint="--faults")
    result = run_scenario(
        profile, redis_url=url, aof=aof, run_dir=run_dir, seed=seed, driver=driver, kinds=kinds, echo=click.echo
    )
    click.echo(result.verdict.text())
    sys.exit(0 if result.verdict.ok else 1)


@cli.command("producer")
@click.option("--redis", "url", default=lambda: os.environ.get("PYFIQ_REDIS_URL", "redis://localhost:6379/0"),
              show_default="$PYFIQ_REDIS_URL or redis://localhost:6379/0")  # fmt: skip
@click.option("--prefix", default="pyfiq-scenario", show_default=True)
@click.option("--shards", default=4, show_default=True, type=click.IntRange(1, 16384))
@_queues_option
@click.option("--count", default=200, show_default=True, type=click.IntRange(1), help="Tasks per queue.")
@click.option("--rate", default=50.0, show_default=True, type=float, help="Enqueues per second (0: no pause).")
@click.option("--hold", default=0.02, show_default=True, type=float, help="Seconds each task sleeps.")
@click.option("--dir", "journal_dir", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Directory of the acceptance journal.")  # fmt: skip
@click.option("--max-seconds", default=600.0, show_default=True, type=float)
@click.option("--fail-every", default=97, show_default=True, type=int, help="Every Nth task fails once (0: none).")
@click.option("--delayed", default=0.2, show_default=True, type=click.FloatRange(0.0, 1.0),
              help=f"Share of tasks enqueued with a delay of {MIN_DELAY}-{MAX_DELAY} s.")  # fmt: skip
def producer_command(
    url: str,
    prefix: str,
    shards: int,
    queues: str,
    count: int,
    rate: float,
    hold: float,
    journal_dir: Path,
    max_seconds: float,
    fail_every: int,
    delayed: float,
) -> None:
    """Enqueue journaled scenario tasks, recording each acceptance; SIGTERM ends it cleanly."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    journal_dir.mkdir(parents=True, exist_ok=True)
    producer, accepted = produce(
        url,
        prefix=prefix,
        shards=shards,
        queues=[q for q in queues.split(",") if q],
        count=count,
        rate=rate,
        hold=hold,
        journal_dir=journal_dir,
        max_seconds=max_seconds,
        fail_every=fail_every,
        delayed=delayed,
        stop=stop,
    )
    click.echo(f"producer {producer}: {accepted} tasks accepted")


@cli.command("check")
@click.option("--redis", "url", default=lambda: os.environ.get("PYFIQ_REDIS_URL", "redis://localhost:6379/0"),
              show_default="$PYFIQ_REDIS_URL or redis://localhost:6379/0")  # fmt: skip
@click.option("--prefix", default="pyfiq-scenario", show_default=True)
@click.option("--shards", default=4, show_default=True, type=click.IntRange(1, 16384))
@click.option("--dir", "run_dir", type=click.Path(path_type=Path), required=True,
              help="Directory holding executions.jsonl and accepted-*.jsonl (and faults.jsonl if any).")  # fmt: skip
@click.option("--lease-ttl", default=10.0, show_default=True, type=float)
@click.option("--poll-interval", default=1.0, show_default=True, type=float)
@click.option("--drain-timeout", default=120.0, show_default=True, type=float, help="Wait this long for the queues.")
@click.option("--offline", is_flag=True, help="Check the journals only (no Redis: dead letters and leftovers unknown).")
def check_command(
    url: str,
    prefix: str,
    shards: int,
    run_dir: Path,
    lease_ttl: float,
    poll_interval: float,
    drain_timeout: float,
    offline: bool,
) -> None:
    """Wait until the queues drain, then check the journals; exit status 0 means no breach."""
    queues = sorted({e["queue"] for e in read_accepted(run_dir)}) if run_dir.is_dir() else []
    if not queues:
        click.echo(f"no accepted tasks in {run_dir}: nothing to check")
        sys.exit(1)
    remaining: dict[str, int] | None = None
    dead_letters: list[Event] | None = None
    if not offline:
        backend = RedisQueueBackend(url, Settings(prefix=prefix, shards=shards))
        try:
            remaining = _wait_drained(backend, queues, drain_timeout)
            time.sleep(0.5)  # the last end lines are written after the acknowledgement
            dead_letters = read_dead_letters(backend, queues)
        except redis.RedisError as exc:
            click.echo(f"Redis at {url} unreachable: {exc} (use --offline to check the journals alone)")
            sys.exit(1)
        finally:
            backend.close()
    verdict = verify(
        run_dir, lease_ttl=lease_ttl, poll_interval=poll_interval, remaining=remaining, dead_letters=dead_letters
    )
    click.echo(verdict.text())
    sys.exit(0 if verdict.ok else 1)


@cli.command("enqueue-drill")
@click.option("--faults", default=",".join(FAULTS), show_default=True, help="Comma-separated producer faults.")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True, help="Rounds of each fault.")
@click.option("--calls", type=click.IntRange(1), default=60, show_default=True, help="Calls per producer a round.")
@click.option("--dir", "run_dir", type=click.Path(path_type=Path), required=True, help="Where journals and logs go.")
@click.option("--seed", type=int, default=None)
def enqueue_drill_command(faults: str, rounds: int, calls: int, run_dir: Path, seed: int | None) -> None:
    """Enqueue under producer faults (a cancelled or interrupted caller, a fork, a stalled
    replica in durable mode) and hold every call's outcome to what Redis stored; exit status 0
    means no breach."""
    kinds = tuple(k.strip() for k in faults.split(",") if k.strip())
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        raise click.BadParameter(f"unknown faults {sorted(unknown)}", param_hint="--faults")
    verdicts = run_enqueue_drill(run_dir, faults=kinds, rounds=rounds, calls=calls, seed=seed)
    for verdict in verdicts:
        click.echo(verdict.text())
    sys.exit(0 if all(v.ok for v in verdicts) else 1)


@cli.command("time-drill")
@click.option("--dir", "run_dir", type=click.Path(path_type=Path), required=True, help="Where journals and logs go.")
@click.option("--seconds", type=click.IntRange(5), default=30, show_default=True, help="Length of the ticks part.")
@click.option("--parts", default=",".join(TIME_PARTS), show_default=True, help="Comma-separated parts to run.")
@click.option("--seed", type=int, default=1, show_default=True)
def time_drill_command(run_dir: Path, seconds: int, parts: str, seed: int) -> None:
    """A periodic schedule and delayed tasks across SIGKILLed replicas, shifted wall clocks, a
    forgotten record and a rolling deploy (``pyfiq_harness.time_drill``); exit status 0 means
    no breach."""
    time_drill.main.callback(run_dir, seconds, parts, seed)  # type: ignore[misc]


@cli.command("health")
@click.option("--redis", "url", default=lambda: os.environ.get("PYFIQ_REDIS_URL", "redis://localhost:6379/0"),
              show_default="$PYFIQ_REDIS_URL or redis://localhost:6379/0")  # fmt: skip
@click.option("--pid", type=int, default=None, help="Also require this process to be a running pyfiq replica.")
def health_command(url: str, pid: int | None) -> None:
    """Exit 0 if Redis answers PING (and process PID is a live pyfiq worker): a healthcheck."""
    if pid is not None:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            click.echo(f"no process {pid}", err=True)
            sys.exit(1)
        if b"pyfiq" not in argv or b"worker" not in argv:
            click.echo(f"process {pid} is not a pyfiq worker: {argv!r}", err=True)
            sys.exit(1)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        click.echo(f"redis unreachable: {exc}", err=True)
        sys.exit(1)
    finally:
        client.close()


if __name__ == "__main__":
    cli()
