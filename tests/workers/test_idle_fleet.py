"""The fleet shares its safety poll: on a real redis-server, idle workers divide the shards
among themselves (each shard polled by exactly one), new work is still found at once through
a wake-up and within about one poll without one, and a SIGKILLed replica's shards, and the
lease it held, are taken over by the others."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import pyfiq
from pyfiq import AsyncWorker, RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.engine.keys import KeySchema
from pyfiq.engine.protocol import Call
from pyfiq.engine.scheduler import IDLE_BEAT_ROUNDS, IDLE_POLL_FACTOR, poll_owners
from tests.support.helpers import unique_prefix, wait_until

SHARDS = 8
TTL = 1.5
POLL = 0.2
ALL = set(range(SHARDS))
SETTINGS: dict[str, Any] = {"lease_ttl": TTL, "poll_interval": POLL, "shards": SHARDS}
#: An idle shard's safety poll, and how long a silent idle poller takes to count as gone.
IDLE_POLL = IDLE_POLL_FACTOR * POLL
POLLER_GONE = 2.5 * IDLE_BEAT_ROUNDS * TTL / 5


def qname() -> str:
    return f"fleet-{uuid.uuid4().hex[:8]}"


class Loop:
    """An event loop in a thread, for AsyncWorkers beside threaded ones."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Fleet:
    """Idle workers of one queue on one prefix, each with its own backend, whose ``due`` calls
    are recorded per worker (the shard each one looked at)."""

    def __init__(self, url: str, prefix: str, queue: str, **settings: Any) -> None:
        self.url, self.prefix, self.queue = url, prefix, queue
        self.settings = {**SETTINGS, **settings}
        self.workers: list[ThreadedWorker | AsyncWorker] = []
        self.looked: dict[str, list[int]] = {}
        self.backends: list[RedisQueueBackend] = []
        self.loop: Loop | None = None

    def backend(self) -> RedisQueueBackend:
        backend = RedisQueueBackend(self.url, prefix=self.prefix, **self.settings)
        self.backends.append(backend)
        return backend

    def _spied(self, replica: str) -> RedisQueueBackend:
        backend = self.backend()
        looked = self.looked.setdefault(replica, [])
        call_many, acall_many = backend.call_many, backend.acall_many

        def note(calls: Sequence[Call]) -> None:
            looked.extend(int(re.findall(r"\{s(\d+)\}", c.keys[0])[0]) for c in calls if c.script == "due")

        def spy(calls: Sequence[Call]) -> list[Any]:
            note(calls)
            return call_many(calls)

        async def aspy(calls: Sequence[Call]) -> list[Any]:
            note(calls)
            return await acall_many(calls)

        backend.call_many, backend.acall_many = spy, aspy  # type: ignore[method-assign]
        return backend

    def start(self, replica: str, *, driver: str = "threaded", concurrency: int = 1) -> ThreadedWorker | AsyncWorker:
        backend = self._spied(replica)
        worker: ThreadedWorker | AsyncWorker
        if driver == "threaded":
            worker = ThreadedWorker(backend, queues=[self.queue], replica=replica, concurrency=concurrency).start()
        else:
            self.loop = self.loop or Loop()
            worker = self.loop.run(
                AsyncWorker(backend, queues=[self.queue], replica=replica, concurrency=concurrency).start()
            )
        self.workers.append(worker)
        return worker

    def polled(self) -> dict[str, set[int]]:
        """The shards each worker's safety poll covers (all of them while it has no view)."""
        out = {}
        for w in self.workers:
            _, shards = w.scheduler.poll_view()
            out[w.replica] = ALL if shards is None else set(shards)
        return out

    def divided(self, replicas: list[str] | None = None) -> bool:
        """Every worker's view names exactly ``replicas`` (default: the fleet's), and each polls
        the shards the rule gives it among them."""
        names = sorted(replicas or [w.replica for w in self.workers])
        owners = poll_owners(names, SHARDS)
        polled = self.polled()
        for w in self.workers:
            view, _ = w.scheduler.poll_view()
            if sorted(name.split("|", 1)[1] for name in view) != names:
                return False
            if polled[w.replica] != {s for s in ALL if owners[s] == w.replica}:
                return False
        return True

    def close(self) -> None:
        for w in self.workers:
            if isinstance(w, AsyncWorker):
                assert self.loop is not None
                self.loop.run(w.stop(5))
            else:
                w.stop(5)
        if self.loop is not None:
            self.loop.close()
        for b in self.backends:
            b.close()


