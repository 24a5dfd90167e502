"""The wire protocol between pyfiq and Redis, without I/O: each atomic step as a script call
(name, keys in the order the script table in ``scripts`` states, args), and what each reply means.

Owns the arguments of every call and the parsing of replies; what a script is (its keys, its
reply codes) is the table's. Must not import redis or do any I/O.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import chain
from typing import Any

from ..config import MAX_PREFETCH, Settings
from ..task import Entry
from .keys import KeySchema, ScheduleKeys, StreamKeys
from .lease import Flag, Lease
from .scripts import (
    ACQUIRE,
    BEAT,
    DEAD_LETTER,
    DEAD_LETTER_PENDING,
    DELETE_PENDING,
    DUE,
    ENQUEUE,
    HALTED,
    LOST,
    RATE,
    RELEASE,
    RENEW,
    REQUEUE,
    SKIP,
    STATUS,
    TAKE,
    TICK,
    ScriptName,
    ScriptSpec,
)
from .scripts import AcquireReply as AcquireReply
from .scripts import FencedReply as FencedReply
from .scripts import RenewReply as RenewReply
from .scripts import TakeReply as TakeReply
from .status import STATUS_SCAN
from .ticks import Advance


@dataclass(frozen=True)
class Call:
    """One script call: its keys in the order the script's ``ScriptSpec`` states, then its args."""

    script: ScriptName
    keys: list[str]
    args: list[Any]


#: Where an ``enqueue`` call's arguments start listing its tasks, and how many each takes (id,
#: expires-in ms, when, payload: ``EncodedTask``).
ENQUEUE_ITEMS = 6
ENQUEUE_STRIDE = 4

#: Due queues of a shard's index one ``due`` call scans at most (it pages on in later calls).
DUE_SCAN = 200

#: A rate-limited stream whose permit is further away than this hands its lease back (parked
#: until then) instead of holding a worker slot while it waits.
PARK_AFTER_MS = 50


def stream_call(
    spec: ScriptSpec, k: StreamKeys | ScheduleKeys, args: list[Any], extra_keys: Sequence[str] = ()
) -> Call:
    """A call of a script whose keys are one stream's (``spec.scope == "stream"``)."""
    keys = spec.read_keys(k)
    if isinstance(keys, str):  # one name: attrgetter gives the value itself
        keys = (keys,)
    return Call(spec.name, [*keys, *extra_keys], args)


def results_argv(lease: Lease, acks: Sequence[str]) -> list[Any]:
    """The results that go with ``acks``: a count, then (task id, TTL ms, value) each."""
    out: list[Any] = [0]
    for task_id in acks:
        stored = lease.results.get(task_id)
        if stored is not None:
            out += (task_id, *stored)
    out[0] = (len(out) - 1) // 3
    return out


