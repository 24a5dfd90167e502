"""Group commit for producers: concurrent enqueues of one backend share round trips.

A web tier enqueues from many threads (or asyncio tasks) at once. Each caller queues its request;
whoever finds no round trip under way sends everything queued in one write (one ``enqueue``
script call per stream, or per request where dedup keys are involved) and hands every caller its
own reply, then passes the turn to the oldest caller still waiting. A caller alone sends at once,
on the plain one-call path: no thread, no timer and no added latency.

The threads of one round trip are woken one after another, each by the one before it, the last
handing the turn on: woken all at once they would fight over the interpreter lock, which cost
16 producer threads about six context switches per enqueue, against 1.5 this way (the benchmark
counts them). A caller interrupted while it waits (a signal handler raising in the main thread)
steps out of that chain without breaking it: it is skipped, and passes on a wake-up or turn that
reached it.

Order is kept per stream in the order callers queued (a caller's next enqueue is queued only once
its previous one returned, so a producer's own order always holds).

One caller, one outcome. A shared round trip carries other callers' requests, so nothing one
caller does may decide the others' outcome, and each gets its own: its handle, or an error that
says whether its tasks may be stored. What can happen to a round trip from outside:

- its leader is cancelled (asyncio) or interrupted (a signal handler's ``KeyboardInterrupt``,
  ``TimeLimitExceeded`` in a task that enqueues) while it sends or reads: the round trip goes on
  without it, in a task of its own (asyncio) or in a thread started for the purpose, which reads
  the replies on the others' behalf. The leader's own request is in the round trip like anyone
  else's: it may be stored.
- Redis fails it: a call Redis refused, or that failed before its request was written, ran
  nothing, and its callers retry alone; one whose request may have reached Redis is never sent
  again blindly (``EnqueueOutcomeUnknown``, unless each task has a dedup key, which makes the
  re-send safe: see ``enqueue``).
- a caller waiting gives up (interrupted, cancelled, or ``enqueue_timeout`` ran out: every wait
  is bounded by it): a request not yet sent leaves the queue and is never sent; one already
  sent may be stored, and the error says so.
- the process forks: in the child only the forking thread exists, so the round trip under way,
  its waiting callers and the locks they held are the parent's; the child's coalescers start
  empty (``os.register_at_fork``) and its lean connections are its own.
"""

from __future__ import annotations

import _thread
import asyncio
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Protocol

import redis

from ..config import Settings
from ..engine.protocol import Call, ScriptCalls
from ..task import EncodedTask
from .lean import Attempt

Items = Sequence[EncodedTask]
Stored = list[tuple[str, bool]]


class RoundTrip(Protocol):
    """A shared round trip another thread can finish (``lean.Exchange``)."""

    sent: bool
    replies: list[Any]

    def run(self) -> list[Any]: ...

    def finish(self) -> list[Any]: ...


