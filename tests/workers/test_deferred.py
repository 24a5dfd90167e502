"""A registry's deferrer (``pyfiq.deferred``): an integration holds enqueues and sends them later.

What the Django integration builds on: a held call has its task id at once and stores nothing;
``send`` stores what was held in call order per stream, in as few round trips as it may, and
says exactly what Redis holds when it stops part-way; ``on_commit=False`` and ``eager()`` go
around the deferrer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from pyfiq import AccessDeniedError, PartialEnqueueError, RedisQueueBackend, Registry, hooks
from pyfiq.deferred import ENQUEUE_CHUNK, Pending, send
from pyfiq.testing import eager, memory_backend
from pyfiq_harness.servers import free_port


class Holder:
    """A deferrer that holds every call while ``holding``."""

    def __init__(self) -> None:
        self.holding = True
        self.held: list[Pending] = []
        self.asked = 0

    def defer(self, tasks: Sequence[Pending]) -> bool:
        self.asked += 1
        if self.holding:
            self.held.extend(tasks)
        return self.holding


class Counts(hooks.Hooks):
    def __init__(self) -> None:
        self.stored: list[tuple[str, int]] = []

    def on_enqueue(self, queue: str, count: int) -> None:
        self.stored.append((queue, count))


def pending_ids(backend: RedisQueueBackend, stream: str) -> list[str]:
    entries = backend.client.lrange(backend.keys.stream(stream).pending, 0, -1)
    return [e.decode().split("|", 1)[0] for e in entries]


@pytest.fixture
def app() -> tuple[Registry, RedisQueueBackend, Holder, str]:
    registry = Registry()
    backend = memory_backend(registry=registry)
    holder = Holder()
    registry.deferrer = holder
    return registry, backend, holder, f"d-{uuid.uuid4().hex[:8]}"


def test_a_held_call_has_its_id_and_stores_nothing_until_sent_in_call_order(app: Any) -> None:
    registry, backend, holder, q = app

    @registry.fifo(queue=q, name=f"{q}.step", key=lambda stream, i: stream)
    def step(stream: str, i: int) -> None: ...

    calls = [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("b", 1)]
    handles = [step(*c) for c in calls]
    handles += step.enqueue_many([("b", 2), ("a", 3)])
    assert [len(h.id) for h in handles] == [32] * 7 and len({h.id for h in handles}) == 7
    assert [p.handle.id for p in holder.held] == [h.id for h in handles]
    assert pending_ids(backend, f"{q}#a") == pending_ids(backend, f"{q}#b") == [], "held, not sent"
    counts = Counts()
    hooks.add(counts)
    try:
        sent = send(holder.held)
    finally:
        hooks.remove(counts)
    assert [h.id for h in sent] == [h.id for h in handles]
    by_stream = {s: [h.id for h in handles if h.stream == f"{q}#{s}"] for s in "ab"}
    assert pending_ids(backend, f"{q}#a") == by_stream["a"], "each stream holds its calls in call order"
    assert pending_ids(backend, f"{q}#b") == by_stream["b"]
    assert counts.stored == [(q, 4), (q, 3)], "one round trip per stream"


def test_a_bad_call_raises_at_the_call_and_holds_nothing(app: Any) -> None:
    registry, _, holder, q = app

    @registry.fifo(queue=q, name=f"{q}.one")
    def one(x: int) -> None: ...

    with pytest.raises(TypeError):
        one(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        one.enqueue_many([(1,), (1, 2)])
    assert holder.held == [] and holder.asked == 0


def test_on_commit_false_and_a_deferrer_that_declines_send_at_once(app: Any) -> None:
    registry, backend, holder, q = app

    @registry.fifo(queue=q, name=f"{q}.one")
    def one(x: int) -> None: ...

    a = one.send_with_options(args=(1,), on_commit=False)
    (b,) = one.enqueue_many([(2,)], on_commit=False)
    c = asyncio.run(one.asend_with_options(args=(3,), on_commit=False))
    assert holder.asked == 0
    holder.holding = False
    d = one(4)
    e = asyncio.run(one.aenqueue(5))
    assert holder.asked == 2 and holder.held == []
    assert pending_ids(backend, q) == [h.id for h in (a, b, c, d, e)]


def test_an_async_call_is_held_like_a_sync_one(app: Any) -> None:
    registry, backend, holder, q = app

    @registry.fifo(queue=q, name=f"{q}.one")
    async def one(x: int) -> None: ...

    async def main() -> list[Any]:
        return [await one(1), await one.aenqueue(2)]

    handles = asyncio.run(main())
    assert [p.handle.id for p in holder.held] == [h.id for h in handles]
    assert pending_ids(backend, q) == []


def test_eager_mode_runs_the_call_and_never_asks_the_deferrer(app: Any) -> None:
    registry, _, holder, q = app
    ran: list[int] = []

    @registry.fifo(queue=q, name=f"{q}.one")
    def one(x: int) -> None:
        ran.append(x)

    with eager(registry=registry):
        one(1)
        one.enqueue_many([(2,), (3,)])
    assert ran == [1, 2, 3] and holder.asked == 0


def test_send_keeps_order_across_chunks_and_dedup_runs_and_finds_duplicates(app: Any) -> None:
    registry, backend, holder, q = app

    @registry.fifo(queue=q, name=f"{q}.one")
    def one(x: int) -> None: ...

    first = one.send_with_options(args=(0,), dedup_key="k1")
    handles = [one(i) for i in range(ENQUEUE_CHUNK + 3)]
    handles.append(one.send_with_options(args=(-1,), dedup_key="k1"))  # the same key: one task
    handles.append(one.send_with_options(args=(-2,), dedup_key="k2"))
    handles.append(one(-3))
    sent = send(holder.held)
    assert sent[0].id == first.id and not sent[0].duplicate
    assert sent[-3].id == first.id and sent[-3].duplicate, "the repeat answers the first task's id"
    assert pending_ids(backend, q) == [first.id, *(h.id for h in handles if h is not handles[-3])]


def test_a_send_that_fails_part_way_says_what_redis_holds_and_sends_nothing_after(app: Any) -> None:
    registry, backend, holder, q = app
    down = RedisQueueBackend(f"redis://127.0.0.1:{free_port()}/0", enqueue_timeout=0.2, enqueue_attempts=2)

    @registry.fifo(queue=q, name=f"{q}.step", key=lambda stream, i: stream)
    def step(stream: str, i: int) -> None: ...

    step("a", 0)
    step.send_with_options(args=("b", 0), backend=down)
    step("c", 0)
    step("a", 1)
    with pytest.raises(PartialEnqueueError) as caught:
        send(holder.held, what="the commit's send", advice="re-send them")
    error = caught.value
    # Nothing listens where "b" goes: it was never sent, so it is unsent, not maybe stored.
    assert (error.accepted, error.unknown, error.unsent) == ([0, 3], [], [1, 2])
    assert str(error).startswith("the commit's send stopped: Redis confirmed 2 of 4 calls")
    assert "re-send them" in str(error)
    assert pending_ids(backend, f"{q}#a") == [holder.held[0].handle.id, holder.held[3].handle.id]
    assert pending_ids(backend, f"{q}#c") == [], "nothing was sent after the failed round trip"


class AfterFirstChunk(hooks.Hooks):
    """Changes Redis once the first round trip of a send was stored."""

    def __init__(self, change: Any) -> None:
        self.change = change
        self.done = False

    def on_enqueue(self, queue: str, count: int) -> None:
        if not self.done:
            self.done = True
            self.change()


@pytest.fixture
def refusing(own_redis: Any) -> Any:
    registry = Registry()
    backend = RedisQueueBackend(own_redis.url, prefix=f"r{uuid.uuid4().hex[:8]}", enqueue_timeout=0.5)
    registry.configure(backend)

    @registry.fifo(queue="refused", name="refused.step", key=lambda stream, i: stream)
    def step(stream: str, i: int) -> None: ...

    yield backend, step, own_redis.client()
    backend.close()


@pytest.mark.parametrize("refusal", ["oom", "acl"])
def test_a_chunk_redis_refused_is_unsent_and_resending_the_unsent_leaves_no_gap(refusing: Any, refusal: str) -> None:
    """A refusal (out of memory, an ACL) is Redis's answer: the chunk is certainly not stored, so
    it is listed as unsent, and re-sending the unsent calls keeps every stream whole."""
    backend, step, admin = refusing
    calls = [("a", i) for i in range(ENQUEUE_CHUNK * 2 + 200)] + [("b", i) for i in range(10)]
    if refusal == "oom":
        change, restore = (lambda: admin.config_set("maxmemory", 1)), (lambda: admin.config_set("maxmemory", 0))
    else:
        change = lambda: admin.execute_command("ACL", "SETUSER", "default", "-evalsha", "-eval")  # noqa: E731
        restore = lambda: admin.execute_command("ACL", "SETUSER", "default", "+@all")  # noqa: E731
    listener = AfterFirstChunk(change)
    hooks.add(listener)
    try:
        with pytest.raises(PartialEnqueueError) as caught:
            step.enqueue_many(calls)
    finally:
        hooks.remove(listener)
        restore()
    error = caught.value
    assert error.accepted == list(range(ENQUEUE_CHUNK)) and error.unknown == []
    assert error.unsent == list(range(ENQUEUE_CHUNK, len(calls)))
    step.enqueue_many([calls[i] for i in error.unsent])  # as the error advises
    stream_a = [h.id for h in error.handles[: ENQUEUE_CHUNK * 2 + 200]]
    assert len(pending_ids(backend, "refused#a")) == len(stream_a), "no call stored twice, none missing"
    assert pending_ids(backend, "refused#a")[:ENQUEUE_CHUNK] == stream_a[:ENQUEUE_CHUNK]
    assert len(pending_ids(backend, "refused#b")) == 10


def test_a_refusal_of_the_first_chunk_is_raised_as_it_is(refusing: Any) -> None:
    backend, step, admin = refusing
    admin.execute_command("ACL", "SETUSER", "default", "-evalsha", "-eval")
    try:
        with pytest.raises(AccessDeniedError):
            step.enqueue_many([("a", i) for i in range(10)])
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+@all")
    assert pending_ids(backend, "refused#a") == []


def test_two_backends_of_one_deployment_keep_a_streams_order(app: Any) -> None:
    """Held calls that name two backend objects of the same Redis and prefix are one stream."""
    registry, backend, holder, q = app
    twin = RedisQueueBackend(backend.url, prefix=backend.keys.prefix)

    @registry.fifo(queue=q, name=f"{q}.notify")
    def notify(x: str) -> None: ...

    a = notify("a")
    b = notify.send_with_options(args=("b",), backend=twin)
    c = notify("c")
    send(holder.held)
    assert pending_ids(backend, q) == [a.id, b.id, c.id]