@pytest.fixture
def fleet(redis_server: Any) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(queue: str, **settings: Any) -> Fleet:
        f = Fleet(redis_server.url, unique_prefix(), queue, **settings)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def streams_on_every_shard(backend: RedisQueueBackend, queue: str) -> dict[int, str]:
    """A keyed stream of ``queue`` in each shard."""
    found: dict[int, str] = {}
    for i in range(1000):
        found.setdefault(backend.keys.shard_of(f"{queue}#k{i}"), f"k{i}")
        if len(found) == SHARDS:
            return found
    raise AssertionError("no key found for some shard")


def test_idle_workers_divide_the_shards_each_polled_by_exactly_one(fleet: Callable[..., Fleet]) -> None:
    f = fleet(qname())
    for i in range(3):
        f.start(f"idle-{i}")
    f.start("idle-3", driver="asyncio")
    wait_until(f.divided, timeout=15, message="the four workers' views agree and divide the shards")
    polled = f.polled()
    assert sorted(s for shards in polled.values() for s in shards) == sorted(ALL), "a partition"
    assert all(polled.values()), "8 shards spread over all four"
    for looked in f.looked.values():
        looked.clear()
    time.sleep(1.3 * IDLE_POLL)  # nothing there: each shard is polled once per IDLE_POLL
    by_shard: dict[int, set[str]] = {}
    for replica, shards in f.looked.items():
        for shard in shards:
            by_shard.setdefault(shard, set()).add(replica)
    assert set(by_shard) == ALL, "every shard is polled"
    assert all(len(who) == 1 for who in by_shard.values()), f"each shard by one worker: {by_shard}"
    assert {s: who.pop() for s, who in by_shard.items()} == {
        s: owner for s, owner in enumerate(poll_owners(sorted(f.looked), SHARDS))
    }
    # The fleet looks at each shard about once per idle poll, not once per worker.
    assert sum(len(v) for v in f.looked.values()) <= SHARDS * 3


def test_new_work_is_found_at_once_through_a_wake_up(fleet: Callable[..., Fleet]) -> None:
    q, ran = qname(), set()
    f = fleet(q, poll_interval=30.0)  # the safety poll cannot explain what follows

    @fifo(queue=q, name=f"{q}.t", key=lambda k: k)
    def t(k: str) -> None:
        ran.add(k)

    producer = f.backend()
    pyfiq.configure(producer)
    f.start("wake-0")
    f.start("wake-1", driver="asyncio")
    f.start("wake-2")
    keys = streams_on_every_shard(producer, q)
    wait_until(f.divided, timeout=15)
    time.sleep(0.5)  # past the first looks after joining
    for key in keys.values():
        t(key)
    wait_until(lambda: ran == set(keys.values()), timeout=5, message="every shard's new task ran")


def test_new_work_without_a_wake_up_is_found_within_about_one_poll(fleet: Callable[..., Fleet]) -> None:
    q, ran = qname(), set()
    f = fleet(q)

    @fifo(queue=q, name=f"{q}.t", key=lambda k: k)
    def t(k: str) -> None:
        ran.add(k)

    producer = f.backend()
    producer.keys.wake_channel = f"{f.prefix}:nobody-hears-this"
    pyfiq.configure(producer)
    f.start("deaf-0")
    f.start("deaf-1")
    f.start("deaf-2", driver="asyncio")
    keys = streams_on_every_shard(producer, q)
    wait_until(f.divided, timeout=15)
    assert all(len(s) < SHARDS for s in f.polled().values()), "the poll is shared, not repeated"
    for key in keys.values():
        t(key)
    wait_until(lambda: ran == set(keys.values()), timeout=IDLE_POLL + 5 * POLL, message="every shard's new task ran")


VICTIM = f"""
import pathlib, sys, time
from pyfiq import RedisQueueBackend, ThreadedWorker, fifo
url, prefix, queue, replica, marker = sys.argv[1:6]

@fifo(queue=queue, name="fleet.hold")
def hold(i):
    pathlib.Path(marker).write_text(str(i))
    time.sleep(60)

backend = RedisQueueBackend(url, prefix=prefix, lease_ttl={TTL!r}, poll_interval={POLL!r}, shards={SHARDS!r})
ThreadedWorker(backend, queues=[queue], replica=replica).start()
print("ready", flush=True)
time.sleep(120)
"""


