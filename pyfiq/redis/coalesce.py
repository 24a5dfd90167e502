"""Group commit for producers: concurrent enqueues of one backend share round trips.

A web tier enqueues from many threads (or asyncio tasks) at once. Each caller queues its request;
whoever finds no round trip under way sends everything queued in one pipeline (one ``enqueue``
script call per stream, or per request where dedup keys are involved) and hands every caller its
own reply, then passes the turn to the oldest caller still waiting. A caller alone sends at once,
on the plain one-call path: no thread, no timer and no added latency.

The threads of one round trip are woken one after another, each by the one before it, the last
handing the turn on: woken all at once they would fight over the interpreter lock, which cost
16 producer threads about six context switches per enqueue, against 1.5 this way (the benchmark
counts them). A caller
interrupted while it waits (a signal handler raising in the main thread) steps out of that
chain without breaking it: it is skipped, and passes on a wake-up or turn that reached it.

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
from itertools import pairwise
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
    #: The caller of the same round trip this one wakes once woken (None: the last, which
    #: hands the turn on).
    then: Request | None = None
    #: Released by whoever woke it (under the coalescer's lock).
    woken: bool = False
    #: Its caller was interrupted while waiting: skipped by wake-ups, never made to lead.
    abandoned: bool = False


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
            try:
                req.wake.acquire()
            except BaseException:
                self._abandon(req)
                raise
            if not req.lead:
                self._pass(req.then)
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
            waiting = [req for req in batch if req.wake is not None and not req.lead]
            for req, nxt in pairwise(waiting):
                req.then = nxt
            self._pass(waiting[0] if waiting else None)

    def _pass(self, nxt: Request | None) -> None:
        """Wake ``nxt`` or the first caller after it in its chain that still waits; past the
        chain's end, hand the turn to the oldest caller queued (or end the turns)."""
        with self._lock:
            while nxt is not None and nxt.abandoned:
                nxt = nxt.then
            if nxt is None:
                if not self._queue:
                    self._busy = False
                    return
                nxt = self._queue[0]
                nxt.lead = True
            nxt.woken = True
            assert nxt.wake is not None
            nxt.wake.release()

    def _abandon(self, req: Request) -> None:
        """Its caller was interrupted while waiting. Not yet sent: it leaves the queue and is
        never sent. Already sent: its reply is dropped (the tasks may be stored, as for any
        interrupted call). A wake-up or turn that reached it goes on to the next caller."""
        with self._lock:
            req.abandoned = True
            if req in self._queue and not req.woken:
                self._queue.remove(req)
                return
            if req.lead and req in self._queue:
                self._queue.remove(req)
        if req.woken:
            self._pass(None if req.lead else req.then)


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
