"""Producers: enqueue journaled tasks and record where Redis placed each one, in Redis's own
order (a counter and Redis's clock read in the same MULTI/EXEC as the enqueue).
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from pyfiq.backend.backend import RedisQueueBackend
from pyfiq.config import Settings
from pyfiq.engine.protocol import ScriptCalls
from pyfiq.ops.scenario_tasks import (
    step_name,
)
from pyfiq.task import TaskRecord, new_task_id

from .journal import SEQ_BLOCK, Event, append_line


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
) -> Event:
    """Enqueue ``pyfiq.ops.scenario_tasks.step(seq, **kwargs)`` on ``queue`` and return what Redis
    accepted, with its exact place in the acceptance order.

    One MULTI/EXEC runs INCR of the queue's acceptance counter, the pyfiq enqueue script and
    TIME, so (Redis time, counter) orders acceptances exactly across producers and across
    Redis restarts. A connection error leaves the outcome unknown: the enqueue is retried
    under a dedup key, and a retry that finds the first attempt accepted (``duplicate``)
    records an acceptance whose place is unknown. ``name``: the task's registered name
    (default: the queue's step).
    """
    (line,) = enqueue_stamped_many(backend, queue, [(seq, kwargs, task_id)], give_up_at=give_up_at, name=name)
    return line


def enqueue_stamped_many(
    backend: RedisQueueBackend,
    queue: str,
    tasks: Sequence[tuple[int, dict[str, Any], str | None]],
    *,
    give_up_at: float,
    name: str | None = None,
) -> list[Event]:
    """``enqueue_stamped`` of several (seq, kwargs, task id or None) in one MULTI/EXEC: they
    reach the queue together, so a holder that claims it finds them all (and takes them ahead)."""
    records = [
        (task_id or new_task_id(), TaskRecord(name or step_name(queue), [seq], dict(kwargs)))
        for seq, kwargs, task_id in tasks
    ]
    items = backend.encode(records)
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
            for call in calls:
                pipe.incr(counter)
                backend.call(call, client=pipe)
            pipe.time()
            *replies, (sec, usec) = pipe.execute()
            break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.time() > give_up_at:
                return [
                    {"queue": queue, "seq": seq, "status": "failed", "attempts": attempts, "error": repr(exc)}
                    for seq, _, _ in tasks
                ]
            time.sleep(min(0.02 * 2**attempts, 0.5))
    lines = []
    for i, (call, (seq, _, _)) in enumerate(zip(calls, tasks, strict=True)):
        number, reply = replies[2 * i], replies[2 * i + 1]
        ((task_id, new),) = ScriptCalls.parse_enqueue(call, reply)
        lines.append(
            {
                "queue": queue,
                "seq": seq,
                "task_id": task_id,
                "status": "accepted" if new else "duplicate",
                "order": [int(sec) * 1_000_000 + int(usec), int(number)],
                "sent": sent,
                "t": time.time(),
                "attempts": attempts,
            }
        )
    return lines


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
    stop: threading.Event | None = None,
) -> tuple[str, int]:
    """Enqueue up to ``count`` tasks per queue (queues interleaved, shuffled per round) at
    ``rate`` per second, journaling each acceptance; returns (producer id, accepted)."""
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
                line = enqueue_stamped(backend, queue, seq, kwargs, give_up_at=deadline)
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


def _retry_until(fn: Callable[[], int], deadline: float) -> int:
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
) -> list[str]:
    """The producer command (the same one the compose ``producer`` service runs)."""
    return [
        sys.executable, "-m", "pyfiq_harness", "producer",
        "--redis", url, "--prefix", prefix, "--shards", str(shards), "--queues", ",".join(queues),
        "--count", str(count), "--rate", str(rate), "--hold", str(hold), "--dir", str(journal_dir),
        "--max-seconds", str(max_seconds), "--fail-every", str(fail_every),
    ]  # fmt: skip
