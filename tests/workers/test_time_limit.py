"""Time limits and the running-long warning, over both drivers and both backends."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_fixed

import pyfiq
from pyfiq import ConfigurationError, RedisQueueBackend, Settings, TimeLimitExceeded, current_task, fifo
from pyfiq.engine.events import Outbox
from pyfiq.engine.outcomes import Prepared, prepare
from pyfiq.engine.task_run import TaskRun
from pyfiq.functions import RetryPolicy
from pyfiq.task import Entry
from pyfiq.workers import limits
from pyfiq.workers.limits import call_with_limits
from tests.engine.helpers import SETTINGS, FakeClock, entry, granted, header_of, lookup_of
from tests.support.helpers import drained, wait_until
from tests.workers import test_worker as behaviour
from tests.workers.test_worker import Journal, qname

#: The behaviour suite's fixture: workers of both drivers, over the ``backend`` fixture's two backends.
start_worker = behaviour.start_worker


def errors_into(seen: list[tuple[type[BaseException], int]]) -> Any:
    return lambda exc, task, binding: seen.append((type(exc), task.attempt))


def stuck_task(q: str, log: Journal, kind: str, **options: Any) -> Any:
    """A task whose item 0 never ends on its own: short sleeps in a loop (so an exception raised
    in its thread lands), or an await that never completes. Other items end at once."""
    if kind == "sync":

        @fifo(queue=q, name=f"{q}.stuck", **options)
        def stuck(i: int) -> None:
            log.add(q, i, "start")
            try:
                while i == 0:
                    time.sleep(0.01)
            except BaseException:
                log.add(q, i, "interrupted")
                raise

        return stuck

    @fifo(queue=q, name=f"{q}.stuck", **options)
    async def astuck(i: int) -> None:
        log.add(q, i, "start")
        try:
            if i == 0:
                await asyncio.sleep(3600)
        except BaseException:
            log.add(q, i, "interrupted")
            raise

    return astuck


def events(log: Journal, q: str) -> list[tuple[Any, str]]:
    return [(item, event) for queue, item, event, _ in list(log.events) if queue == q]


def starts(log: Journal, q: str, item: Any) -> list[float]:
    return [t for queue, i, event, t in list(log.events) if (queue, i, event) == (q, item, "start")]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stuck_task_is_interrupted_at_its_limit_retried_then_dead_lettered_and_the_stream_moves_on(  # type: ignore[no-untyped-def]
    backend, start_worker, kind: str
) -> None:
    q, log = qname(), Journal()
    errors: list[tuple[type[BaseException], int]] = []
    stuck = stuck_task(q, log, kind, time_limit=0.3, max_retries=1, retry_wait=0.01, on_error=errors_into(errors))
    handle = stuck(0)
    stuck(1)
    start_worker([q])
    wait_until(lambda: drained(backend, q), message="the stuck task dead-lettered and the next one run")
    # Each interruption ends the attempt before the next one starts: the retry waits for it.
    assert events(log, q) == [(0, "start"), (0, "interrupted"), (0, "start"), (0, "interrupted"), (1, "start")]
    assert errors == [(TimeLimitExceeded, 1), (TimeLimitExceeded, 2)]
    first, second = starts(log, q, 0)
    assert 0.28 < second - first < 1.0, f"interrupted after {second - first:.3f}s, the limit is 0.3s"
    (dead,) = backend.dead_letters(q)
    assert dead.task_id == handle.id and dead.reason == "exhausted" and dead.header["attempts"] == 2
    assert dead.header["error_type"] == "pyfiq.errors.TimeLimitExceeded"
    assert dead.header["error"] == "the attempt ran past its time limit of 0.3s"
    assert ("time.sleep" if kind == "sync" else "asyncio.sleep") in dead.header["traceback"], "where it was stuck"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_lease_stays_held_until_an_interrupted_task_has_really_ended(backend, start_worker, kind: str) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()
    short = RedisQueueBackend(backend.url, backend.settings.replace(lease_ttl=0.5, poll_interval=0.1))
    ignore_for = 1.2  # more than two lease TTLs
    leases: list[str | None] = []  # the stream's lease in Redis when the limit fired, and at the end

    def ignored(exc: BaseException) -> float:
        log.add(q, (0, type(exc).__name__), "ignored")
        leases.append(backend.queue_info(q)["lease"])
        return time.monotonic() + ignore_for

    def ended() -> None:
        leases.append(backend.queue_info(q)["lease"])
        log.add(q, 0, "end")

    def ignoring(i: int) -> None:
        log.add(q, i, "start")
        while i == 0:
            try:
                time.sleep(0.01)
            except BaseException as exc:
                until = ignored(exc)
                while time.monotonic() < until:
                    time.sleep(0.01)
                ended()
                raise

    async def aignoring(i: int) -> None:
        log.add(q, i, "start")
        while i == 0:
            try:
                await asyncio.sleep(3600)
            except BaseException as exc:
                until = ignored(exc)
                await asyncio.sleep(until - time.monotonic())
                ended()
                raise

    task = fifo(queue=q, name=f"{q}.ignoring", time_limit=0.2, max_retries=0)(ignoring if kind == "sync" else aignoring)
    task(0)
    task(1)
    start_worker([q], b=short)
    wait_until(lambda: log.items(q, "ignored"), message="the limit fired")
    start_worker([q], b=short)  # a second replica, ready to take the stream if it were let go
    wait_until(lambda: drained(backend, q), message="the task ended and the stream moved on")
    assert log.items(q, "ignored") == [(0, "TimeLimitExceeded" if kind == "sync" else "CancelledError")]
    assert [(item, event) for item, event in events(log, q) if event != "ignored"] == [
        (0, "start"),
        (0, "end"),
        (1, "start"),
    ], "nothing of the stream may start while the interrupted execution still runs"
    assert leases[0] is not None and leases == [leases[0]] * 2, "the same lease, renewed all along"
    (dead,) = backend.dead_letters(q)
    assert dead.header["error_type"] == "pyfiq.errors.TimeLimitExceeded"
    assert dead.header["deliveries"] == 1, "the lease never lapsed, so the task was never handed out again"


def test_the_running_long_warning_is_logged_once_per_attempt(backend, start_worker, caplog) -> None:  # type: ignore[no-untyped-def]
    q = qname()

    @fifo(queue=q, name=f"{q}.slow", time_warning=0.15, max_retries=1, retry_wait=0.01)
    def slow(seconds: float) -> None:
        time.sleep(seconds)
        if seconds and current_task().attempt == 1:
            raise OSError("flaky")

    caplog.set_level(logging.WARNING, logger="pyfiq")
    handle = slow(1.0)
    quick = slow(0)
    start_worker([q])
    wait_until(lambda: drained(backend, q))
    warnings = [r.pyfiq for r in caplog.records if r.pyfiq.get("event") == "pyfiq.task_running_long"]
    assert [(w["queue"], w["task_id"], w["attempt"]) for w in warnings] == [(q, handle.id, 1), (q, handle.id, 2)]
    # Each warning came while its attempt still ran (1 s), not when it ended.
    assert all(0.15 <= w["elapsed"] < 0.9 for w in warnings), warnings
    assert quick.id not in {w["task_id"] for w in warnings}
    assert backend.dead_letters(q) == []


def test_settings_give_the_defaults_and_a_task_s_own_options_win(backend, start_worker) -> None:  # type: ignore[no-untyped-def]
    q, log = qname(), Journal()
    limited = RedisQueueBackend(backend.url, backend.settings.replace(time_limit=0.3))

    @fifo(queue=q, name=f"{q}.default", max_retries=0)
    def by_default(i: int) -> None:
        log.add(q, i, "start")
        while True:
            time.sleep(0.01)

    @fifo(queue=q, name=f"{q}.own", time_limit=5)
    def own(i: int) -> None:
        log.add(q, i, "start")
        time.sleep(0.6)
        log.add(q, i, "end")

    by_default(0)
    own(1)
    start_worker([q], b=limited)
    wait_until(lambda: drained(backend, q), message="the default limit ended the first task")
    assert log.items(q) == [0, 1] and log.items(q, "end") == [1], "the task's own limit (5 s) overrides 0.3 s"
    (dead,) = backend.dead_letters(q)
    assert dead.header["error_type"] == "pyfiq.errors.TimeLimitExceeded"


def engine_run(retry: Retrying | None = None, **options: Any) -> TaskRun:
    """A ``TaskRun`` of a function with a 0.3 s limit, without a worker."""
    lease, clock = granted(), FakeClock()
    prepared = prepare(Entry.parse(entry(1)), 1, lease, lookup_of("app.charge"), SETTINGS, "r", clock=clock)
    assert isinstance(prepared, Prepared)
    fn = SimpleNamespace(
        policy=RetryPolicy.build(retry, options.get("max_retries"), options.get("retry_wait")),
        on_error=None,
        on_success=None,
        on_exhausted="dead-letter",
    )
    return TaskRun(Prepared(fn, prepared.record, prepared.context, time_limit=0.3), lease, clock)


def test_a_tenacity_predicate_decides_for_itself_whether_a_time_limit_is_retried() -> None:
    run = engine_run(max_retries=2, retry_wait=0)
    run.begin()
    assert run.after_failure(TimeLimitExceeded()) == 0, "pyfiq's own policies retry it"
    # tenacity's default predicate matches Exception, which TimeLimitExceeded is not.
    run = engine_run(Retrying(stop=stop_after_attempt(3), wait=wait_fixed(0)))
    run.begin()
    header = header_of(run.after_failure(TimeLimitExceeded()))
    assert (header["attempts"], header["error_type"]) == (1, "pyfiq.errors.TimeLimitExceeded")
    assert header["error"] == "the attempt ran past its time limit of 0.3s"
    chosen = retry_if_exception_type(OSError) | retry_if_exception_type(TimeLimitExceeded)
    run = engine_run(Retrying(retry=chosen, stop=stop_after_attempt(3), wait=wait_fixed(0)))
    run.begin()
    assert run.after_failure(TimeLimitExceeded()) == 0


BAD_SECONDS = [0, -1, math.inf, math.nan, "5", True, 2e9]


@pytest.mark.parametrize("name", ["time_limit", "time_warning"])
@pytest.mark.parametrize("value", BAD_SECONDS, ids=repr)
def test_limits_are_validated_like_other_times(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=name):
        fifo(queue="validated", name=f"validated.{name}", **{name: value})(lambda: None)
    with pytest.raises(ConfigurationError, match=name):
        Settings(**{name: value})


def test_limits_are_off_by_default_and_kept_as_seconds() -> None:
    assert Settings().time_limit is None and Settings().time_warning is None
    bound = fifo(queue="validated", name="validated.ok", time_limit=2, time_warning=0.5)(lambda: None)
    assert (bound.time_limit, bound.time_warning) == (2.0, 0.5)
    plain = fifo(queue="validated", name="validated.plain")(lambda: None)
    assert (plain.time_limit, plain.time_warning) == (None, None)
    assert not issubclass(TimeLimitExceeded, Exception), "a task's `except Exception` must not swallow it"
    assert pyfiq.TimeLimitExceeded is TimeLimitExceeded


def spin(seconds: float) -> None:
    """Run bytecode (where an exception raised in this thread lands) for ``seconds``."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


def test_a_timer_interrupts_the_running_function_and_never_the_code_after_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The timer thread may pick a limit up just as the function returns; firing it then must
    not raise in whatever the worker's thread runs next."""
    timers: list[Any] = []

    def call_later(delay: float, timer: Any) -> Any:
        timers.append(timer)
        return SimpleNamespace(cancel=lambda: None)  # too late: the timer thread has it in hand

    monkeypatch.setattr(limits.TIMERS, "call_later", call_later)
    reports: list[str] = []
    task = SimpleNamespace(
        time_limit=60.0,
        time_warning=30.0,
        running_long=lambda: reports.append("running long"),
        limit_reached=lambda: reports.append("limit"),
        events=Outbox(),
    )

    def fire(timer: Any) -> None:
        thread = threading.Thread(target=timer)
        thread.start()
        thread.join()

    assert call_with_limits(task, lambda: 42) == 42
    for late in timers:
        fire(late)
    spin(0.05)  # nothing pending may land here
    assert reports == []
    timers.clear()

    def stuck() -> None:
        warn, limit = timers
        fire(warn)
        fire(limit)
        spin(5)

    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        call_with_limits(task, stuck)
    assert time.monotonic() - started < 1 and reports == ["running long", "limit"]
    spin(0.05)
