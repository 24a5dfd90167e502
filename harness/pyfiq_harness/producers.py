"""Producers: enqueue journaled tasks and record where Redis placed each one, in Redis's own
order (a counter and Redis's clock read in the same MULTI/EXEC as the enqueue); a share of them
delayed, with the due time Redis gave each (its status read in that same MULTI/EXEC).
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import redis

from pyfiq.backend.backend import RedisQueueBackend
from pyfiq.backend.failures import is_unlaid
from pyfiq.config import Settings
from pyfiq.engine.protocol import ENQUEUE_ITEMS, ScriptCalls
from pyfiq.ops.scenario_tasks import (
    step_name,
)
from pyfiq.task import NOW, TaskRecord, due_spec, new_task_id

from .journal import SEQ_BLOCK, Event, append_line

T = TypeVar("T")

#: Bounds of a delayed task's delay, in seconds: long enough that tasks enqueued meanwhile
#: overtake it, short enough that many join within a run and none holds up the drain.
MIN_DELAY = 0.2
MAX_DELAY = 2.0


def order_key(queue: str, keys: Any) -> str:
    """The per-queue acceptance counter, in the stream's hash tag (one slot with its keys)."""
    return f"{keys.stream(queue).pending}:accepted"


def enqueue_stamped(
    backend: RedisQueueBackend,
    queue: str,
    seq: int,
    kwargs: dict[str, Any],
    *,
    give_up_at: float,
    task_id: str | None = None,
    name: str | None = None,
    delay: float = 0.0,
) -> Event:
    """Enqueue ``pyfiq.ops.scenario_tasks.step(seq, **kwargs)`` on ``queue`` and return what Redis
    accepted, with its exact place in the acceptance order.

    One MULTI/EXEC runs INCR of the queue's acceptance counter, TIME, the pyfiq enqueue script
    and TIME again, so (Redis time, counter) orders acceptances exactly across producers and
    across Redis restarts, and the two readings of Redis's clock bracket the one the script
    stamped the task with. A connection error leaves the outcome unknown: the enqueue is retried
    under a dedup key, and a retry that finds the first attempt accepted (``duplicate``)
    records an acceptance whose place is unknown. ``name``: the task's registered name
    (default: the queue's step). ``delay``: seconds by Redis's clock before the task joins its
    queue (see ``enqueue_stamped_many``).
    """
    (line,) = enqueue_stamped_many(
        backend, queue, [(seq, kwargs, task_id)], give_up_at=give_up_at, name=name, delays=[delay]
    )
    return line


def enqueue_stamped_many(
    backend: RedisQueueBackend,
    queue: str,
    tasks: Sequence[tuple[int, dict[str, Any], str | None]],
    *,
    give_up_at: float,
    name: str | None = None,
    delays: Sequence[float] | None = None,
) -> list[Event]:
    """``enqueue_stamped`` of several (seq, kwargs, task id or None) in one MULTI/EXEC: they
    reach the queue together, so a holder that claims it finds them all (and takes them ahead).

    ``delays``: seconds per task (0: at once). A delayed task's line carries ``delay_ms``, and
    ``due``, the Redis ms at which it joins its queue, as the status script read it in the same
    MULTI/EXEC as the enqueue: nothing can move the task in between, so that is the due time
    Redis holds, to the ms. Adding the delay to a TIME of the transaction instead would be a ms
    off whenever the enqueue script's own reading fell in the next ms (the checker still holds
    ``due`` to those readings, and to the enqueue stamp the task's runs journal). ``due`` is
    None for a duplicate (this attempt's status names an id Redis never stored; the task's
    place is unknown anyway), and for a task Redis did not hold as ``scheduled``, which the
    checker reports.
    """
    whens = [NOW if not d else due_spec(delay=d) for d in (delays or [0.0] * len(tasks))]
    records = [
        (task_id or new_task_id(), TaskRecord(name or step_name(queue), [seq], dict(kwargs)))
        for seq, kwargs, task_id in tasks
    ]
    items = [backend.encode([record], when=when)[0] for record, when in zip(records, whens, strict=True)]
    calls = [
        backend.ops.enqueue(queue, [item], [f"scenario-{seq}"]) for item, (seq, _, _) in zip(items, tasks, strict=True)
    ]
    counter = order_key(queue, backend.keys)
    sent = time.time()
    attempts = 0
    while True:
        attempts += 1
        try:
            pipe = backend.client.pipeline(transaction=True)
            for call, when in zip(calls, whens, strict=True):
                pipe.incr(counter)
                pipe.time()
                backend.call(call, client=pipe)
                if when != NOW:
                    task_id = call.args[ENQUEUE_ITEMS]
                    backend.call(backend.ops.status(queue, task_id), client=pipe)
            pipe.time()
            replies = pipe.execute()
            break
        except redis.ResponseError as exc:
            if not is_unlaid(exc):  # the shard has no layout yet (the script stored nothing)
                raise
            _retry_until(lambda: backend.transport.lay_out(backend.keys.shard_of(queue)), give_up_at)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.time() > give_up_at:
                return [
                    {"queue": queue, "seq": seq, "status": "failed", "attempts": attempts, "error": repr(exc)}
                    for seq, _, _ in tasks
                ]
            time.sleep(min(0.02 * 2**attempts, 0.5))
    lines = []
    at = 0
    for call, when, (seq, _, _) in zip(calls, whens, tasks, strict=True):
        number, before, reply = replies[at : at + 3]
        at += 3
        status = None
        if when != NOW:
            status = replies[at]
            at += 1
        after = replies[at + 1] if at + 1 < len(replies) else replies[-1]  # the next TIME read
        ((task_id, new),) = ScriptCalls.parse_enqueue(call, reply)
        line: Event = {
            "queue": queue,
            "seq": seq,
            "task_id": task_id,
            "status": "accepted" if new else "duplicate",
            "order": [_us(after), int(number)],
            "order_from": _us(before),
            "sent": sent,
            "t": time.time(),
            "attempts": attempts,
        }
        if status is not None:
            # A duplicate's status is that of the id this attempt sent, which Redis never stored.
            state = _text(status[0]) if new else None
            line["delay_ms"] = int(when[1:])
            line["scheduled"] = state
            line["due"] = int(status[1]) if state == "scheduled" else None
        lines.append(line)
    return lines


