"""Periodic schedules: a schedule's rule (a fixed interval or a cron line), which of its ticks a
replica asks to fire, and what the ``tick`` script's reply means. No I/O: the threaded and
asyncio workers drive ``TickLoop``.

Exactly one task per tick, fleet-wide, rests on one compare-and-set in Redis (``tick.lua``):
every replica that runs a schedule asks to move its ``last`` tick from the value it last heard
to the tick now due, and enqueue that tick's task in the same script. Only one such move from
one value succeeds; the others hear the new value and wait for the next tick. Whether a tick is
due is Redis's clock's say (the script refuses a tick still ahead of it), and a replica times its
sleep from the Redis time of its last reply plus its monotonic clock, so a replica whose wall
clock is off neither fires early nor holds a tick back.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..errors import ConfigurationError
from ..task import NOW, EncodedTask, TaskRecord, new_task_id

#: What becomes of ticks that passed while no replica ran the schedule (all were down, or none
#: had started yet): ``"once"`` enqueues one task for them (the latest), ``"skip"`` enqueues none
#: unless the latest is within the schedule's grace, ``"all"`` enqueues one per tick, oldest
#: first, ``MAX_CATCH_UP`` per call.
CatchUp = Literal["once", "skip", "all"]
CATCH_UPS: tuple[CatchUp, ...] = ("once", "skip", "all")
MAX_CATCH_UP = 100
#: The longest a schedule's loop sleeps without looking: schedules registered after the worker
#: started are picked up within it.
MAX_SLEEP = 1.0
#: Back-off after a failed call, doubling up to the last.
FAILURE_BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0)
_NAME = re.compile(r"[A-Za-z0-9_.:/@<>-]{1,200}")


class Rule(Protocol):
    """When a schedule ticks. Times are ms since the epoch on Redis's clock."""

    @property
    def text(self) -> str:
        """The rule as operators read it."""
        ...

    def latest(self, at_ms: int) -> int:
        """The last tick at or before ``at_ms``."""
        ...

    def after(self, ms: int) -> int:
        """The first tick strictly after ``ms``."""
        ...


@dataclass(frozen=True)
class Every:
    """A tick every ``ms`` milliseconds, aligned to the epoch: every replica, whenever it
    started, names the same ticks (an ``every=60`` schedule ticks on the minute)."""

    ms: int
    text: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", f"every {_human(self.ms)}")

    def latest(self, at_ms: int) -> int:
        return at_ms - at_ms % self.ms

    def after(self, ms: int) -> int:
        return self.latest(ms) + self.ms


class Cron:
    """A cron line (five fields, or six with seconds first), in UTC, read by ``croniter``."""

    def __init__(self, expr: str) -> None:
        try:
            from croniter import croniter
        except ImportError:
            raise ConfigurationError(
                "cron= schedules need the optional croniter dependency: pip install 'pyfiq[cron]'"
            ) from None
        if not isinstance(expr, str) or not croniter.is_valid(expr, second_at_beginning=True):
            raise ConfigurationError(f"invalid cron line {expr!r}: five fields (minute hour day month weekday)")
        self._croniter = croniter
        self.expr = expr
        self.text = f"cron {expr}"

    def __repr__(self) -> str:
        return f"Cron({self.expr!r})"

    def _iter(self, ms: int) -> Any:
        start = dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)
        return self._croniter(self.expr, start, second_at_beginning=True)

    def latest(self, at_ms: int) -> int:
        # From just past at_ms, the previous tick is the last one at or before it.
        value: float = self._iter(at_ms + 1).get_prev(float)
        return round(value * 1000)

    def after(self, ms: int) -> int:
        value: float = self._iter(ms).get_next(float)
        return round(value * 1000)