class ScriptCalls:
    def __init__(self, keys: KeySchema, settings: Settings) -> None:
        self.keys = keys
        self.settings = settings
        self._schema_keys: dict[tuple[ScriptName, int | str | None], tuple[str, ...]] = {}

    def _schema_call(self, spec: ScriptSpec, args: list[Any], of: int | str | None = None) -> Call:
        """A call of a script whose keys are the schema's own: ``KeySchema`` methods of a shard
        or a queue (``of``), or its properties (the fleet's keys), as ``spec.scope`` says."""
        keys = self._schema_keys.get((spec.name, of))
        if keys is None:
            keys = self._schema_keys_of(spec, of)
        return Call(spec.name, list(keys), args)

    def _schema_keys_of(self, spec: ScriptSpec, of: int | str | None) -> tuple[str, ...]:
        schema = self.keys
        if of is None:
            keys = tuple(getattr(schema, name) for name in spec.keys)
        else:
            keys = tuple(getattr(schema, name)(of) for name in spec.keys)
        # A poll builds one call per shard: a shard's keys (and the fleet's) are kept, a set
        # bounded by the shard count. A queue's are not: queue names come from callers.
        if spec.scope != "queue":
            self._schema_keys[(spec.name, of)] = keys
        return keys

    def enqueue(
        self,
        stream: str,
        items: Sequence[tuple[str, int, str, bytes]],
        dedup_keys: Sequence[str] | None = None,
    ) -> Call:
        k = self.keys.stream(stream)
        args: list[Any] = [
            stream,
            self.keys.wake(k.shard),
            k.shard,
            int(self.settings.dedup_window * 1000),
            self.keys.shards,
            len(items),
        ]
        args.extend(chain.from_iterable(items))  # (task id, expires-in ms, when, payload) per task
        return stream_call(ENQUEUE, k, args, [k.dedup(d) for d in dedup_keys or ()])

    @staticmethod
    def parse_enqueue(call: Call, reply: Any) -> list[tuple[str, bool]]:
        """(task id, appended) per task of an ``enqueue`` call. Without dedup keys Redis answers
        with the number appended, which is every task of the call."""
        if isinstance(reply, int):
            ids = call.args[ENQUEUE_ITEMS::ENQUEUE_STRIDE]
            if reply != len(ids):
                raise RuntimeError(f"enqueue stored {reply} of {len(ids)} tasks")  # a script/caller mismatch
            return [(task_id, True) for task_id in ids]
        return [(_text(reply[i]), bool(int(reply[i + 1]))) for i in range(0, len(reply), 2)]

    def due(self, shard: int, want: int, queues: Sequence[str] | None, offset: int = 0) -> Call:
        return self._schema_call(DUE, [want, self.keys.shards, DUE_SCAN, offset, *(queues or ())], shard)

    @staticmethod
    def parse_due(reply: list[Any]) -> tuple[float | None, int, list[tuple[str, float]]]:
        """(seconds until the shard's next stream falls due or None, offset to continue the
        scan from or 0, [(due stream, due since in ms)] oldest first)."""
        nxt = int(reply[0])
        due = [(_text(reply[i]), float(reply[i + 1])) for i in range(2, len(reply), 2)]
        return (nxt / 1000 if nxt >= 0 else None), int(reply[1]), due

    def acquire(self, stream: str, want: int = 0, holder: str = "") -> Call:
        """Claim a stream and, with ``want``, take its first tasks in the same round trip.
        ``holder`` (the replica id) goes into the lease token, so operators see who holds it."""
        k = self.keys.stream(stream)
        nonce = f"{holder}/{secrets.token_hex(6)}"
        return stream_call(ACQUIRE, k, [stream, self.settings.lease_ttl_ms, nonce, want, self.settings.max_deliveries])

    def parse_acquire(
        self,
        stream: str,
        reply: list[Any],
        abort: Flag,
        sent_at: float,
        gate: AbstractContextManager[Any] | None = None,
    ) -> Lease | None:
        """The lease a successful ``acquire`` reply grants; ``sent_at`` is the monotonic time the
        request was sent, from which the lease's validity is counted. ``gate``: the driver's
        lock for the lease's halts (see ``Lease.gate``); None where one thread does it all."""
        if AcquireReply(int(reply[0])) is not AcquireReply.GRANTED:
            return None
        ttl = self.settings.lease_ttl
        lease = Lease(stream, self.keys.stream(stream), _text(reply[1]), int(reply[2]), abort, ttl=ttl)
        if gate is not None:
            lease.gate = gate
        lease.confirm(sent_at)
        lease.clock(int(reply[3]), sent_at)
        lease.initial = [(Entry.load(reply[i]), int(reply[i + 1])) for i in range(4, len(reply), 2)]
        return lease

    def renew(self, lease: Lease) -> Call:
        k = lease.keys
        running = lease.running
        argv = [lease.token, self.settings.lease_ttl_ms, k.stream, running[0] if running else ""]
        if running and (lease.attempt > 1 or lease.retry_at_ms):
            argv.append(f"{lease.attempt}:{lease.retry_at_ms}")  # a retry: say which, and when
        return stream_call(RENEW, k, argv)

    def halted(self, lease: Lease) -> Call:
        """Confirm that this holder starts nothing more under ``lease`` (its stream was paused)."""
        return stream_call(HALTED, lease.keys, ["!" + lease.token if lease.revoked else lease.token])

    def take(self, lease: Lease, acks: Sequence[str], want: int, *, ahead: bool = False) -> Call:
        """Acknowledge ``acks`` and take up to ``want`` tasks. ``ahead``: the holder still runs
        earlier tasks, so none of these starts at once (see ``hand_out`` in lib.lua)."""
        k = lease.keys
        argv = [lease.token, k.stream, len(acks), want, self.settings.max_deliveries, 1 if ahead else 0, *acks]
        if lease.results:
            argv += results_argv(lease, acks)
        return stream_call(TAKE, k, argv)

    def dead_letter(self, lease: Lease, acks: Sequence[str], task_id: str | bytes, header: str) -> Call:
        k = lease.keys
        argv = [lease.token, k.stream, len(acks), task_id, header, *acks]
        if lease.results:
            argv += results_argv(lease, acks)
        return stream_call(DEAD_LETTER, k, argv)

    def release(self, lease: Lease, acks: Sequence[str], started: Sequence[str] = (), delay_ms: int = 0) -> Call:
        """Give the lease up. ``started``: tasks this holder started and did not finish (they
        may have run); every other task it was handed goes back as never delivered here.
        ``delay_ms``: the stream may not be claimed again before then (a parked stream). A
        lease an operator's skip revoked is let go under its revoked value."""
        k = lease.keys
        return stream_call(
            RELEASE,
            k,
            [
                "!" + lease.token if lease.revoked else lease.token,
                k.stream,
                len(acks),
                len(started),
                self.keys.wake(k.shard),
                k.shard,
                max(0, int(delay_ms)),
                *acks,
                *started,
                *(results_argv(lease, acks) if lease.results else ()),
            ],
        )

    def lost(self, lease: Lease, entry: Entry) -> Call:
        """Note that ``entry`` ran past this holder's lease while the holder was alive."""
        k = lease.keys
        return stream_call(LOST, k, [entry.raw, MAX_PREFETCH + 1])

    def skip(self, stream: str, header: str) -> Call:
        """Dead-letter the head task of a stream (an operator's action), revoking its lease."""
        k = self.keys.stream(stream)
        return stream_call(SKIP, k, [stream, header, self.keys.wake(k.shard), k.shard])

    def delete_pending(self, stream: str, task_id: str, place: int = -1) -> Call:
        """Delete one pending task of ``stream`` found by its id, looking first around ``place``
        (where the operator saw it in the pending list; -1: unknown), refusing a task a holder
        was handed (see ``delete_pending.lua``)."""
        return stream_call(DELETE_PENDING, self.keys.stream(stream), [stream, task_id, place, STATUS_SCAN])

    def dead_letter_pending(self, stream: str, task_id: str, header: str, place: int = -1) -> Call:
        """Move one pending task of ``stream`` to its dead letters under ``header``, as
        ``delete_pending`` finds and refuses (see ``dead_letter_pending.lua``)."""
        k = self.keys.stream(stream)
        return stream_call(DEAD_LETTER_PENDING, k, [stream, task_id, place, STATUS_SCAN, header])

    def status(self, stream: str, task_id: str, scan: int = STATUS_SCAN) -> Call:
        """Where one task of ``stream`` is now (read only; see ``parse_status``), looking through
        at most ``scan`` pending and delayed tasks."""
        return stream_call(STATUS, self.keys.stream(stream), [task_id, scan])

    def tick(self, advance: Advance, replica: str) -> Call:
        """One ``tick`` call of a periodic schedule (see ``ticks.plan``)."""
        sched = advance.ticker.schedule
        shard = self.keys.shard_of(sched.stream)
        args: list[Any] = [
            sched.name,
            sched.stream,
            self.keys.wake(shard),
            shard,
            self.keys.shards,
            sched.version,
            sched.rule.text,
            advance.expected,
            advance.new_last,
            sched.rule.after(advance.new_last) if advance.expected != "?" else 0,
            replica,
            len(advance.items),
        ]
        for item in advance.items:
            args += (item.id, item.expires_in_ms, item.payload)
        return stream_call(TICK, self.keys.schedule(sched.name, sched.stream), args)

    def beat(self, replica: str, info: dict[str, Any], poll: PollBeat) -> Call:
        """A worker's heartbeat in the replica registry (what operators list as live), which
        also tells it who shares the safety poll (see ``beat.lua``). ``info`` ends with its
        "poll" field: the group when the replica polls, else empty."""
        forget_ms = max(3_600_000, int(self.settings.lease_ttl_ms * 10))
        report = json.dumps({**info, "poll": poll.group if poll.polls else ""}, separators=(",", ":"))
        return self._schema_call(
            BEAT,
            [
                replica,
                report,
                forget_ms,
                f"{poll.group}|{replica}",
                1 if poll.polls else 0,
                poll.live_ms,
                self.keys.shards,
                1 if poll.refresh else 0,
                1 if poll.sweep else 0,
                *([] if poll.refresh else poll.view),
            ],
        )

    @staticmethod
    def parse_beat(reply: Any) -> list[tuple[str, bool]]:
        """The view a ``beat`` reply gives: (poller name, polls now) in name order."""
        return [(_text(reply[i]), bool(int(reply[i + 1]))) for i in range(1, len(reply) - 1, 2)]

    def rate(self, queue: str, limit: RateLimit) -> Call:
        return self._schema_call(RATE, [1000.0 / limit.per_second, limit.burst], queue)

    def requeue(
        self, stream: str, *, front: bool, limit: int, low: str = "-inf", high: str = "+inf", task_id: str | None = None
    ) -> Call:
        """One bounded step of moving dead letters back to pending; see ``requeue.lua``."""
        k = self.keys.stream(stream)
        return stream_call(
            REQUEUE,
            k,
            [stream, self.keys.wake(k.shard), k.shard, "front" if front else "back", limit, low, high, task_id or ""],
        )