class EnqueuePath(Protocol):
    """What the coalescers need of the enqueue path they serve (``enqueue.Enqueuer``)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def ops(self) -> ScriptCalls: ...

    def try_once(self, stream: str, tasks: Items, dedup_keys: Sequence[str] | None, attempt: Attempt) -> Stored: ...

    async def atry_once(
        self, stream: str, tasks: Items, dedup_keys: Sequence[str] | None, attempt: Attempt
    ) -> Stored: ...

    def shared_round_trip(self, calls: Sequence[Call]) -> RoundTrip: ...

    async def ashared_round_trip(self, calls: Sequence[Call], attempt: Attempt) -> list[Any]: ...

    def retry_alone(
        self,
        stream: str,
        tasks: Items,
        dedup_keys: Sequence[str] | None,
        *,
        sent: bool = False,
        cause: BaseException | None = None,
        started: float | None = None,
    ) -> Stored: ...

    async def aretry_alone(
        self,
        stream: str,
        tasks: Items,
        dedup_keys: Sequence[str] | None,
        *,
        sent: bool = False,
        cause: BaseException | None = None,
        started: float | None = None,
    ) -> Stored: ...

    def timed_out(self, stream: str, tasks: Items, sent: bool) -> Exception: ...


@dataclass(eq=False)
class Request:
    stream: str
    items: Items
    dedup: Sequence[str] | None
    result: Stored | None = None
    error: BaseException | None = None
    #: With ``error``: its request may have been written to Redis, so its tasks may be stored.
    sent: bool = False
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
    #: It has handed on what reached it (a wake-up, or as a leader the round trip's): once only.
    passed: bool = False
    #: Its caller left while waiting: skipped by wake-ups, never made to lead.
    abandoned: bool = False


def merged(ops: ScriptCalls, batch: Sequence[Request]) -> list[tuple[Call, list[Request]]]:
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


def _fail(req: Request, error: BaseException, sent: bool) -> None:
    if req.result is None and req.error is None:
        req.error, req.sent = error, sent


def deliver(
    calls: Sequence[tuple[Call, list[Request]]],
    replies: Sequence[Any],
    failure: BaseException | None = None,
    sent: bool = False,
) -> None:
    """Give each request its part of its call's reply. An error reply is its call's error
    (Redis refused the call: nothing of it ran). The calls past ``replies`` get ``failure``,
    ``sent`` saying whether they may have run. A request already settled keeps its outcome, so
    that whoever finishes an interrupted round trip can deliver it again."""
    for i, (call, group) in enumerate(calls):
        if i >= len(replies):
            for req in group:
                _fail(req, failure or redis.ConnectionError("no reply"), sent)
            continue
        reply = replies[i]
        if isinstance(reply, BaseException):
            for req in group:
                _fail(req, reply, False)
            continue
        try:
            parsed = ScriptCalls.parse_enqueue(call, reply)
        except Exception as exc:  # a reply that does not fit its call: it ran, but to what effect?
            for req in group:
                _fail(req, exc, True)
            continue
        start = 0
        for req in group:
            if req.result is None and req.error is None:
                req.result = parsed[start : start + len(req.items)]
            start += len(req.items)


#: Every coalescer of the process, emptied in a forked child.
_LIVE: weakref.WeakSet[Coalescer | AsyncCoalescer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for coalescer in list(_LIVE):
        coalescer.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Coalescer:
    """The threads' side: one per backend."""

    def __init__(self, path: EnqueuePath) -> None:
        self.path = path
        self.reset()
        _LIVE.add(self)

    def reset(self) -> None:
        """Start empty (in a forked child: see the module)."""
        self._lock = threading.Lock()
        self._queue: list[Request] = []
        self._busy = False

    def enqueue(self, stream: str, items: Items, dedup: Sequence[str] | None) -> Stored:
        started = time.monotonic()
        req = Request(stream, items, dedup)
        try:
            with self._lock:
                self._queue.append(req)
                if self._busy:
                    req.wake = threading.Lock()
                    req.wake.acquire()
                else:
                    self._busy = req.lead = True
            if req.wake is not None:
                if not req.wake.acquire(timeout=self.path.settings.enqueue_timeout):
                    self._expire(req)
                if req.woken and not req.lead:
                    self._pass(req, req.then)
            if req.lead:
                self._send_turn(req)
        except BaseException:
            self._abandon(req)
            raise
        if req.result is not None:
            return req.result
        # Not answered by the shared round trip: alone, on the usual path, unless it may be stored.
        return self.path.retry_alone(stream, items, dedup, sent=req.sent, cause=req.error, started=started)

    def _send_turn(self, leader: Request) -> None:
        batch: list[Request] = []
        calls: list[tuple[Call, list[Request]]] = []
        trip: Any = None
        try:
            with self._lock:
                batch, self._queue = self._queue, []
            if len(batch) == 1:
                self._send_alone(batch[0])
            else:
                calls = merged(self.path.ops, batch)
                trip = self.path.shared_round_trip([call for call, _ in calls])
                try:
                    replies = trip.run()
                except Exception as exc:
                    deliver(calls, trip.replies, exc, trip.sent)
                else:
                    deliver(calls, replies)
            self._wake(leader, batch)
        except BaseException:
            # The leader was interrupted (a signal handler, an async exception): the round trip
            # is the others' too, and a thread of its own finishes it for them.
            rescue = threading.Thread(
                target=self._conclude, args=(leader, batch, calls, trip), name="pyfiq-round-trip", daemon=True
            )
            try:
                rescue.start()
            except RuntimeError:  # the interpreter is shutting down: no thread can start
                self._conclude(leader, batch, calls, trip)
            raise

    def _send_alone(self, req: Request) -> None:
        attempt = Attempt()
        try:
            req.result = self.path.try_once(req.stream, req.items, req.dedup, attempt)
        except Exception as exc:
            req.error, req.sent = exc, attempt.sent

    def _conclude(
        self, leader: Request, batch: list[Request], calls: list[tuple[Call, list[Request]]], trip: Any
    ) -> None:
        """What an interrupted leader left undone, in any state it left it: the replies read,
        each caller answered (again, for those already answered: no change), the callers woken."""
        try:
            if trip is not None:
                try:
                    replies = trip.finish()
                except Exception as exc:
                    deliver(calls, trip.replies, exc, trip.sent)
                else:
                    deliver(calls, replies)
            else:
                for req in batch:
                    _fail(req, redis.ConnectionError("the caller sending it was interrupted first"), False)
        finally:
            self._wake(leader, batch)

    def _wake(self, leader: Request, batch: Sequence[Request]) -> None:
        waiting = [req for req in batch if req.wake is not None and not req.lead]
        for req, nxt in pairwise(waiting):
            req.then = nxt
        self._pass(leader, waiting[0] if waiting else None)

    def _pass(self, owner: Request, nxt: Request | None) -> None:
        """Wake ``nxt`` or the first caller after it in its chain that still waits; past the
        chain's end, hand the turn to the oldest caller queued (or end the turns). ``owner``
        (the waker) does so once only, however often it is asked to."""
        with self._lock:
            if owner.passed:
                return
            owner.passed = True
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

    def _expire(self, req: Request) -> None:
        """Its wait ran out (``enqueue_timeout``). Not yet sent: it leaves the queue, never to be
        sent, and ``BackendUnavailableError`` says nothing was stored. Sent but not answered:
        ``EnqueueOutcomeUnknown``. Returns if a wake-up crossed the timeout, or its round trip
        ended and only the wake-up is late (it is then skipped by it)."""
        with self._lock:
            if req.woken:
                return
            req.abandoned = True
            if req.result is not None or req.error is not None:
                return
            queued = req in self._queue
            if queued:
                self._queue.remove(req)
        raise self.path.timed_out(req.stream, req.items, sent=not queued)

    def _abandon(self, req: Request) -> None:
        """Its caller left (interrupted, or its wait ran out). Not yet sent: it leaves the queue
        and is never sent. Already sent: its reply is dropped (the tasks may be stored, as for
        any interrupted call). A wake-up or turn that reached it goes on to the next caller; a
        round trip it leads is finished by ``_conclude``."""
        with self._lock:
            if req.abandoned:
                return
            req.abandoned = True
            if req in self._queue:
                self._queue.remove(req)
                if not req.lead:
                    return
            elif not req.woken or req.lead:
                return
        self._pass(req, None if req.lead else req.then)


