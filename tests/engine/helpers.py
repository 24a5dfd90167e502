"""What the engine's tests share: one stream's keys and settings, task entries in their wire
form, a lease as an acquire reply grants it, the script calls a run is expected to make, and a
clock set by hand (the engine reads no other)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

from pyfiq.config import Settings
from pyfiq.engine.events import Event
from pyfiq.engine.keys import KeySchema
from pyfiq.engine.lease import Lease
from pyfiq.engine.outcomes import DeadLettered
from pyfiq.engine.protocol import Call, RateLimit, ScriptCalls
from pyfiq.engine.scheduler import Scheduler
from pyfiq.engine.scripts import SPECS
from pyfiq.engine.stream import RunTask, StreamRun
from pyfiq.task import Entry, TaskRecord

STREAM = "orders#c-1"
SETTINGS = Settings(
    prefix="core", shards=4, lease_ttl=10.0, ack_mode="inline", prefetch=2, batch_limit=4, max_deliveries=3
)
KEYS = KeySchema("core", 4)
OPS = ScriptCalls(KEYS, SETTINGS)
SK = KEYS.stream(STREAM)
TOKEN = "1700000000000000:00ff00ff00ff00ff"
FENCE = 1700000000000000

#: Where every ``FakeClock`` starts, and the send time of a lease ``granted`` by default.
START = 1000.0
#: The wall clock a ``FakeClock`` reports, as stamped on dead letters.
WALL_MS = 1_700_000_000_000


class FakeClock:
    """The engine's ``Clock``, moved by hand: ``clock.now += 5``."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def wall_ms(self) -> int:
        return WALL_MS


def task_id(n: int) -> str:
    return f"{n:032x}"


def entry(n: int, *, expires_ms: int = 0, name: str = "app.charge", payload: bytes | None = None) -> bytes:
    body = payload if payload is not None else TaskRecord(name, [n], {}, key="c-1").encode(SETTINGS.serializer)
    return f"{task_id(n)}|1000|{expires_ms}|".encode() + body


def stream_keys(script: str) -> list[str]:
    return [getattr(SK, name) for name in SPECS[script].keys]


def granted(*tasks: tuple[bytes, int], redis_ms: int = 5_000, sent_at: float = START) -> Lease:
    """A lease as ``parse_acquire`` makes it from a successful acquire reply sent at ``sent_at``."""
    reply: list[Any] = [1, TOKEN.encode(), FENCE, redis_ms]
    for raw, deliveries in tasks:
        reply += [raw, deliveries]
    lease = OPS.parse_acquire(STREAM, reply, threading.Event(), sent_at)
    assert lease is not None
    return lease


def run_of(
    lease: Lease,
    *,
    settings: Settings = SETTINGS,
    stopping: Callable[[], bool] = lambda: False,
    abandoned: Callable[[], bool] = lambda: False,
    rate_limit: RateLimit | None = None,
    clock: FakeClock | None = None,
) -> StreamRun:
    return StreamRun(
        ScriptCalls(KEYS, settings),
        lease,
        stopping=stopping,
        abandoned=abandoned,
        clock=clock or FakeClock(),
        rate_limit=rate_limit,
    )


def take_call(acks: list[str], want: int, settings: Settings = SETTINGS, ahead: bool = False) -> Call:
    argv = [TOKEN, STREAM, len(acks), want, settings.max_deliveries, 1 if ahead else 0, *acks]
    return Call("take", stream_keys("take"), argv)


def release_call(acks: list[str], started: list[str], delay_ms: int = 0) -> Call:
    args = [TOKEN, STREAM, len(acks), len(started), KEYS.wake_channel, SK.shard, delay_ms, *acks, *started]
    return Call("release", stream_keys("release"), args)


def run_task(n: int, deliveries: int = 1) -> RunTask:
    return RunTask(Entry.parse(entry(n)), deliveries)


def lookup_of(*names: str) -> Callable[[str], Any]:
    funcs = {n: SimpleNamespace(name=n) for n in names}
    return funcs.get


def header_of(result: Any) -> dict[str, Any]:
    assert isinstance(result, DeadLettered)
    parsed: dict[str, Any] = json.loads(result.header)
    return parsed


class Directory:
    """The scheduler's view of the application's tasks."""

    def __init__(self, *names: str, limits: dict[str, RateLimit] | None = None) -> None:
        self.names = set(names)
        self.limits = limits or {}

    def registered_queues(self) -> list[str]:
        return ["orders"]

    def lookup(self, name: str) -> Any:
        return SimpleNamespace(name=name) if name in self.names else None

    def rate_limit_of(self, queue: str) -> RateLimit | None:
        return self.limits.get(queue)


def scheduler_of(
    directory: Directory | None = None,
    *,
    concurrency: int = 1,
    queues: list[str] | None = None,
    ops: ScriptCalls = OPS,
    clock: FakeClock | None = None,
) -> Scheduler:
    """A scheduler as one event loop drives it: no locks, the given (or a fresh) fake clock."""
    return Scheduler(ops, concurrency, queues, directory or Directory(), clock=clock or FakeClock(), lock=nullcontext)


def kinds(events: list[Event]) -> list[str]:
    """The events' type names, in order: what a test of their sequence compares."""
    return [type(event).__name__ for event in events]