def _human(ms: int) -> str:
    for unit, size in (("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms} ms"


def validate_schedule_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid schedule name {name!r}: use 1-200 characters among letters, digits and _.:/@<>-"
        )
    return name


def make_rule(every: float | dt.timedelta | None, cron: str | None) -> Rule:
    if (every is None) == (cron is None):
        raise ConfigurationError("a periodic function needs exactly one of every= and cron=")
    if cron is not None:
        return Cron(cron)
    seconds = every.total_seconds() if isinstance(every, dt.timedelta) else every
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ConfigurationError(f"every= takes seconds or a timedelta, got {every!r}")
    ms = round(seconds * 1000)
    if ms < 100 or abs(ms - seconds * 1000) > 1e-6:
        raise ConfigurationError(f"every= must be a whole number of ms, at least 100 ms, got {every!r}")
    return Every(ms)


def periodic_rule(
    every: float | dt.timedelta | None, cron: str | None, catch_up: str, version: int, name: str | None
) -> Rule:
    """The rule of ``@fifo.periodic(...)``, its other options checked before anything is bound."""
    rule = make_rule(every, cron)
    if catch_up not in CATCH_UPS:
        raise ConfigurationError(f"catch_up must be one of {', '.join(CATCH_UPS)}, got {catch_up!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigurationError(f"version must be a non-negative int, got {version!r}")
    if name is not None:
        validate_schedule_name(name)
    return rule


@dataclass(frozen=True)
class Schedule:
    """One periodic function's schedule: whose ``name`` (its identity in Redis: the function's
    task name unless given), which stream its ticks' tasks go to, its rule and arguments."""

    name: str
    task: str
    queue: str
    stream: str
    rule: Rule
    catch_up: CatchUp = "once"
    version: int = 0
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    expires_in_ms: int = 0

    def grace_ms(self, tick: int) -> int:
        """How late a tick may still fire under ``catch_up="skip"``: half the gap to the next
        tick, between 1 s and 60 s."""
        return max(1000, min(60_000, (self.rule.after(tick) - tick) // 2))


class Encode(Protocol):
    def __call__(self, record: TaskRecord) -> bytes: ...


@dataclass
class Ticker:
    """What one replica knows of one schedule's record in Redis."""

    schedule: Schedule
    #: The stored last tick as last heard; None: no record (or not heard yet: ``heard``).
    last: int | None = None
    heard: bool = False
    #: Redis ms of the last reply, and the monotonic time it arrived: Redis's clock now is
    #: estimated from these, never from this machine's wall clock.
    redis_ms: int = 0
    at: float = 0.0
    #: Monotonic time of the next call.
    wake: float = 0.0
    failures: int = 0
    superseded: int | None = None
    fired: int = 0

    def redis_now(self, now: float) -> int:
        return self.redis_ms + int((now - self.at) * 1000)


@dataclass(frozen=True)
class Advance:
    """One ``tick`` call's intent: move ``last`` from ``expected`` ('' for no record, '?' to
    only read) to ``new_last``, enqueueing one task per tick of ``ticks``."""

    ticker: Ticker
    expected: str
    new_last: int
    ticks: tuple[int, ...]
    items: tuple[EncodedTask, ...]


def plan(ticker: Ticker, now: float, encode: Encode) -> Advance | None:
    """The call ``ticker`` makes now, or None (it sleeps until ``ticker.wake``)."""
    sched = ticker.schedule
    if not ticker.heard:
        return Advance(ticker, "?", 0, (), ())
    redis_now = ticker.redis_now(now)
    if ticker.last is None:
        # No record: a schedule first seen, or one forgotten by an operator or lost with Redis's
        # data. Nothing is owed for the past, except a tick within its grace: that is one a
        # replica that knew the record may be about to fire, and must not be recorded unfired.
        latest = sched.rule.latest(redis_now)
        return Advance(ticker, "", sched.rule.latest(redis_now - sched.grace_ms(latest)), (), ())
    following = sched.rule.after(ticker.last)
    if following > redis_now:
        ticker.wake = now + (following - redis_now) / 1000
        return None
    latest = sched.rule.latest(redis_now)
    ticks: list[int]
    if sched.catch_up == "all":
        ticks = [following]
        while len(ticks) < MAX_CATCH_UP and (t := sched.rule.after(ticks[-1])) <= redis_now:
            ticks.append(t)
    elif sched.catch_up == "skip" and redis_now - latest > sched.grace_ms(latest):
        ticks = []
    else:
        ticks = [latest]
    new_last = ticks[-1] if ticks else latest
    items = tuple(_item(sched, tick, encode) for tick in ticks)
    return Advance(ticker, str(ticker.last), new_last, tuple(ticks), items)


#: The header naming the tick a periodic task was enqueued for (Redis ms): the task reads it as
#: ``pyfiq.current_task().headers["pyfiq-tick"]``.
TICK_HEADER = "pyfiq-tick"


def _item(sched: Schedule, tick: int, encode: Encode) -> EncodedTask:
    record = TaskRecord(sched.task, list(sched.args), dict(sched.kwargs), sched.key, {TICK_HEADER: str(tick)})
    return EncodedTask(new_task_id(), sched.expires_in_ms, NOW, encode(record))


TickStatus = Literal["state", "fired", "moved", "early", "superseded", "paused"]


@dataclass(frozen=True)
class TickReply:
    status: TickStatus
    redis_ms: int
    last: int | None
    version: int


def parse_tick(reply: Sequence[Any]) -> TickReply:
    status = _text(reply[0])
    last = _text(reply[2])
    return TickReply(status, int(reply[1]), int(last) if last else None, int(reply[3] or 0))  # type: ignore[arg-type]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


Log = Callable[..., None]


def on_reply(advance: Advance, reply: Any, now: float, log: Log) -> None:
    """Apply a ``tick`` call's reply (or the exception it raised) to its ticker; ``now``: the
    monotonic time it arrived, so the Redis time it carries is never ahead of Redis's clock."""
    ticker = advance.ticker
    sched = ticker.schedule
    if isinstance(reply, Exception):
        ticker.failures += 1
        backoff = FAILURE_BACKOFF[min(ticker.failures, len(FAILURE_BACKOFF)) - 1]
        ticker.wake = now + backoff * random.uniform(0.8, 1.2)
        log("warning", "pyfiq.schedule_call_failed", schedule=sched.name, error=f"{type(reply).__name__}: {reply}")
        return
    ticker.failures = 0
    parsed = parse_tick(reply)
    ticker.redis_ms, ticker.at, ticker.heard = parsed.redis_ms, now, True
    ticker.wake = now
    if parsed.status == "superseded":
        if ticker.superseded != parsed.version:
            log(
                "warning",
                "pyfiq.schedule_superseded",
                schedule=sched.name,
                version=sched.version,
                stored_version=parsed.version,
            )
        ticker.superseded = parsed.version
        ticker.last = parsed.last
        following = sched.rule.after(parsed.last if parsed.last is not None else parsed.redis_ms)
        ticker.wake = now + max(0.0, (following - parsed.redis_ms) / 1000)
        return
    ticker.superseded = None
    if parsed.status in ("fired", "paused"):
        ticker.last = advance.new_last
        if parsed.status == "fired" and advance.ticks:
            ticker.fired += len(advance.ticks)
            log("debug", "pyfiq.schedule_fired", schedule=sched.name, ticks=list(advance.ticks))
        elif parsed.status == "paused" and advance.ticks:
            log("info", "pyfiq.schedule_paused_tick", schedule=sched.name, ticks=list(advance.ticks))
    else:
        ticker.last = parsed.last  # state, moved (another replica fired), early (re-plan)


class Schedules(Protocol):
    def schedules_of(self, queues: Iterable[str] | None) -> list[Schedule]: ...


class TickLoop:
    """Every schedule of the queues a worker consumes, as the worker's ticking thread (or
    asyncio task) drives them: ``calls(now)`` the advances due, ``wait(now)`` how long it may
    sleep. Schedules registered later are picked up at the next round."""

    def __init__(self, source: Schedules, queues: Sequence[str] | None, encode: Encode, log: Log) -> None:
        self.source = source
        self.queues = queues
        self.encode = encode
        self.log = log
        self.tickers: dict[str, Ticker] = {}

    def due(self, now: float) -> list[Advance]:
        current = {s.name: s for s in self.source.schedules_of(self.queues)}
        for name in list(self.tickers):
            if name not in current or self.tickers[name].schedule is not current[name]:
                del self.tickers[name]
        out = []
        for name, sched in current.items():
            ticker = self.tickers.get(name)
            if ticker is None:
                ticker = self.tickers[name] = Ticker(sched, wake=now)
            if ticker.wake > now:
                continue
            try:
                advance = plan(ticker, now, self.encode)
            except Exception as exc:  # its arguments no longer encode, its rule fails: say so, go on
                ticker.wake = now + 60.0
                self.log("error", "pyfiq.schedule_failed", schedule=name, error=f"{type(exc).__name__}: {exc}")
                continue
            if advance is not None:
                out.append(advance)
        return out

    def apply(self, advances: Sequence[Advance], replies: Sequence[Any], now: float) -> None:
        """The replies of ``due``'s calls (an exception for a call that failed), arrived at
        monotonic time ``now``."""
        for advance, reply in zip(advances, replies, strict=True):
            on_reply(advance, reply, now, self.log)

    def wait(self, now: float) -> float:
        nearest = min((t.wake for t in self.tickers.values()), default=now + MAX_SLEEP)
        return min(MAX_SLEEP, max(0.0, nearest - now))
