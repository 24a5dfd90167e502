"""A lease on one stream as its holder sees it: the fencing token, and how long it is surely
held, counted from the moment the acquiring or renewing request was sent.

Pure bookkeeping; must not import redis or do any I/O. It reads no clock: what depends on the
time takes ``now`` (monotonic seconds) from its caller, which has the driver's clock.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .keys import StreamKeys

if TYPE_CHECKING:
    from ..task import Entry


class Flag(Protocol):
    """``threading.Event`` or ``asyncio.Event``: the core only sets and reads it."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...


#: Why a lease lets nothing more start: not halted, an operator's pause, an operator's skip.
Halt = Literal["", "paused", "skipped"]


def lease_margin(ttl: float) -> float:
    """How much earlier than Redis a holder counts its lease as gone: room for the time a
    request spends before Redis runs it and for clock-rate differences."""
    return min(0.1 * ttl, 1.0)


@dataclass
class Lease:
    stream: str
    keys: StreamKeys
    token: str
    fence: int
    #: Set when the lease is lost (refused renewal) or the worker stops: ends retry back-offs.
    abort: Flag
    ttl: float = 0.0
    #: Monotonic time until which the lease is surely held. Every deadline counts from the
    #: moment the acquiring or renewing request was *sent*: Redis may have run it at any
    #: point after that, so a slow reply must never extend the lease in the holder's eyes.
    valid_until: float = 0.0
    lost: bool = False
    lost_reason: str = ""
    #: A call that may end the lease is in flight: a refused renewal then means "released".
    ending: bool = False
    #: Tasks taken together with the lease, for the holder's first batch.
    initial: list[tuple[Entry, int]] = field(default_factory=list)
    #: Redis's clock (ms) when it ran the last take or acquire, and when that request was sent.
    redis_ms: int = 0
    redis_at: float = 0.0
    #: The task running now and when it started (Redis's clock, estimated), and how many tasks
    #: ended under this lease: what the heartbeat tells operators.
    running: tuple[str, int] | None = None
    done: int = 0
    #: The attempt of the running task, and when (Redis ms, estimated) its next attempt starts
    #: while it waits to retry (0: an attempt runs): what the heartbeat tells a status read.
    attempt: int = 0
    retry_at_ms: int = 0
    #: Why nothing more may start under this lease ('paused', 'skipped'): an operator acted on
    #: the stream. Set under ``gate``, which a task's first attempt also takes to check it, so
    #: once ``halt`` has returned no task starts here (what a pause's confirmation promises).
    halted: Halt = ""
    #: An operator's skip revoked the lease: the holder lets go under the revoked value.
    revoked: bool = False
    #: The tasks skips dead-lettered under this lease, space-separated (one may still run here).
    skipped: str = ""
    #: The acknowledgements the holder has not had confirmed yet (set by its run), for a let-go
    #: sent on the run's behalf while it is stuck in the skipped task.
    unconfirmed_acks: Callable[[], list[str]] | None = None
    #: Results to store with the acknowledgement of their task (id -> TTL ms, encoded value),
    #: kept until Redis confirms that acknowledgement: every call that carries the ack, a resend
    #: or a let-go on the run's behalf included, carries the result too.
    results: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    #: The holder told Redis it starts nothing more (a pause waits for it).
    halt_confirmed: bool = False
    #: A let-go on the stuck run's behalf is under way.
    letting_go: bool = False
    #: Given by the driver: a lock where halts and first attempts run in different threads
    #: (the threaded worker), no lock where one event loop runs both.
    gate: AbstractContextManager[Any] = field(default_factory=nullcontext, repr=False, compare=False)

    def halt(self, why: Halt) -> bool:
        """Start nothing more under this lease; True the first time it is said."""
        with self.gate:
            first = not self.halted
            if first:
                self.halted = why
        return first

    def revoke(self, skipped: str = "") -> bool:
        """An operator's skip revoked the lease; True the first time it is learnt."""
        first = not self.revoked
        self.revoked = True
        if skipped:
            self.skipped = skipped
        self.halt("skipped")
        return first

    def confirm(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` succeeded."""
        self.valid_until = max(self.valid_until, sent_at + self.ttl - lease_margin(self.ttl))

    def lapsed(self, now: float) -> bool:
        """True once the lease may be gone at ``now`` even if no heartbeat said so yet (this
        process was paused, or replies are slow): start nothing new."""
        if not self.lost and now >= self.valid_until:
            self.mark_lost("no renewal confirmed within the lease TTL (counted from when it was sent)")
        return self.lost

    def mark_lost(self, reason: str) -> None:
        if not self.lost:
            self.lost, self.lost_reason = True, reason
        self.abort.set()

    def clock(self, redis_ms: int, sent_at: float) -> None:
        self.redis_ms, self.redis_at = redis_ms, sent_at

    def redis_now_ms(self, now: float) -> float:
        """Redis's clock at ``now``, estimated from the last reply: counted from the request's
        send time, so it errs late by at most a round trip (a deadline is never passed unseen)."""
        return self.redis_ms + (now - self.redis_at) * 1000


def release_retry_delays(lease_ttl: float) -> list[float]:
    """Pauses before each attempt to release a lease after an I/O error: quick at first, and
    all within half the TTL, after which letting the lease lapse is as fast."""
    delays, total, step = [0.0], 0.0, 0.05
    while total + step <= lease_ttl / 2:
        delays.append(step)
        total += step
        step *= 2
    return delays


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
