"""Time under faults: a periodic schedule and delayed tasks across real replica processes.

``python -m pyfiq_harness.time_drill --dir D`` runs three parts against a redis-server of its own,
each replica a ``python -m pyfiq worker pyfiq_harness.time_replica`` process:

- ``ticks``: five replicas fire a 1 s schedule for ``seconds`` s, two of them with their wall
  clock shifted (one ahead, one behind, by the clock shim), while replicas are SIGKILLed and
  started again one at a time, and an operator forgets the schedule's record once. Every tick of
  the window is enqueued exactly once (one task id) and ran; none was enqueued before its tick
  by Redis's clock, or a tick or more late.
- ``deploy``: a rolling deploy from version 1 to version 2 of the schedule, one replica at a
  time. No tick is enqueued twice, none is missing, and once a version-2 replica has fired a
  tick no version-1 replica fires another.
- ``delayed``: delayed tasks are enqueued, every replica is SIGKILLed before any falls due, and
  new replicas start after all are due. Each ran, and none started before its due time.

The judge reads the journal the replicas write (``time_replica``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import redis

from pyfiq import RedisQueueBackend
from pyfiq.functions import Registry

from .clock import CLOCK_SHIFT_ENV, build_clock_shim
from .servers import RedisProcess, popen, wait_for

PARTS = ("ticks", "deploy", "delayed")
#: What the drill tells its replicas (``time_replica``), and the names they register.
JOURNAL_ENV = "PYFIQ_TIME_JOURNAL"
VERSION_ENV = "PYFIQ_TIME_VERSION"
EVERY_ENV = "PYFIQ_TIME_EVERY"
TICK_QUEUE = "time-ticks"
DELAYED_QUEUE = "time-delayed"
SCHEDULE = "time-drill"
#: The shifted replicas' wall clocks, in ms (one ahead, one behind).
SHIFTS = (4_000, -4_000)
#: How late a tick's task may be enqueued: later than this, a replica held it back.
LATE_MS = 1_000


@dataclass
class PartVerdict:
    part: str
    breaches: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.breaches


class Replicas:
    """Replica processes by name, each started again under the same name after a kill."""

    def __init__(self, directory: Path, url: str, prefix: str, journal: Path) -> None:
        self.directory, self.url, self.prefix, self.journal = directory, url, prefix, journal
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = 0

    def start(self, name: str, *, version: int = 0, shift_ms: int = 0, driver: str = "threaded") -> None:
        argv = [
            sys.executable, "-m", "pyfiq", "worker", "pyfiq_harness.time_replica",
            "--redis", self.url, "--prefix", self.prefix, "--shards", "4",
            "--queues", f"{TICK_QUEUE},{DELAYED_QUEUE}", "--lease-ttl", "2", "--poll-interval", "0.5",
            "--concurrency", "2", "--driver", driver, "--log-level", "warning",
        ]  # fmt: skip
        env = {**os.environ, JOURNAL_ENV: str(self.journal), VERSION_ENV: str(version), EVERY_ENV: "1"}
        if shift_ms:
            env |= {"LD_PRELOAD": str(build_clock_shim()), CLOCK_SHIFT_ENV: str(shift_ms)}
        self.starts += 1
        log = self.directory / f"{name}.{self.starts}.log"
        with open(log, "wb") as out:
            proc = popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        wait_for(lambda: " ready" in log.read_text(errors="replace") or proc.poll() is not None, 30, f"{name} ready")
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited while starting:\n{log.read_text(errors='replace')}")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def drained(client: redis.Redis, backend: RedisQueueBackend, queue: str) -> bool:
    info = backend.queue_info(queue)
    return not (info["pending"] or info["inflight"])


# -- the judge ------------------------------------------------------------------------------


def judge_ticks(lines: list[dict[str, Any]], start: int, end: int, killed: set[int]) -> Iterator[str]:
    """Every whole second T with start <= T < end was enqueued once (one task id) and ran, not
    before T nor LATE_MS or more after it. A task that ran twice is a breach unless the process
    that first ran it was SIGKILLed (its acknowledgement may have been lost)."""
    runs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        if line["kind"] == "tick":
            runs[line["tick"]].append(line)
    for tick in range(start, end, 1000):
        found = runs.get(tick, [])
        if not found:
            yield f"tick {tick} never ran"
            continue
        tasks = {r["task"] for r in found}
        if len(tasks) > 1:
            yield f"tick {tick} was enqueued {len(tasks)} times: {sorted(tasks)}"
        if len(found) > len(tasks) and found[0]["pid"] not in killed:
            yield f"tick {tick} ran {len(found)} times without a crash of the replica that ran it"
        enqueued = found[0]["enqueued_ms"]
        if enqueued < tick:
            yield f"tick {tick} was enqueued {tick - enqueued} ms early (Redis's clock)"
        elif enqueued - tick >= LATE_MS:
            yield f"tick {tick} was enqueued {enqueued - tick} ms late"
    for tick in runs:
        if tick % 1000:
            yield f"a task for {tick}, which is not a tick of the schedule"


def judge_deploy(lines: list[dict[str, Any]], start: int, end: int) -> Iterator[str]:
    """No tick twice, none missing in the window, and no version-1 tick after a version-2 one."""
    ticks = [line for line in lines if line["kind"] == "tick"]
    tasks: dict[int, set[str]] = defaultdict(set)
    for line in ticks:
        tasks[line["tick"]].add(line["task"])
    for tick, ids in sorted(tasks.items()):
        if len(ids) > 1:
            yield f"tick {tick} was enqueued {len(ids)} times"
    for tick in range(start, end, 1000):
        if tick not in tasks:
            yield f"tick {tick} never ran during the deploy"
    first_v2 = min((line["tick"] for line in ticks if line["version"] == 2), default=None)
    if first_v2 is None:
        yield "no version-2 replica ever fired"
        return
    for line in ticks:
        if line["version"] == 1 and line["tick"] > first_v2:
            yield f"version 1 fired tick {line['tick']} after version 2 fired {first_v2}"


def judge_delayed(lines: list[dict[str, Any]], due: dict[int, int]) -> Iterator[str]:
    started: dict[int, list[int]] = defaultdict(list)
    for line in lines:
        if line["kind"] == "delayed":
            started[line["seq"]].append(line["started_ms"])
    for seq, due_ms in sorted(due.items()):
        if not started.get(seq):
            yield f"delayed task {seq} never ran"
        elif min(started[seq]) < due_ms:
            yield f"delayed task {seq} started {due_ms - min(started[seq])} ms before it was due"


# -- the parts ------------------------------------------------------------------------------


def part_ticks(directory: Path, url: str, seconds: int, rng: random.Random) -> PartVerdict:
    journal = directory / "ticks.jsonl"
    replicas = Replicas(directory, url, "time-ticks", journal)
    client = redis.Redis.from_url(url)
    backend = RedisQueueBackend(url, prefix="time-ticks", shards=4)
    names = [f"replica-{i}" for i in range(5)]
    shift = {"replica-0": SHIFTS[0], "replica-1": SHIFTS[1]}
    driver = {"replica-3": "asyncio", "replica-4": "asyncio"}
    killed: set[int] = set()
    kills = 0
    try:
        for name in names:
            replicas.start(name, shift_ms=shift.get(name, 0), driver=driver.get(name, "threaded"))
        now = redis_ms(client)
        start = now - now % 1000 + 2000
        end = start + seconds * 1000
        forget_at = start + seconds * 1000 // 2 + rng.randrange(1000)
        forgotten = False
        while redis_ms(client) < end:
            time.sleep(rng.uniform(1.5, 3.0))
            if not forgotten and redis_ms(client) >= forget_at:
                # An operator forgets the record mid-interval: the live replicas fire on.
                forgotten = backend.admin.forget_schedule(SCHEDULE)
            victim = rng.choice(sorted(replicas.procs))
            killed.add(replicas.procs[victim].pid)
            replicas.kill(victim)
            kills += 1
            time.sleep(rng.uniform(0.2, 1.5))
            replicas.start(victim, shift_ms=shift.get(victim, 0), driver=driver.get(victim, "threaded"))
        wait_for(lambda: drained(client, backend, TICK_QUEUE), 30, "the tick tasks to drain")
    finally:
        replicas.close()
        backend.close()
    lines = read_journal(journal)
    window = [line for line in lines if line["kind"] == "tick" and start <= line["tick"] < end]
    late = sorted(line["enqueued_ms"] - line["tick"] for line in window)
    facts = {
        "ticks": seconds,
        "executions": len(window),
        "distinct_ticks": len({line["tick"] for line in window}),
        "kills": kills,
        "forgotten": forgotten,
        "lateness_ms_p50": late[len(late) // 2] if late else None,
        "lateness_ms_max": late[-1] if late else None,
        "fired_by_shifted": sum(1 for line in window if line["shift"]),
    }
    return PartVerdict("ticks", list(judge_ticks(lines, start, end, killed)), facts)


def part_deploy(directory: Path, url: str, rng: random.Random) -> PartVerdict:
    journal = directory / "deploy.jsonl"
    replicas = Replicas(directory, url, "time-deploy", journal)
    client = redis.Redis.from_url(url)
    backend = RedisQueueBackend(url, prefix="time-deploy", shards=4)
    names = [f"replica-{i}" for i in range(3)]
    try:
        for name in names:
            replicas.start(name, version=1)
        now = redis_ms(client)
        start = now - now % 1000 + 2000
        time.sleep(3.0)
        for name in names:  # one at a time, as a rolling deploy does
            replicas.stop(name)
            replicas.start(name, version=2)
            time.sleep(rng.uniform(1.0, 2.0))
        now = redis_ms(client)
        end = now - now % 1000 - 1000
        time.sleep(1.0)
        wait_for(lambda: drained(client, backend, TICK_QUEUE), 30, "the tick tasks to drain")
    finally:
        replicas.close()
        backend.close()
    lines = read_journal(journal)
    window = [line for line in lines if line["kind"] == "tick"]
    facts = {
        "v1_ticks": sum(line["version"] == 1 for line in window),
        "v2_ticks": sum(line["version"] == 2 for line in window),
    }
    return PartVerdict("deploy", list(judge_deploy(lines, start, end)), facts)


def part_delayed(directory: Path, url: str, rng: random.Random, tasks: int = 20) -> PartVerdict:
    journal = directory / "delayed.jsonl"
    replicas = Replicas(directory, url, "time-delayed", journal)
    client = redis.Redis.from_url(url)
    backend = RedisQueueBackend(url, prefix="time-delayed", shards=4)
    registry = Registry(backend)

    @registry.fifo(DELAYED_QUEUE, name="time.delayed")
    def delayed(seq: int) -> None: ...

    due: dict[int, int] = {}
    try:
        for name in ("replica-0", "replica-1"):
            replicas.start(name)
        for seq in range(tasks):
            handle = delayed.send_with_options(args=(seq,), delay=rng.uniform(1.0, 3.0))
            when = handle.status().due
            assert when is not None
            due[seq] = round(when.timestamp() * 1000)
        for name in list(replicas.procs):
            replicas.kill(name)  # every replica down before the first task falls due
        early = [line for line in read_journal(journal) if line["kind"] == "delayed"]
        wait_for(lambda: redis_ms(client) > max(due.values()) + 500, 10, "every task to fall due")
        for name in ("replica-0", "replica-1"):
            replicas.start(name)
        wait_for(lambda: drained(client, backend, DELAYED_QUEUE), 30, "the delayed tasks to run")
    finally:
        replicas.close()
        backend.close()
    lines = read_journal(journal)
    breaches = list(judge_delayed(lines, due))
    if early:
        breaches.append(f"{len(early)} delayed task(s) ran before every replica was killed, ahead of their due time")
    runs = [line for line in lines if line["kind"] == "delayed"]
    return PartVerdict("delayed", breaches, {"tasks": tasks, "runs": len(runs)})


def run_time_drill(
    directory: Path, *, seconds: int = 30, parts: tuple[str, ...] = PARTS, seed: int = 1
) -> list[PartVerdict]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    server = RedisProcess(directory / "redis", appendfsync=None).start()
    try:
        out = []
        if "ticks" in parts:
            out.append(part_ticks(directory, server.url, seconds, rng))
        if "deploy" in parts:
            out.append(part_deploy(directory, server.url, rng))
        if "delayed" in parts:
            out.append(part_delayed(directory, server.url, rng))
        return out
    finally:
        server.stop(kill=True)


__all__ = ["PARTS", "SCHEDULE", "PartVerdict", "run_time_drill"]


@click.command()
@click.option("--dir", "run_dir", type=click.Path(path_type=Path), required=True, help="Where journals and logs go.")
@click.option("--seconds", type=click.IntRange(5), default=30, show_default=True, help="Length of the ticks part.")
@click.option("--parts", default=",".join(PARTS), show_default=True, help="Comma-separated parts to run.")
@click.option("--seed", type=int, default=1, show_default=True)
def main(run_dir: Path, seconds: int, parts: str, seed: int) -> None:
    """Run the time drill; exit status 0 means no breach."""
    chosen = tuple(p.strip() for p in parts.split(",") if p.strip())
    if unknown := set(chosen) - set(PARTS):
        raise click.BadParameter(f"unknown parts {sorted(unknown)}", param_hint="--parts")
    verdicts = run_time_drill(run_dir, seconds=seconds, parts=chosen, seed=seed)
    for verdict in verdicts:
        click.echo(json.dumps({"part": verdict.part, "ok": verdict.ok, **verdict.facts, "breaches": verdict.breaches}))
    sys.exit(0 if all(v.ok for v in verdicts) else 1)


if __name__ == "__main__":
    main()