#: What a waiting caller's future is resolved with when ``enqueue_timeout`` ran out (a result,
#: not an exception: a caller that left meanwhile leaves no unretrieved exception behind).
_EXPIRED = object()

Turn = asyncio.Future[Any]


class AsyncCoalescer:
    """The event loop's side: one per backend and event loop.

    Waits are bounded by one timer per turn rather than one per caller: armed when a turn has
    callers waiting on it, cancelled when it ends; if it fires, the turn did not end within
    ``enqueue_timeout`` and every caller waiting gives up (see ``_expire``)."""

    def __init__(self, path: EnqueuePath, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.loop = loop
        self.reset()
        _LIVE.add(self)

    def reset(self) -> None:
        """Start empty (in a forked child: see the module)."""
        self._queue: list[tuple[Request, Turn | None]] = []
        self._busy = False
        self._spawned: set[asyncio.Future[None]] = set()
        #: The round trip under way (its callers), and the future its leader awaits if shared.
        self._flight: list[tuple[Request, Turn | None]] = []
        self._leading: Turn | None = None
        self._watch: asyncio.TimerHandle | None = None

    async def enqueue(self, stream: str, items: Items, dedup: Sequence[str] | None) -> Stored:
        started = time.monotonic()
        req = Request(stream, items, dedup)
        if self._busy:
            turn: Turn = self.loop.create_future()
            self._queue.append((req, turn))
            if self._watch is None:
                self._arm()
            try:
                woken = await turn
            except asyncio.CancelledError:
                self._leave(req)
                raise
            if woken is _EXPIRED:
                sent = not self._leave(req)
                if req.result is None and req.error is None:
                    raise self.path.timed_out(stream, items, sent)
        else:
            self._busy = req.lead = True
            self._queue.append((req, None))
        if req.lead:
            await self._lead(req)
        if req.result is not None:
            return req.result
        # Not answered by the shared round trip: alone, on the usual path, unless it may be stored.
        return await self.path.aretry_alone(stream, items, dedup, sent=req.sent, cause=req.error, started=started)

    def _arm(self) -> None:
        self._watch = self.loop.call_later(self.path.settings.enqueue_timeout, self._expire)

    def _expire(self) -> None:
        """The turn under way did not end within ``enqueue_timeout``: everyone waiting gives up,
        those queued for the next turn (never sent, so not stored) and those in it (maybe
        stored), its leader too."""
        self._watch = None
        for _, turn in (*self._queue, *self._flight):
            if turn is not None and not turn.done():
                turn.set_result(_EXPIRED)
        if self._leading is not None and not self._leading.done():
            self._leading.set_result(_EXPIRED)

    def _leave(self, req: Request) -> bool:
        """Its caller left while waiting; returns whether its request had not been sent (it
        then never is). A turn handed to it goes on to the next caller."""
        if req.abandoned:
            return True
        for i, (queued, _) in enumerate(self._queue):
            if queued is req:
                del self._queue[i]
                req.abandoned = True
                if req.lead:
                    self._hand_on()
                return True
        return False

    async def _lead(self, req: Request) -> None:
        batch, self._queue = self._queue, []
        self._flight = batch
        if len(batch) == 1:
            # Alone: only its own outcome is at stake, so it sends itself, with no task.
            try:
                await self._send(batch)
            finally:
                self._finish(batch, None)
            return
        # Shared: sent and read by a task of its own, which a cancelled leader does not stop.
        done: Turn = self.loop.create_future()
        self._leading = done
        if self._watch is None:
            self._arm()
        task = asyncio.ensure_future(self._shared(batch, done))
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
        if await done is _EXPIRED:
            raise self.path.timed_out(req.stream, req.items, sent=True)

    async def _shared(self, batch: list[tuple[Request, Turn | None]], done: Turn) -> None:
        try:
            await self._send(batch)
        finally:
            self._finish(batch, done)

    async def _send(self, batch: list[tuple[Request, Turn | None]]) -> None:
        requests = [req for req, _ in batch]
        attempt = Attempt()
        try:
            if len(requests) == 1:
                req = requests[0]
                try:
                    req.result = await self.path.atry_once(req.stream, req.items, req.dedup, attempt)
                except Exception as exc:
                    req.error, req.sent = exc, attempt.sent
            else:
                calls = merged(self.path.ops, requests)
                try:
                    replies = await self.path.ashared_round_trip([call for call, _ in calls], attempt)
                except Exception as exc:
                    deliver(calls, [], exc, attempt.sent)
                else:
                    deliver(calls, replies)
        except BaseException as exc:  # cancelled all the same (the loop is closing)
            for req in requests:
                _fail(req, exc, attempt.sent)
            raise

    def _finish(self, batch: list[tuple[Request, Turn | None]], done: Turn | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._flight, self._leading = [], None
        self._hand_on()
        for _, turn in batch:
            if turn is not None and not turn.done():
                turn.set_result(None)
        if done is not None and not done.done():
            done.set_result(None)

    def _hand_on(self) -> None:
        """The turn to the oldest caller still waiting, or the end of the turns. A caller whose
        wait already ran out leaves the queue here, unsent."""
        while self._queue:
            nxt, turn = self._queue[0]
            if turn is not None and turn.done():
                del self._queue[0]
                nxt.abandoned = True
                continue
            nxt.lead = True
            if turn is not None:
                turn.set_result(None)
            return
        self._busy = False
