"""What an operator's pause owes work a holder has already taken ahead: the pause returns once
every holder of an affected stream has said that it starts nothing more, has let its lease go,
or has lost it. A holder hears of the pause at its next renewal (at once when the wake-up
message asking it to renew arrives), stops starting tasks under its lease, and confirms with
the ``halted`` script; its buffered tasks go back to the stream, in order, when its running
task has finished.

A holder that cannot answer (its process is paused, Redis is cut off from it) loses its lease
within ``lease_ttl``, and a holder starts no task once its lease may have lapsed, so waiting
``lease_ttl`` (plus a margin) bounds the wait whatever the holders do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import Settings
from ..engine.keys import STREAM_SEPARATOR, KeySchema

#: How often the holders' answers are read while a pause waits for them.
POLL_SECONDS = 0.02
#: Waited beyond the longest lease TTL found, for a renewal on its way.
MARGIN_SECONDS = 1.0
#: Streams per queue and shard looked at for leases (leases are bounded by the fleet's
#: concurrency; parked streams, also scored in the future, are the rest).
SCAN_LIMIT = 10_000
CLOCK_SLACK_MS = 60_000


class Halting(Protocol):
    """What waiting for the holders needs of the backend."""

    @property
    def keys(self) -> KeySchema: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def client(self) -> Any: ...

    def translated(self) -> contextlib.AbstractContextManager[None]: ...


@dataclass(frozen=True)
class HaltReport:
    """Which holders of the paused streams answered: ``confirmed`` (replica ids that start
    nothing more), ``ended`` (leases released or lapsed meanwhile) and ``unconfirmed`` (no
    answer within the wait; their leases lapse unless renewed, and a holder starts nothing
    once its lease may have lapsed)."""

    target: str
    confirmed: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    unconfirmed: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unconfirmed

    def describe(self) -> str:
        parts = [f"paused {self.target}"]
        if self.confirmed:
            parts.append(f"{len(self.confirmed)} holder(s) confirmed: {', '.join(self.confirmed)}")
        if self.ended:
            parts.append(f"{len(self.ended)} lease(s) ended meanwhile")
        if self.unconfirmed:
            parts.append(f"no answer from {', '.join(self.unconfirmed)} (their leases lapse within lease_ttl)")
        return "; ".join(parts)


def holder_of(token: str) -> str:
    """The replica id inside a lease token "[!]<fence>:<replica>/<nonce>"."""
    return token.lstrip("!").partition(":")[2].rpartition("/")[0] or token


def leased_streams(backend: Halting, queue: str, key: str | None) -> list[str]:
    """Streams of ``queue`` (or its one stream ``key``) that may be leased now: a leased
    stream's ready score is its lease's expiry, so only streams scored in the future."""
    if key is not None:
        return [f"{queue}{STREAM_SEPARATOR}{key}"]
    keys = backend.keys
    # This host's clock, a minute early: a bounded superset of Redis's "now" (clocks of one
    # deployment differ by far less), without a TIME call, which a cluster client cannot route.
    since_ms = int(time.time() * 1000) - CLOCK_SLACK_MS
    pipe = backend.client.pipeline(transaction=False)
    for shard in range(keys.shards):
        pipe.zrangebyscore(keys.ready(shard, queue), since_ms, "+inf", start=0, num=SCAN_LIMIT)
    with backend.translated():
        return sorted({m.decode() for members in pipe.execute() for m in members})


def wait_for_holders(backend: Halting, target: str, streams: Sequence[str], wait: float | None) -> HaltReport:
    """Ask the holders of ``streams`` to hear of a pause now, then wait (at most ``wait``
    seconds, by default the longest lease's TTL and a margin) until each has confirmed that it
    starts nothing more, or its lease has ended."""
    keys = [backend.keys.stream(s) for s in streams]
    pipe = backend.client.pipeline(transaction=False)
    for k in keys:
        pipe.get(k.lease).pttl(k.lease)
    with backend.translated():
        found = pipe.execute()
    waiting: dict[int, str] = {}
    longest = 0
    for i in range(len(keys)):
        token, ttl = found[2 * i], found[2 * i + 1]
        if token is not None:
            waiting[i] = token.decode()
            longest = max(longest, int(ttl))
    report = HaltReport(target)
    if not waiting:
        return report
    pipe = backend.client.pipeline(transaction=False)
    for shard in sorted({keys[i].shard for i in waiting}):
        channel = backend.keys.wake(shard)
        (pipe.spublish if backend.keys.sharded_wake else pipe.publish)(channel, f"h{shard}")
    with backend.translated():
        pipe.execute()
    budget = wait if wait is not None else max(backend.settings.lease_ttl, longest / 1000) + MARGIN_SECONDS
    deadline = time.monotonic() + budget
    while waiting:
        pipe = backend.client.pipeline(transaction=False)
        order = list(waiting)
        for i in order:
            pipe.get(keys[i].lease).hget(keys[i].meta, "halted")
        with backend.translated():
            answers: list[Any] = pipe.execute()
        for n, i in enumerate(order):
            token = waiting[i]
            now, halted = answers[2 * n], answers[2 * n + 1]
            now_token = now.decode() if now is not None else None
            if now_token != token and now_token != "!" + token:
                report.ended.append(holder_of(token))
                del waiting[i]
            elif halted is not None and halted.decode() == now_token:
                report.confirmed.append(holder_of(token))
                del waiting[i]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    report.unconfirmed.extend(holder_of(waiting[i]) for i in waiting)
    return report


def wait_for_release(backend: Halting, stream: str, wait: float) -> bool:
    """Wait (at most ``wait`` seconds) until nobody holds ``stream``; True if nobody does."""
    lease = backend.keys.stream(stream).lease
    deadline = time.monotonic() + wait
    while True:
        with backend.translated():
            if not backend.client.exists(lease):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)
