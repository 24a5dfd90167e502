"""The table of Lua scripts: the one place that states, for each atomic step, its name, the keys
it takes in order, whether durable mode waits for its replication, whether its caller hears of a
shortfall, what its reply codes mean and what it is for.

Everything else is derived from ``SCRIPTS``: the calls ``protocol.ScriptCalls`` builds (keys read
off the table by name), the scripts the backend registers, and durable mode's lists. A script's
name is the ``ScriptName`` literal, so mypy refuses a misspelt one wherever a call names it.

The ``local pending = KEYS[2]`` preludes stay written in the ``.lua`` files, and a test
(``tests/test_layout.py``) checks them against the table, rather than the loader generating
them: a script file then reads on its own, its header documenting each ``KEYS[n]`` right above
the name its code uses, and one that drifts from the table fails a test instead of silently
binding another key. Must not import redis or do any I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from operator import attrgetter
from typing import Any, Literal

ScriptName = Literal[
    "enqueue",
    "due",
    "acquire",
    "renew",
    "halted",
    "take",
    "skip",
    "dead_letter",
    "release",
    "requeue",
    "rate",
    "beat",
    "lost",
    "status",
    "tick",
    "delete_pending",
    "dead_letter_pending",
    "settle",
]

#: What a script's key names are looked up on (``keys.py``): a stream's ``StreamKeys``
#: attributes (a schedule's ``ScheduleKeys``), or ``KeySchema`` methods of a shard or of a
#: queue, or ``KeySchema`` properties of the whole fleet.
KeyScope = Literal["stream", "schedule", "shard", "queue", "fleet"]


class TakeReply(IntEnum):
    """First element of a ``take`` reply."""

    REVOKED = -2  # an operator's skip revoked the lease: nothing changed; let go
    FENCED = -1  # the caller's lease is gone: nothing changed
    EMPTY = 0  # nothing left: the lease was released and the stream forgotten
    TASKS = 1  # acknowledged; the tasks handed over follow (possibly none)
    ACKED = 2  # acknowledged only (nothing was asked for)
    PAUSED = 3  # acknowledged; the queue or stream is paused, so nothing was handed over


class AcquireReply(IntEnum):
    """First element of an ``acquire`` reply."""

    NOT_CLAIMABLE = 0
    GRANTED = 1


class FencedReply(IntEnum):
    """Reply of ``dead_letter`` and ``release``."""

    FENCED = -1
    DONE = 1


class RenewReply(IntEnum):
    """First element of a ``renew`` reply."""

    REFUSED = 0
    RENEWED = 1
    PAUSED = 2  # renewed; the stream or its queue is paused: start nothing more, confirm
    REVOKED = 3  # an operator's skip revoked the lease (the skipped task id follows): let go


@dataclass(frozen=True)
class ScriptSpec:
    """One Lua script (``lua/<name>.lua``). ``keys``: its KEYS in order, by name in ``scope``.
    ``changes_stream``: it changes what a stream holds, so durable mode follows it with WAIT.
    ``raises_shortfall``: of those, its caller (a producer, an operator) is told by
    ``NotReplicatedError`` when too few replicas confirm; a worker's step only logs it."""

    name: ScriptName
    keys: tuple[str, ...]
    purpose: str
    scope: KeyScope = "stream"
    changes_stream: bool = False
    raises_shortfall: bool = False
    reply: type[IntEnum] | None = None
    #: A stream-scoped script's keys read off a ``StreamKeys`` in one C call (a hot path: every
    #: take builds 11); a tuple, or the key itself for a script of one key.
    read_keys: Callable[[Any], Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.raises_shortfall and not self.changes_stream:
            raise ValueError(f"{self.name}: only a script durable mode waits for can report a shortfall")
        object.__setattr__(self, "read_keys", attrgetter(*self.keys))


# A failover that loses a poll (due), a heartbeat (renew, beat: redone within a second), a halt
# confirmation or a rate window loses no task and no acknowledgement: durable mode does not wait
# for them. A worker's change that a failover loses can only make tasks run again (in every
# earlier state each task is still pending or in flight), so only a producer's and an
# operator's calls raise.
ENQUEUE = ScriptSpec(
    "enqueue",
    ("pending", "ready", "queues", "layout", "later", "later_seq", "lease"),  # then a dedup key per task
    "append tasks to a stream, or delay them, (optionally deduplicated) and make it claimable",
    changes_stream=True,
    raises_shortfall=True,
)
DUE = ScriptSpec(
    "due",
    ("queues", "layout", "paused"),
    "list a shard's streams claimable now, among the queues the caller consumes",
    scope="shard",
)
ACQUIRE = ScriptSpec(
    "acquire",
    (
        "queues",
        "ready",
        "epoch",
        "lease",
        "meta",
        "pending",
        "inflight",
        "dead",
        "dead_ids",
        "dlq_index",
        "paused",
        "counts",
        "results",
        "later",
        "later_seq",
    ),
    "claim a stream's lease under a new fencing token and take its first tasks",
    changes_stream=True,
    reply=AcquireReply,
)
RENEW = ScriptSpec(
    "renew",
    ("lease", "ready", "queues", "paused", "meta"),
    "extend a held lease and tell its holder of a pause or a skip since",
    reply=RenewReply,
)
HALTED = ScriptSpec("halted", ("lease", "meta"), "confirm that a paused stream's holder starts nothing more")
TAKE = ScriptSpec(
    "take",
    (
        "lease",
        "pending",
        "inflight",
        "meta",
        "ready",
        "queues",
        "dead",
        "dead_ids",
        "dlq_index",
        "paused",
        "counts",
        "results",
        "later",
        "later_seq",
    ),
    "acknowledge finished tasks and hand the next ones over (the hot path)",
    changes_stream=True,
    reply=TakeReply,
)
#: The keys of an operator's dead-lettering of one task of a stream (skip.lua and
#: dead_letter_pending.lua): the stream's, its shard's dead-letter index and its queue's counts.
OPERATOR_DEAD_LETTER_KEYS = (
    "lease",
    "pending",
    "inflight",
    "meta",
    "ready",
    "queues",
    "dead",
    "dead_ids",
    "dlq_index",
    "counts",
    "results",
    "later",
    "later_seq",
)
SKIP = ScriptSpec(
    "skip",
    OPERATOR_DEAD_LETTER_KEYS,
    "dead-letter a stream's head task as an operator, revoking its lease",
    changes_stream=True,
    raises_shortfall=True,
)
DEAD_LETTER = ScriptSpec(
    "dead_letter",
    ("lease", "inflight", "meta", "dead", "dead_ids", "dlq_index", "counts", "results"),
    "acknowledge finished tasks, then dead-letter the next one in flight",
    changes_stream=True,
    reply=FencedReply,
)
RELEASE = ScriptSpec(
    "release",
    ("lease", "pending", "inflight", "meta", "ready", "queues", "counts", "results", "later"),
    "acknowledge finished tasks and give the lease up, handing back what did not run",
    changes_stream=True,
    reply=FencedReply,
)
REQUEUE = ScriptSpec(
    "requeue",
    ("dead", "dead_ids", "pending", "ready", "queues", "dlq_index", "later", "later_seq", "lease"),
    "move dead letters back to their stream's pending list, in bounded steps",
    changes_stream=True,
    raises_shortfall=True,
)
RATE = ScriptSpec("rate", ("rate",), "ask a queue's fleet-wide rate limit for a start permit", scope="queue")
BEAT = ScriptSpec(
    "beat",
    ("replicas", "pollers"),
    "record a worker's heartbeat and tell it who shares the safety poll",
    scope="fleet",
)
LOST = ScriptSpec(
    "lost",
    ("inflight", "meta"),
    "note that a task ran past its live holder's lease",
    changes_stream=True,
)
STATUS = ScriptSpec(
    "status",
    ("lease", "pending", "inflight", "meta", "dead", "dead_ids", "results", "later"),
    "tell where one task of a stream is now (read only)",
)

DELETE_PENDING = ScriptSpec(
    "delete_pending",
    ("lease", "pending", "inflight", "meta", "ready", "queues", "results", "later", "later_seq"),
    "delete one pending task as an operator, refusing one a holder was handed",
    changes_stream=True,
    raises_shortfall=True,
)
DEAD_LETTER_PENDING = ScriptSpec(
    "dead_letter_pending",
    OPERATOR_DEAD_LETTER_KEYS,
    "dead-letter one pending task as an operator, refusing one a holder was handed",
    changes_stream=True,
    raises_shortfall=True,
)

TICK = ScriptSpec(
    "tick",
    (
        "record",
        "forgotten",
        "schedules",
        "pending",
        "ready",
        "queues",
        "layout",
        "later",
        "later_seq",
        "lease",
        "paused",
    ),
    "fire a periodic schedule's tick: move its last tick and enqueue the tick's task, once fleet-wide",
    scope="schedule",
    changes_stream=True,
)

SETTLE = ScriptSpec(
    "settle",
    ("layout",),
    "make a producer's tentative shard layout final, or take it back",
    scope="shard",
)

#: Every script, each once.
SCRIPTS: tuple[ScriptSpec, ...] = (
    ENQUEUE,
    DUE,
    ACQUIRE,
    RENEW,
    HALTED,
    TAKE,
    SKIP,
    DEAD_LETTER,
    RELEASE,
    REQUEUE,
    RATE,
    BEAT,
    LOST,
    STATUS,
    TICK,
    DELETE_PENDING,
    DEAD_LETTER_PENDING,
    SETTLE,
)
SPECS: dict[ScriptName, ScriptSpec] = {spec.name: spec for spec in SCRIPTS}
