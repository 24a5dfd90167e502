"""Group commit for producers: concurrent enqueues of one backend share round trips.

A web tier enqueues from many threads (or asyncio tasks) at once. Each caller queues its request;
whoever finds no round trip under way sends everything queued in one pipeline (one ``enqueue``
script call per stream, or per request where dedup keys are involved) and hands every caller its
own reply, then passes the turn to the oldest caller still waiting. A caller alone sends at once,
on the plain one-call path: no thread, no timer and no added latency.

Order is kept per stream in the order callers queued (a caller's next enqueue is queued only once
its previous one returned, so a producer's own order always holds). An error of the shared round
trip goes to every caller in it, who then retries alone on the backend's usual path; as for any
enqueue without a dedup key, a reply lost after Redis stored the tasks can store them twice.
"""

from __future__ import annotations

import _thread
import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engine.protocol import Call, Ops

if TYPE_CHECKING:
    from .backend import RedisQueueBackend

Items = Sequence[tuple[str, int, bytes]]


@dataclass(eq=False)
class Request:
    stream: str
    items: Items
    dedup: Sequence[str] | None
    result: list[tuple[str, bool]] | None = None
    error: BaseException | None = None
    #: Set when this caller is to send the next round trip.
    lead: bool = False
    #: Made only for a caller that waits (one alone never needs it): a lock made held, which
    #: the caller blocks on and whoever wakes it releases. Lighter than an Event, whose
    #: Condition allocates a waiter lock on every wait.
    wake: _thread.LockType | None = None


def merged(ops: Ops, batch: Sequence[Request]) -> list[tuple[Call, list[Request]]]:
    """The script calls that carry ``batch``: requests to the same stream without dedup keys
    go in one call, in the order queued; a request with dedup keys goes alone."""
    calls: list[tuple[Call, list[Request]]] = []
    open_: dict[str, list[Request]] = {}
    groups: list[list[Request]] = []
    for req in batch:
        if req.dedup:
            groups.append([req])
            continue
        group = open_.get(req.stream)
        if group is None:
            group = open_[req.stream] = []
            groups.append(group)
        group.append(req)
    for group in groups:
        items = [item for req in group for item in req.items]
        calls.append((ops.enqueue(group[0].stream, items, group[0].dedup), group))
    return calls


def deliver(calls: Sequence[tuple[Call, list[Request]]], replies: Sequence[Any]) -> None:
    """Give each request its part of its call's reply, or the call's error."""
    for (call, group), reply in zip(calls, replies, strict=True):
        if isinstance(reply, BaseException):
            for req in group:
                req.error = reply
            continue
        parsed = Ops.parse_enqueue(call, reply)
        start = 0
        for req in group:
            req.result = parsed[start : start + len(req.items)]
            start += len(req.items)


class Coalescer:
    """The threads' side: one per backend."""

    def __init__(self, backend: RedisQueueBackend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._queue: list[Request] = []
        self._busy = False

    def enqueue(self, stream: str, items: Items, dedup: Sequence[str] | None) -> list[tuple[str, bool]]:
        req = Request(stream, items, dedup)
        with self._lock:
            self._queue.append(req)
            if self._busy:
                req.wake = threading.Lock()
                req.wake.acquire()
            else:
                self._busy = req.lead = True
        if req.wake is not None:
            req.wake.acquire()
        if req.lead:
            self._send_turn()
        if req.result is not None:
            return req.result
        # The shared round trip failed: alone, on the usual path, with its retries.
        return self.backend.enqueue_alone(stream, items, dedup)

    def _send_turn(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            if len(batch) == 1:
                req = batch[0]
                try:
                    req.result = self.backend.enqueue_once(req.stream, req.items, req.dedup)
                except Exception as exc:
                    req.error = exc
            else:
                calls = merged(self.backend.ops, batch)
                try:
                    replies = self.backend.send_enqueues([call for call, _ in calls])
                except Exception as exc:
                    replies = [exc] * len(calls)
                deliver(calls, replies)
        finally:
            with self._lock:
                if self._queue:
                    nxt = self._queue[0]
                    nxt.lead = True
                    assert nxt.wake is not None
                    nxt.wake.release()
                else:
                    self._busy = False
            for req in batch:
                if req.wake is not None and not req.lead:
                    req.wake.release()


class AsyncCoalescer:
    """The event loop's side: one per backend and loop."""

    def __init__(self, backend: RedisQueueBackend) -> None:
        self.backend = backend
        self._queue: list[tuple[Request, asyncio.Future[None]]] = []
        self._busy = False
        self._spawned: set[asyncio.Future[None]] = set()

    def _spawn_turn(self) -> None:
        # Kept referenced until done: the loop holds only a weak reference to a task.
        task = asyncio.ensure_future(self._send_turn())
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def enqueue(self, stream: str, items: Items, dedup: Sequence[str] | None) -> list[tuple[str, bool]]:
        req = Request(stream, items, dedup)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((req, turn))
        if self._busy:
            try:
                await turn
            except asyncio.CancelledError:
                if req.lead and req.result is None:  # handed the turn as it was cancelled: pass it on
                    self._spawn_turn()
                raise
        else:
            self._busy = req.lead = True
        if req.lead and req.result is None and req.error is None:
            await self._send_turn()
        if req.result is not None:
            return req.result
        return await self.backend.aenqueue_alone(stream, items, dedup)

    async def _send_turn(self) -> None:
        batch, self._queue = self._queue, []
        requests = [req for req, _ in batch]
        try:
            if len(requests) == 1:
                req = requests[0]
                try:
                    req.result = await self.backend.aenqueue_once(req.stream, req.items, req.dedup)
                except Exception as exc:
                    req.error = exc
            elif requests:
                calls = merged(self.backend.ops, requests)
                try:
                    replies = await self.backend.asend_enqueues([call for call, _ in calls])
                except Exception as exc:
                    replies = [exc] * len(calls)
                deliver(calls, replies)
        finally:
            if self._queue:
                nxt, turn = self._queue[0]
                nxt.lead = True
                if turn.done():  # its caller was cancelled meanwhile: its request still goes
                    self._spawn_turn()
                else:
                    turn.set_result(None)
            else:
                self._busy = False
            for _, done in batch:
                if not done.done():
                    done.set_result(None)
