"""One scenario run, step by step: Redis and the fault proxies, the fleet, the producers, the
faults, the drain and the verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import redis

from pyfiq.backend.backend import RedisQueueBackend
from pyfiq.config import Settings
from pyfiq.engine.ticks import TICK_HEADER
from pyfiq.errors import DecodeError
from pyfiq.ops.scenario_tasks import (
    EXTRA_QUEUES_ENV,
    JOURNAL_ENV,
    QUEUES,
    TICK_QUEUE,
    TICK_SCHEDULE,
    TICKS_ENV,
    queue_names,
)
from pyfiq.task import Entry, TaskRecord

from .facts import Verdict
from .fleet import Fleet, replica_argv
from .injector import Injector
from .journal import DEAD_LETTERS, EXECUTIONS, FAULTS, TICKS, Event, JournalTail
from .producers import producer_argv
from .profiles import Profile
from .proxy import FaultProxy
from .replica import DRILL_ENV
from .servers import RedisProcess, popen, require_loopback
from .verdict import verify


@dataclass
class Result:
    """One scenario run: its verdict, where its journals and logs are, and how long it took."""

    verdict: Verdict
    run_dir: Path
    profile: Profile
    wall_s: float


class Scenario:
    """One scenario run, step by step: start Redis and the fault proxies, the fleet and the
    producers, wait for work, inject the faults, stop the producers, drain, collect what only
    Redis and the fleet know, tear everything down, and judge the journals (``run`` does all)."""

    # Set by the steps that start them.
    observer: RedisQueueBackend
    tail: JournalTail
    injector: Injector

    def __init__(
        self,
        profile: Profile,
        *,
        redis_url: str | None = None,
        aof: str = "both",
        run_dir: Path | None = None,
        seed: int | None = None,
        driver: str | None = None,
        kinds: Sequence[str] | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.started = time.monotonic()
        if kinds and profile.schedule is not None and not set(kinds) & set(profile.schedule):
            # A fixed schedule without any of the kinds asked for: each of them once instead.
            profile = replace(profile, schedule=tuple(kinds), max_faults=max(profile.max_faults, len(kinds)))
        self.profile = profile
        #: Someone else's Redis, or None: the run starts its own (and may restart it as a fault).
        self.redis_url = redis_url
        self.url = redis_url or ""
        self.kinds = kinds
        self.echo = echo
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="pyfiq-scenario-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        self.rng = random.Random(seed)
        self.aof_modes = ["everysec", "always"] if aof == "both" else [aof]
        self.queues = queue_names(profile.queues)
        self.prefix = f"scenario-{uuid.uuid4().hex[:8]}"
        self.journal = self.run_dir / EXECUTIONS
        self.names = [f"replica-{i + 1}" for i in range(profile.replicas)]
        driver = driver or profile.driver
        self.drivers = ["threaded", "asyncio"] if driver == "mixed" else [driver]
        self.stack = contextlib.ExitStack()
        self.redis_proc: RedisProcess | None = None
        self.proxies: dict[str, FaultProxy] = {}
        self.db = "/0"
        self.env = self._replica_env()
        self.fleet = Fleet(self._replica_argv, self.env, self.run_dir / "logs")
        self.producers: list[subprocess.Popen[bytes]] = []
        # What the run found, for the checker.
        self.producer_failures: list[str] = []
        self.remaining: dict[str, int] = {}
        self.dead_letters: list[Event] = []
        self.log_counts: dict[str, int] = {}
        self.unexpected: list[Event] = []
        #: When every replica was first ready, and when the queues drained (the window in which
        #: the fleet ran the periodic schedule).
        self.t_ready = self.t_drained = 0.0

    def run(self) -> Result:
        """Every step in order; whatever was started is torn down even if a step fails."""
        try:
            self.start_redis()
            self.start_proxies()
            self.start_fleet()
            self.start_producers()
            self.wait_for_work()
            self.inject_faults()
            self.stop_producers()
            self.drain()
            self.collect()
        finally:
            self.tear_down()
        return self.judge()

    def start_redis(self) -> None:
        """Start the run's own redis-server (AOF), unless it was given one."""
        if self.redis_url is None:
            self.redis_proc = RedisProcess(self.run_dir / "redis", appendfsync=self.aof_modes[0]).start()
            self.stack.callback(self.redis_proc.stop, kill=True)
            self.url = self.redis_proc.url

    def start_proxies(self) -> None:
        """Put a fault proxy between each replica and Redis, if Redis is on loopback (else no
        network faults)."""
        parsed = urlparse(self.url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        try:
            require_loopback(host)
            loopback = parsed.scheme == "redis"
        except ValueError:
            loopback = False
        if loopback:
            for name in self.names:
                self.proxies[name] = FaultProxy(port, host).start()
                self.stack.callback(self.proxies[name].close)
        self.db = parsed.path or "/0"

    def driver_of(self, name: str) -> str:
        """``threaded`` or ``asyncio``: the profile's mix, replica by replica."""
        return self.drivers[self.names.index(name) % len(self.drivers)]

    def ack_mode_of(self, name: str) -> str:
        """Acknowledgement modes alternate after each round of drivers, so that a fleet of
        four mixed replicas runs every driver with both ``group`` and ``inline``."""
        return ("group", "inline")[self.names.index(name) // len(self.drivers) % 2]

    def _replica_argv(self, name: str) -> list[str]:
        url = f"redis://127.0.0.1:{self.proxies[name].port}{self.db}" if name in self.proxies else self.url
        p = self.profile
        return replica_argv(
            url,
            prefix=self.prefix,
            shards=p.shards,
            queues=[*self.queues, TICK_QUEUE] if p.tick_every else self.queues,
            lease_ttl=p.lease_ttl,
            poll_interval=p.poll_interval,
            max_deliveries=p.max_deliveries,
            concurrency=p.concurrency,
            driver=self.driver_of(name),
            name=name,
            ack_mode=self.ack_mode_of(name),
        )

    def _replica_env(self) -> dict[str, str]:
        """The environment of replicas and producers: the journal, the drills, unbuffered logs."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYFIQ_ECHO",)}
        env[JOURNAL_ENV] = str(self.journal)
        env[DRILL_ENV] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        extra = [q for q in self.queues if q not in QUEUES]
        if extra:
            env[EXTRA_QUEUES_ENV] = ",".join(extra)
        if self.profile.tick_every:
            env[TICKS_ENV] = str(self.profile.tick_every)
        return env

    def start_fleet(self) -> None:
        """Start every replica and wait until each is ready; also the runner's own client (the
        faults that write to Redis, the drain, the dead letters)."""
        p = self.profile
        self.stack.callback(self.fleet.close)
        self.observer = RedisQueueBackend(
            self.url,
            Settings(prefix=self.prefix, shards=p.shards, lease_ttl=p.lease_ttl, poll_interval=p.poll_interval),
        )
        self.stack.callback(self.observer.close)
        self.echo(
            f"run {self.prefix} in {self.run_dir}: {p.replicas} replicas ({'/'.join(self.drivers)}, "
            f"acknowledging {'/'.join(sorted({self.ack_mode_of(n) for n in self.names}))}), "
            f"{len(self.queues)} queues, {p.producers} producers, lease TTL {p.lease_ttl}s, redis {self.url}"
            + ("" if self.proxies else " (no network faults: Redis is not on loopback)")
        )
        for name in self.names:
            self.fleet.spawn(name)
        self.fleet.wait_ready(self.names)
        self.t_ready = time.time()

    def start_producers(self) -> None:
        """Start the producer processes (the compose ``producer`` command), each with its log."""
        p = self.profile
        for i in range(p.producers):
            argv = producer_argv(
                self.url,
                prefix=self.prefix,
                shards=p.shards,
                queues=self.queues,
                count=10**7,
                rate=p.rate,
                hold=p.hold,
                journal_dir=self.run_dir,
                max_seconds=p.duration + 30,
                fail_every=p.fail_every,
                delayed=p.delayed,
            )
            with open(self.run_dir / "logs" / f"producer-{i}.log", "wb") as out:
                self.producers.append(popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT))
        self.stack.callback(self._kill_producers)

    def _kill_producers(self) -> None:
        for proc in self.producers:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def wait_for_work(self) -> None:
        """Wait until the fleet has done some work on every queue, so faults hit a busy fleet."""
        self.tail = JournalTail(self.journal)
        deadline = time.monotonic() + 20
        while self.tail.ends < 10 * len(self.queues):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no work got done; see {self.run_dir}/logs")
            time.sleep(0.05)
            self.tail.poll()

    def inject_faults(self) -> None:
        """Inject the profile's faults (those this setup can inject) until its bounds."""
        p = self.profile
        self.injector = Injector(
            profile=p,
            fleet=self.fleet,
            names=self.names,
            proxies=self.proxies,
            redis_proc=self.redis_proc,
            aof_modes=self.aof_modes,
            tail=self.tail,
            faults_path=self.run_dir / FAULTS,
            rng=self.rng,
            echo=self.echo,
            backend=self.observer,
            queues=self.queues,
            drivers={name: self.driver_of(name) for name in self.names},
            producers=self.producers,
        )
        if self.kinds:
            wanted = self.injector.available(self.kinds)
        elif p.schedule is not None:
            wanted = self.injector.available(dict.fromkeys(p.schedule))
        else:  # the random mix: the kinds the profile weighs
            wanted = self.injector.available(k for k, w in p.weights if w > 0)
        if p.schedule is not None:
            self.echo(f"faults: fixed schedule {', '.join(k for k in p.schedule if k in wanted)}")
        else:
            self.echo(f"faults: random, of {', '.join(wanted)}")
        self.injector.run(wanted, time.time() + p.duration)
        self.echo(f"injected: {dict(self.injector.done)}")

    def stop_producers(self) -> None:
        """Stop the producers gracefully (SIGTERM ends the loop after the current enqueue); one
        that does not end cleanly is a breach."""
        for proc in self.producers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for i, proc in enumerate(self.producers):
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = None
            if rc != 0:
                log = (self.run_dir / "logs" / f"producer-{i}.log").read_text(errors="replace")[-1500:]
                self.producer_failures.append(f"producer {i} ended with {rc}: {log}")

    def drain(self) -> None:
        """Wait until the queues are empty, then stop every replica gracefully, which hands
        every lease over."""
        streams = [*self.queues, *self.injector.streams, *([TICK_QUEUE] if self.profile.tick_every else [])]
        self.remaining = _wait_drained(self.observer, streams, self.profile.drain_timeout, self.fleet)
        self.t_drained = time.time()
        self.fleet.reap()
        for name in self.names:
            if self.fleet.alive(name):
                self.fleet.terminate(name, timeout=15)

    def collect(self) -> None:
        """Keep what only Redis and the fleet know (dead letters, log markers, unexpected
        exits), and leave nothing of the run in a Redis that is not the run's own."""
        self.dead_letters = read_dead_letters(self.observer, self.queues)
        (self.run_dir / DEAD_LETTERS).write_text("".join(json.dumps(d) + "\n" for d in self.dead_letters))
        self.log_counts = self.fleet.log_counts()
        self.unexpected = list(self.fleet.unexpected)
        if self.profile.tick_every:
            ticks = read_ticks(self.observer, TICK_QUEUE, TICK_SCHEDULE)
            ticks |= {"every_ms": round(self.profile.tick_every * 1000), "window": [self.t_ready, self.t_drained]}
            (self.run_dir / TICKS).write_text(json.dumps(ticks))
        if self.redis_url is not None:
            with contextlib.suppress(redis.RedisError):
                keys = list(self.observer.client.scan_iter(match=f"{self.prefix}:*", count=1000))
                for i in range(0, len(keys), 500):
                    self.observer.client.delete(*keys[i : i + 500])

    def tear_down(self) -> None:
        """End whatever the steps started, last started first: producers, the runner's client,
        replicas, proxies, Redis."""
        self.stack.close()

    def judge(self) -> Result:
        """Check the journals (``verify``), add what only the runner saw (faults it could not
        inject, producers that failed), and write ``verdict.json``."""
        verdict = verify(
            self.run_dir,
            lease_ttl=self.profile.lease_ttl,
            poll_interval=self.profile.poll_interval,
            remaining=self.remaining,
            unexpected_exits=self.unexpected,
            log_counts=self.log_counts,
            dead_letters=self.dead_letters,
        )
        verdict.breaches += [f"fault injection failed: {msg}" for msg in self.injector.errors]
        verdict.breaches += self.producer_failures
        verdict.ok = not verdict.breaches
        verdict.stats["wall_s"] = round(time.monotonic() - self.started, 1)
        verdict.lines.append(f"wall time: {verdict.stats['wall_s']}s; journals and logs: {self.run_dir}")
        (self.run_dir / "verdict.json").write_text(
            json.dumps({"ok": verdict.ok, "breaches": verdict.breaches, "stats": verdict.stats}, indent=2, default=str)
        )
        return Result(verdict, self.run_dir, self.profile, time.monotonic() - self.started)


def run_scenario(
    profile: Profile,
    *,
    redis_url: str | None = None,
    aof: str = "both",
    run_dir: Path | None = None,
    seed: int | None = None,
    driver: str | None = None,
    kinds: Sequence[str] | None = None,
    echo: Callable[[str], None] = print,
) -> Result:
    """Run one scenario end to end and check it."""
    scenario = Scenario(
        profile, redis_url=redis_url, aof=aof, run_dir=run_dir, seed=seed, driver=driver, kinds=kinds, echo=echo
    )
    return scenario.run()


def read_dead_letters(backend: RedisQueueBackend, queues: Sequence[str]) -> list[Event]:
    """Every dead letter of ``queues`` (and of any stream the dead-letter index names), for
    the checker: queue, reason, the scenario sequence number when the task decodes, and the
    stored record's raw bytes in hex (a vandal entry is found in them)."""
    out: list[Event] = []
    for stream in sorted(set(queues) | set(backend.dead_letter_streams())):
        for d in backend.dead_letters(stream, 100_000):
            seq = None
            if d.record is not None and d.record.args:
                with contextlib.suppress(TypeError, ValueError):
                    seq = int(d.record.args[0])
            out.append({"queue": stream, "reason": d.reason, "seq": seq, "raw": bytes(d.raw).hex()})
    return out


def read_ticks(backend: RedisQueueBackend, queue: str, schedule: str) -> Event:
    """What Redis holds of a periodic schedule once no replica runs it any more, for the checker:
    its record (``last`` tick, ``fired`` and ``skipped`` counts; None if Redis did not answer),
    and the tick tasks still in its stream (``left``: pending, in flight or delayed) or
    dead-lettered (``dead``), each as its task id and tick."""
    k = backend.keys.stream(queue)
    try:
        pipe = backend.client.pipeline(transaction=False)
        pipe.hgetall(backend.keys.schedule(schedule, queue).record)
        pipe.lrange(k.inflight, 0, -1).lrange(k.pending, 0, -1).zrange(k.later, 0, -1)
        stored, inflight, pending, later = pipe.execute()
        dead = backend.dead_letters(queue, 100_000)
    except redis.RedisError:
        return {"record": None, "left": [], "dead": []}
    record = {name.decode(): value.decode() for name, value in stored.items()}
    left = []
    # A delayed member is "<seq>|<entry>" (lib.lua): the entry follows the first bar.
    for raw in [*inflight, *pending, *(m.partition(b"|")[2] for m in later)]:
        entry = Entry.load(raw)
        with contextlib.suppress(DecodeError):
            tick = (TaskRecord.decode(entry.payload, backend.settings.serializer).headers or {}).get(TICK_HEADER)
            if tick is not None:
                left.append({"task_id": entry.id, "tick": int(tick)})
    gone = []
    for d in dead:
        tick = (d.record.headers or {}).get(TICK_HEADER) if d.record is not None else None
        if tick is not None:
            gone.append({"task_id": d.task_id, "tick": int(tick), "reason": d.reason})
    return {
        "record": {
            "last": int(record["last"]) if record.get("last") else None,
            "fired": int(record.get("fired", 0)),
            "skipped": int(record.get("skipped", 0)),
        }
        if record
        else None,
        "left": left,
        "dead": gone,
    }


def _wait_drained(
    backend: RedisQueueBackend, queues: Sequence[str], timeout: float, fleet: Fleet | None = None
) -> dict[str, int]:
    """Wait until no queue has pending, in-flight or delayed tasks; returns what is left per
    queue. (``queue_info`` leaves delayed tasks out: they are counted from the stream's later set.)"""
    deadline = time.monotonic() + timeout
    left: dict[str, int] = {}
    while True:
        try:
            left = {}
            for q in queues:
                info = backend.queue_info(q)
                delayed = int(backend.client.zcard(backend.keys.stream(q).later))
                left[q] = int(info["pending"]) + int(info["inflight"]) + delayed
            if not any(left.values()):
                return left
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        if fleet is not None:
            fleet.reap()
        if time.monotonic() > deadline:
            return left
        time.sleep(0.1)