def _us(time_reply: Any) -> int:
    """A TIME reply (seconds, microseconds) in microseconds."""
    sec, usec = time_reply
    return int(sec) * 1_000_000 + int(usec)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def produce(
    url: str,
    *,
    prefix: str,
    shards: int,
    queues: Sequence[str],
    count: int,
    rate: float,
    hold: float,
    journal_dir: Path,
    max_seconds: float,
    fail_every: int = 0,
    delayed: float = 0.0,
    max_delay: float = MAX_DELAY,
    stop: threading.Event | None = None,
) -> tuple[str, int]:
    """Enqueue up to ``count`` tasks per queue (queues interleaved, shuffled per round) at
    ``rate`` per second, journaling each acceptance; returns (producer id, accepted).
    ``delayed``: the share of tasks enqueued with a delay, drawn between ``MIN_DELAY`` and
    ``max_delay`` seconds."""
    backend = RedisQueueBackend(url, Settings(prefix=prefix, shards=shards))
    stop = stop or threading.Event()
    deadline = time.time() + max_seconds
    try:
        number = _retry_until(lambda: int(backend.client.incr(f"{prefix}:scenario:producers")), deadline)
        producer = f"p{number}"
        journal = journal_dir / f"accepted-{producer}.jsonl"
        rng = random.Random(number)
        interval = 1.0 / rate if rate > 0 else 0.0
        next_at = time.monotonic()
        accepted = n = 0
        for _ in range(count):
            round_ = list(queues)
            rng.shuffle(round_)
            for queue in round_:
                if stop.is_set() or time.time() > deadline:
                    return producer, accepted
                seq = number * SEQ_BLOCK + n
                n += 1
                kwargs: dict[str, Any] = {"hold": hold}
                if fail_every and n % fail_every == fail_every // 2:
                    kwargs["fail_attempts"] = 1
                delay = round(rng.uniform(MIN_DELAY, max_delay), 3) if rng.random() < delayed else 0.0
                line = enqueue_stamped(backend, queue, seq, kwargs, give_up_at=deadline, delay=delay)
                line["producer"] = producer
                append_line(journal, line)
                accepted += line["status"] != "failed"
                next_at += interval
                pause = next_at - time.monotonic()
                if pause > 0:
                    stop.wait(pause)
                else:
                    next_at = time.monotonic()
        return producer, accepted
    finally:
        backend.close()


def _retry_until(fn: Callable[[], T], deadline: float) -> T:
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def producer_argv(
    url: str,
    *,
    prefix: str,
    shards: int,
    queues: Sequence[str],
    count: int,
    rate: float,
    hold: float,
    journal_dir: Path | str,
    max_seconds: float,
    fail_every: int,
    delayed: float = 0.0,
) -> list[str]:
    """The producer command (the same one the compose ``producer`` service runs)."""
    return [
        sys.executable, "-m", "pyfiq_harness", "producer",
        "--redis", url, "--prefix", prefix, "--shards", str(shards), "--queues", ",".join(queues),
        "--count", str(count), "--rate", str(rate), "--hold", str(hold), "--dir", str(journal_dir),
        "--max-seconds", str(max_seconds), "--fail-every", str(fail_every), "--delayed", str(delayed),
    ]  # fmt: skip