def is_halt_notice(message: Any) -> bool:
    """A wake-up message that asks holders to renew at once ('h' .. shard: an operator paused
    or skipped a stream of the shard), rather than naming a shard with new work."""
    return isinstance(message, (bytes, str)) and message[:1] in (b"h", "h")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: Queue names one heartbeat lists at most, and their characters in all: a worker that
#: consumes more lists the first and says its list was cut, so nobody reads the record as
#: "consumes only these" (the registry record is rewritten every heartbeat).
BEAT_QUEUES = 256
BEAT_QUEUE_CHARS = 4096


def consumed_fields(queues: Sequence[str], *, registered: bool) -> dict[str, Any]:
    """What a heartbeat says of the queues its worker consumes: ``queues`` (the first that fit
    the bounds), ``queues_cut`` when some did not, and ``queues_registered`` when the worker
    has no filter and so consumes every queue it has a function for (its list grows with them).
    A record without ``queues`` (a replica older than this field) says nothing either way."""
    listed: list[str] = []
    chars = 0
    for queue in queues[:BEAT_QUEUES]:
        chars += len(queue)
        if chars > BEAT_QUEUE_CHARS:
            break
        listed.append(queue)
    fields: dict[str, Any] = {"queues": listed}
    if len(listed) < len(queues):
        fields["queues_cut"] = True
    if registered:
        fields["queues_registered"] = True
    return fields


@dataclass(frozen=True)
class PollBeat:
    """What a heartbeat says about the safety poll: the replica's ``group`` (replicas consuming
    the same queues), whether it ``polls`` (has a free slot), after what silence a poller counts
    as gone, whether to read the pollers afresh (``refresh``, else ``view`` is checked) and
    whether to sweep the registry for long-silent replicas."""

    group: str
    polls: bool
    live_ms: int
    refresh: bool
    sweep: bool
    view: Sequence[str] = ()


@dataclass(frozen=True)
class RateLimit:
    """At most ``per_second`` task starts per second on a queue, across the fleet; ``burst``
    starts may follow each other without spacing."""

    per_second: float
    burst: int = 1