def test_a_sigkilled_replica_s_shards_and_lease_are_taken_over(
    fleet: Callable[..., Fleet], redis_server: Any, tmp_path: Path
) -> None:
    replicas = ["fleet-a", "fleet-b", "fleet-v"]
    owners = poll_owners(replicas, SHARDS)
    victims = {s for s, owner in enumerate(owners) if owner == "fleet-v"}
    assert victims, "the victim polls some shards"
    base = qname()
    # A queue in a shard the victim polls: only the reassignment can see its lease lapse.
    q = next(f"{base}-{i}" for i in range(1000) if KeySchema("x", SHARDS).shard_of(f"{base}-{i}") in victims)
    f = fleet(q)
    started: list[float] = []

    @fifo(queue=q, name="fleet.hold")
    def hold(i: int) -> None:
        started.append(time.monotonic())

    marker = tmp_path / "held"
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, redis_server.url, f.prefix, q, "fleet-v", str(marker)],
        stdout=subprocess.PIPE,
    )
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == b"ready"
        producer = f.backend()
        pyfiq.configure(producer)
        hold(1)
        wait_until(marker.exists, timeout=10, message="the victim runs the task, holding its lease")
        f.start("fleet-a")
        f.start("fleet-b")
        wait_until(lambda: f.divided(replicas), timeout=15, message="the victim is part of the division")
        assert set().union(*f.polled().values()) == ALL - victims
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.wait(5)
        wait_until(
            lambda: f.divided(["fleet-a", "fleet-b"]), timeout=POLLER_GONE + 3 * TTL, message="its shards taken over"
        )
        wait_until(lambda: bool(started), timeout=TTL + POLL + 2.0, message="the task taken over")
        assert started[0] - killed < TTL + POLL + 2.0
        # New work on the victim's shards, without a wake-up, is found by the new pollers.
        deaf = f.backend()
        deaf.keys.wake_channel = f"{f.prefix}:nobody-hears-this"
        pyfiq.configure(deaf)
        hold(2)
        wait_until(lambda: len(started) == 2, timeout=IDLE_POLL + 5 * POLL, message="new work on a victim's shard")
    finally:
        victim.kill()
        victim.wait(5)
        if victim.stdout is not None:
            victim.stdout.close()


RACER = f"""
import pathlib, sys, time
from pyfiq import RedisQueueBackend, ThreadedWorker, fifo
url, prefix, queue, replica, markers = sys.argv[1:6]

@fifo(queue=queue, name="fleet.khold", key=lambda k: k)
def khold(k):
    (pathlib.Path(markers) / k).write_text("")
    time.sleep(60)

backend = RedisQueueBackend(url, prefix=prefix, lease_ttl={TTL!r}, poll_interval={POLL!r}, shards={SHARDS!r})
ThreadedWorker(backend, queues=[queue], replica=replica, concurrency=64).start()
print("ready", flush=True)
time.sleep(120)
"""


def test_a_holder_that_won_a_wake_up_race_and_polled_its_shard_is_taken_over_when_its_lease_lapses(
    fleet: Callable[..., Fleet], redis_server: Any, tmp_path: Path
) -> None:
    """An idle fleet divided the shards; new work wakes everyone, and the replicas race for each
    stream. The victim wins every race (the others' claims are slowed down here) and is
    SIGKILLed: the others, who lost those races, take each stream over when its lease lapses,
    also on the shards the victim polled itself, not once they count the dead poller gone
    (which takes far longer for a fleet that beats slowly while idle)."""
    q = qname()
    f = fleet(q)
    started: dict[str, float] = {}
    release = threading.Event()

    @fifo(queue=q, name="fleet.khold", key=lambda k: k)
    def khold(k: str) -> None:
        started[k] = time.monotonic()
        release.wait(30)

    markers = tmp_path / "held"
    markers.mkdir()
    victim = subprocess.Popen(
        [sys.executable, "-c", RACER, redis_server.url, f.prefix, q, "fleet-v", str(markers)], stdout=subprocess.PIPE
    )
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == b"ready"
        for name in ("fleet-a", "fleet-b"):
            worker = f.start(name, concurrency=64)
            call = worker.backend.call

            def slow(c: Call, *args: Any, _call: Callable[..., Any] = call, **kw: Any) -> Any:
                if c.script == "acquire":
                    time.sleep(0.1)  # lose every race to the victim
                return _call(c, *args, **kw)

            worker.backend.call = slow  # type: ignore[method-assign]
        replicas = ["fleet-a", "fleet-b", "fleet-v"]
        wait_until(lambda: f.divided(replicas), timeout=15, message="the three divide the shards")
        producer = f.backend()
        keys = streams_on_every_shard(producer, q)
        pyfiq.configure(producer)
        for key in keys.values():
            khold(key)
        wait_until(lambda: len(list(markers.iterdir())) == SHARDS, timeout=10, message="the victim runs them all")
        owners = poll_owners(replicas, SHARDS)
        assert any(owners[s] == "fleet-v" for s in keys), "the victim polls some of those shards itself"
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.wait(5)
        wait_until(lambda: len(started) == SHARDS, timeout=TTL + POLL + 3.0, message="the victim's streams taken over")
        late = {k: round(started[k] - killed, 2) for k in started if started[k] - killed >= TTL + POLL + 1.0}
        assert not late, f"taken over later than the lease TTL and a poll: {late}"
    finally:
        release.set()
        victim.kill()
        victim.wait(5)
        if victim.stdout is not None:
            victim.stdout.close()
