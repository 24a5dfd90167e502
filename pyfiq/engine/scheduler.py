"""What a worker claims and when, and what its heartbeats mean, without I/O.

Both drivers (threads and asyncio) own one ``Scheduler``: they ask it which script calls to
make, hand it the replies, and wait as long as it says. The driver gives it its clock and its
locks: the threaded driver touches it from several threads and gives real ones, the asyncio
driver runs it on one loop and gives none. What it has to say (a lease lost, a late
heartbeat, a failed claim) is kept in ``events`` for the driver to log.
It learns about the application's tasks only through the ``TaskDirectory`` it is given (the
worker's ``pyfiq.Registry``, anything with the same three methods in a test); it must not import
redis, the API or the drivers.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ..config import Settings
from .events import (
    ClaimFailed,
    Clock,
    HeartbeatLate,
    LayoutMismatch,
    LeaseLost,
    LeaseRevoked,
    Outbox,
    StreamHalted,
    TaskDeferred,
    TaskRefused,
)
from .keys import queue_of
from .lease import Flag, Lease
from .outcomes import DeadLettered, Deferred, Prepared, describe_error, prepare
from .protocol import Call, PollBeat, RateLimit, RenewReply, ScriptCalls, consumed_fields
from .stream import Finished, RunTask, StreamRun
from .unknown import UnknownTasks


class TaskDirectory(Protocol):
    """Where the scheduler finds the application's tasks (a ``pyfiq.Registry`` satisfies it)."""

    def registered_queues(self) -> list[str]: ...

    def lookup(self, name: str) -> Any: ...

    def rate_limit_of(self, queue: str) -> RateLimit | None: ...


#: Heartbeat intervals between two fresh reads of the pollers: a replica that joins is counted
#: by the others within about this many intervals. Until then it only adds polls; it never
#: leaves a shard unpolled.
VIEW_REFRESH_BEATS = 8
#: Heartbeats between two sweeps of the registry for replicas silent past ``forget``.
SWEEP_BEATS = 16
#: A replica that holds no lease writes its heartbeat to the registry once every this many
#: heartbeat rounds (5 s with the defaults), and at once when whether it polls changes. Nothing
#: of an idle replica needs a fresher record: a lease's take-over never waits on the registry
#: (every replica that has looked at a shard looks again when its next lease can lapse).
IDLE_BEAT_ROUNDS = 5
#: A shard with nothing due, held or scheduled in the queues a replica consumes is polled this
#: many ``poll_interval`` apart (10 s with the defaults): whatever makes it claimable publishes a
#: wake-up, so this poll is only for a message lost with a connection. Shards with work or a
#: lease keep the ``poll_interval`` poll.
IDLE_POLL_FACTOR = 10


def poll_group(queues: Sequence[str]) -> str:
    """Replicas that consume the same queues share the safety poll: this names their group."""
    return hashlib.blake2b("\n".join(sorted(set(queues))).encode(), digest_size=6).hexdigest()


def poll_owners(pollers: Sequence[str], shards: int) -> list[str]:
    """The replica that polls each shard, by rendezvous hashing over the pollers: every replica
    that sees the same pollers agrees, and a poller joining or leaving moves only the shards it
    takes or had, so replicas whose views differ for a moment poll a shard twice, never zero times."""

    def weight(replica: str, shard: int) -> bytes:
        return hashlib.blake2b(f"{shard}|{replica}".encode(), digest_size=8).digest()

    return [max(pollers, key=lambda r: weight(r, shard)) for shard in range(shards)]


#: Makes a lock-like context manager: ``threading.Lock`` in threads, ``nullcontext`` on one loop.
LockFactory = Callable[[], AbstractContextManager[Any]]


class Scheduler:
    """``clock``: the driver's; ``lock``: makes the scheduler's lock and each lease's ``gate``."""

    def __init__(
        self,
        ops: ScriptCalls,
        concurrency: int,
        queues: Sequence[str] | None,
        tasks: TaskDirectory,
        *,
        clock: Clock,
        lock: LockFactory,
    ) -> None:
        self.ops = ops
        self.clock = clock
        self.events = Outbox()
        self._new_lock = lock
        self.settings: Settings = ops.settings
        self.concurrency = concurrency
        self._queues = list(queues) if queues is not None else None
        self.tasks = tasks
        shards = ops.keys.shards
        self.held: dict[str, Lease] = {}
        #: Leases let go after an operator's skip while their skipped task still runs here: no
        #: longer held (the stream may be claimed again, here too), but the execution keeps
        #: its worker slot until it ends.
        self._stuck: set[int] = set()
        #: False once the worker no longer dispatches (stopping, stopped, failed): it then
        #: claims nothing and tells the fleet it polls no shard, so others poll them.
        self.dispatching = True
        # Calls a heartbeat's replies asked for (a pause's confirmation, a skip's let-go).
        self._followups: list[tuple[Lease, str, Call]] = []
        self._lock = lock()
        self._shard_due = [0.0] * shards
        # Looks asked for by events (a claim, a lease about to lapse, a scan paging on), made
        # whichever replica polls the shard.
        self._look_at = [math.inf] * shards
        self._scan_offset = [0] * shards
        # The shards this replica's safety poll covers; None: all of them (no view of the other
        # pollers yet, or a stale one).
        self._polled: frozenset[int] | None = None
        self._view: list[str] = []
        # When the view was last applied and last read afresh; heartbeats written, and rounds
        # since the last one (and whether this replica polled then).
        self._view_at = self._view_read_at = -math.inf
        self._beats = self._rounds_since_beat = 0
        self._beat_polled: bool | None = None
        # Shards named by wake-up messages; swapped out before a look, so a message arriving
        # during the look is kept for the next one, never overwritten.
        self._woken: set[int] = set()
        # Streams handed back for a task this replica cannot run: left to others for a while.
        self._avoid: dict[str, float] = {}
        self.unknown = UnknownTasks(clock, self.settings.unknown_task_grace, self._lock)
        self._backoff, self._gained = 0.0, False
        self._identity: tuple[str, dict[str, Any]] | None = None
        started = clock.monotonic()
        self._next_beat = started + self.settings.effective_heartbeat
        #: Tasks ended under leases given up since the start, and (time, total) per heartbeat
        #: over the last minute: the replica's rate that operators see.
        self._done = 0
        self._done_seen: deque[tuple[float, int]] = deque([(started, 0)])
        #: Tasks taken together with a lease: a claim and the first batch in one round trip.
        self.first_batch = min(self.settings.effective_prefetch, self.settings.batch_limit)

    # -- claiming -------------------------------------------------------------------------

    def consumed_queues(self) -> list[str]:
        return self._queues if self._queues is not None else self.tasks.registered_queues()

    def free(self) -> int:
        with self._lock:
            return self.concurrency - len(self.held) - len(self._stuck)

    def held_leases(self) -> list[Lease]:
        with self._lock:
            return list(self.held.values())

    def wake(self, shards: Iterable[int]) -> None:
        with self._lock:
            self._woken.update(s for s in shards if 0 <= s < len(self._shard_due))

    def wake_all(self) -> None:
        self.wake(range(len(self._shard_due)))

    def due_calls(self, now: float) -> tuple[list[int], list[Call]]:
        """The shards worth a look now, and the calls that look."""
        queues = self.consumed_queues()
        with self._lock:
            free = self.concurrency - len(self.held) - len(self._stuck)
            if free <= 0 or not queues or not self.dispatching:
                return [], []  # wake-ups stay pending until there is room to act on them
            woken, self._woken = self._woken, set()
            for stream, until in list(self._avoid.items()):
                if until <= now:
                    del self._avoid[stream]
            want = free + len(self._avoid)
        polled = self._polled_now(now)
        shards = [
            s
            for s, due in enumerate(self._shard_due)
            if s in woken or self._look_at[s] <= now or (due <= now and (polled is None or s in polled))
        ]
        return shards, [self.ops.due(s, want, queues, self._scan_offset[s]) for s in shards]

    def candidates(self, shards: Sequence[int], replies: Sequence[Any], now: float) -> list[tuple[int, str]]:
        found: list[tuple[float, int, str]] = []
        for shard, reply in zip(shards, replies, strict=True):
            if isinstance(reply, Exception) and "PYFIQLAYOUT" in str(reply):
                # Another shard count wrote this shard's layout (a misconfigured replica or
                # producer after an empty restart): say so loudly, keep serving other shards.
                self._shard_due[shard] = now + self.settings.poll_interval
                self._look_at[shard] = math.inf
                error = str(reply).split("PYFIQLAYOUT ", 1)[-1]
                self.events.put(LayoutMismatch(shard, self.ops.keys.shards, error))
                continue
            if isinstance(reply, Exception):
                raise reply
            nxt, offset, streams = self.ops.parse_due(reply)
            self._scan_offset[shard] = offset
            wait = self.settings.poll_interval
            if nxt is None and not streams:
                wait *= IDLE_POLL_FACTOR  # nothing there: a wake-up announces what comes
            # Page on at once past streams of queues this replica does not consume.
            self._shard_due[shard] = now if offset else now + wait
            # The shard's next lease lapse or due time: this replica looks then, whoever polls
            # the shard, so a crashed holder's stream is taken over when its lease lapses.
            self._look_at[shard] = now if offset else (math.inf if nxt is None else now + nxt)
            found += [(since, shard, s) for s, since in streams]
        # Oldest due first, across shards: a stream that yielded after its batch queues up
        # behind streams that have waited longer, which is what makes the yield fair.
        found.sort()
        with self._lock:
            return [(sh, s) for _, sh, s in found if s not in self.held and s not in self._avoid]

    def first_take(self, stream: str) -> int:
        """Tasks to take together with the lease. None for a rate-limited queue: its holder
        asks the permit first, so a task is only taken when it can start."""
        return 0 if self.tasks.rate_limit_of(queue_of(stream)) is not None else self.first_batch

    def on_acquired(self, shard: int, stream: str, reply: Any, abort: Flag, now: float) -> Lease | None:
        """``now``: the monotonic time the acquire request was sent."""
        lease = self.ops.parse_acquire(stream, reply, abort, now, gate=self._new_lock())
        if lease is None:
            if len(reply) > 1:  # still leased for a moment: look again right when it lapses
                self._look_at[shard] = min(self._look_at[shard], now + int(reply[1]) / 1000)
            return None
        with self._lock:
            self.held[stream] = lease
        # The shard may hold more due streams than it returned: look again soon.
        self._look_at[shard] = now
        return lease

    def finished(self, lease: Lease, run: StreamRun | None) -> None:
        with self._lock:
            if self.held.get(lease.stream) is lease:  # after a skip's let-go it may be held anew
                del self.held[lease.stream]
            self._stuck.discard(id(lease))
            self._done += lease.done
            if run is not None and run.due_in is not None:
                # Its delayed tasks are due then: this replica looks, whoever polls the shard.
                shard = lease.keys.shard
                self._look_at[shard] = min(self._look_at[shard], self.clock.monotonic() + run.due_in)
            if run is not None and run.deferred is not None:
                self._avoid[lease.stream] = self.clock.monotonic() + max(self.settings.poll_interval, 1.0)
            if run is not None and run.yielded:
                # Look at every shard before claiming again, so the stream that has waited
                # longest wins even if its wake-up has not reached this replica yet: a listener
                # thread starved of the interpreter lock by no-op tasks, or Redis Cluster's
                # sharded channels read node by node, hear it late. (Looking at the yielded
                # stream's shard alone halved the default drain's scripts per task, and let a
                # cold key wait two batches and more on a cluster: fairness is the promise.)
                self._woken.update(range(len(self._shard_due)))

    def unclaimed(self, candidates: Sequence[tuple[int, str]]) -> None:
        """Due streams a poll found that this replica had no room to claim: their shards are
        looked at again as soon as it has room, before any stream it yields is claimed anew."""
        with self._lock:
            self._woken.update(shard for shard, _ in candidates)

    def idle_wait(self, now: float) -> float:
        """How long the dispatcher may sleep unless woken."""
        with self._lock:
            full = len(self.held) + len(self._stuck) >= self.concurrency
            woken = bool(self._woken)
        if full or not self.consumed_queues():
            return self.settings.poll_interval
        if woken:
            return 0.0
        polled = self._polled_now(now)
        timed = self._shard_due if polled is None else [self._shard_due[s] for s in polled]
        nearest = min([*timed, *self._look_at])
        return min(self.settings.poll_interval, max(0.0, nearest - now))

    # -- sharing the safety poll ------------------------------------------------------------

    def _polled_now(self, now: float) -> frozenset[int] | None:
        """The shards this replica's safety poll covers now (None: all). A view older than a
        few registry intervals (the registry unreachable) is not trusted: then every shard is polled."""
        if now - self._view_at > 3 * self.registry_interval():
            return None
        return self._polled

    def registry_interval(self) -> float:
        """The longest a live replica goes without writing its heartbeat to the registry."""
        return IDLE_BEAT_ROUNDS * self.settings.effective_heartbeat

    def poll_live_ms(self) -> int:
        """Silence after which a poller counts as gone: two and a half registry intervals, so
        a late heartbeat or two never counts as gone. Until others notice, a dead poller's
        shards miss only their safety poll: lease lapses and due times are looked at by every
        replica that knows them (see ``candidates``)."""
        return int(1000 * 2.5 * self.registry_interval())

    def _polls(self) -> bool:
        """Whether this replica takes part in the safety poll: it consumes queues, dispatches
        and has a free slot."""
        queues = self.consumed_queues()
        with self._lock:
            return bool(queues) and self.dispatching and len(self.held) + len(self._stuck) < self.concurrency

    def _registry_beat_due(self, leases: Sequence[Lease]) -> bool:
        """Whether this round writes the heartbeat: always while holding leases (their holder's
        record says what runs), at once when whether it polls changed, else every
        IDLE_BEAT_ROUNDS rounds."""
        self._rounds_since_beat += 1
        polls = self._polls()
        if leases or self._stuck or polls != self._beat_polled or self._rounds_since_beat >= IDLE_BEAT_ROUNDS:
            self._rounds_since_beat, self._beat_polled = 0, polls
            return True
        return False

    def _poll_beat(self, replica: str, now: float) -> PollBeat:
        """What this heartbeat says about the safety poll, and whether it reads the pollers
        afresh: on the first beat, after the group changed, every VIEW_REFRESH_BEATS heartbeat
        intervals (an idle replica beats less often, and still sees a joiner as soon), and while
        this replica is missing from a view with room for it (it was counted as gone)."""
        queues = self.consumed_queues()
        polls = bool(self._beat_polled)  # as _registry_beat_due just read it for this beat
        group = poll_group(queues)
        member = f"{group}|{replica}"
        self._beats += 1
        stale = bool(self._view) and not self._view[0].startswith(f"{group}|")
        refresh = (
            not self._view
            or stale
            or now - self._view_read_at >= VIEW_REFRESH_BEATS * self.settings.effective_heartbeat
            or (member not in self._view and len(self._view) < self.ops.keys.shards)
        )
        if refresh:
            self._view_read_at = now
        sweep = self._beats % SWEEP_BEATS == 1
        return PollBeat(group, polls, self.poll_live_ms(), refresh, sweep, self._view)

    def _on_beat(self, reply: Any, sent_at: float) -> None:
        """Apply the view a heartbeat brought back: which pollers poll now, hence the shards
        this replica covers. Shards it gains are looked at at once."""
        if isinstance(reply, Exception) or self._identity is None:
            return  # the last view stands until it is stale
        view = self.ops.parse_beat(reply)
        self._view = [name for name, _ in view]
        pollers = [name.split("|", 1)[1] for name, polls in view if polls]
        shards = set(range(self.ops.keys.shards))
        polled: frozenset[int] | None = None  # busy (no view), or nobody else polls: every shard
        if pollers:
            owners = poll_owners(pollers, len(shards))
            polled = frozenset(s for s in shards if owners[s] == self._identity[0])
        before = self._polled_now(sent_at)
        gained = set() if not view else (shards if polled is None else polled) - (shards if before is None else before)
        for shard in gained:
            self._shard_due[shard] = sent_at
        with self._lock:
            self._polled, self._view_at = polled, sent_at
            self._gained = self._gained or bool(gained)

    def gained_shards(self) -> bool:
        """True once after a heartbeat handed this replica shards to poll: the dispatcher
        should look now rather than at the end of its wait."""
        with self._lock:
            gained, self._gained = self._gained, False
        return gained

    def poll_view(self) -> tuple[list[str], frozenset[int] | None]:
        """(the pollers of the last view by name, the shards this replica polls; None: all)."""
        return list(self._view), self._polled_now(self.clock.monotonic())

    def prepare(self, lease: Lease, step: RunTask, replica: str) -> Prepared | DeadLettered | Deferred:
        """Decode a taken task and find its function (see ``outcomes.prepare``), noting why a
        task is dead-lettered instead."""
        prepared = prepare(
            step.entry,
            step.deliveries,
            lease,
            self.tasks.lookup,
            self.settings,
            replica,
            clock=self.clock,
            unknown_for=self.unknown_for,
        )
        if not isinstance(prepared, Deferred):
            # The grace starts again at the task's next meeting (say, after a requeue).
            self.forget_unknown(step.entry.id)
        if isinstance(prepared, DeadLettered):
            self.events.put(TaskRefused(lease.stream, step.entry.id, prepared.header))
        return prepared

    def ended(self, run: StreamRun, step: Finished) -> None:
        """Note how a lease ended when it did not end well, for the driver to say loudly."""
        lease = run.lease
        if run.deferred is not None and self.unknown.first_hand_back(lease.stream):
            grace = self.settings.unknown_task_grace
            self.events.put(TaskDeferred(lease.stream, run.deferred, grace, run.deferred_name))
        if step.reason == "fenced" and lease.revoked:
            self.events.put(LeaseRevoked(lease.stream, lease.fence, lease.skipped))
        elif step.reason == "fenced":
            self.events.put(LeaseLost(lease.stream, lease.fence, lease.lost_reason))

    def forget_unknown(self, task_id: str) -> None:
        self.unknown.forget(task_id)

    def unknown_for(self, task_id: str) -> float:
        return self.unknown.met_for(task_id)

    def claim_failed(self, exc: BaseException) -> float:
        """A look or claim failed (Redis unreachable, a restart): how long to wait before the
        next one, doubling up to the poll interval."""
        self._backoff = min(max(self._backoff * 2, 0.1), self.settings.poll_interval)
        self.events.put(ClaimFailed(describe_error(exc), self._backoff))
        return self._backoff

    def claim_succeeded(self) -> None:
        self._backoff = 0.0

    # -- heartbeats -----------------------------------------------------------------------

    def heartbeat_wait(self, now: float) -> float:
        """How long the heartbeat may sleep before its next round."""
        return max(0.0, self._next_beat - now)

    def identify(self, replica: str, **info: Any) -> None:
        """Who this worker is and which pyfiq it runs (a rolling upgrade mixes versions), for
        the replica registry its heartbeats keep up to date."""
        from .. import __version__  # here: the package imports the engine before it is whole

        self._identity = (
            replica,
            {**info, "version": __version__, "heartbeat_ms": int(self.registry_interval() * 1000)},
        )

    def heartbeat_round(self, now: float) -> tuple[list[Lease], list[Call]]:
        """Start a round of renewals at ``now``; a round later than a whole interval is logged
        (the process was paused, or the GIL held), since it eats into every lease's margin."""
        interval = self.settings.effective_heartbeat
        late = now - self._next_beat
        if late > interval:
            self.events.put(HeartbeatLate(round(late, 3), interval))
        self._next_beat = now + interval
        leases, calls = self.renew_calls()
        if self._identity is not None and self._registry_beat_due(leases):
            replica, info = self._identity
            # After the renewals: on_renewed reads the first len(leases) replies.
            calls.append(self.ops.beat(replica, {**info, **self._activity(leases, now)}, self._poll_beat(replica, now)))
        return leases, calls

    def _activity(self, leases: Sequence[Lease], now: float) -> dict[str, Any]:
        """What the heartbeat says this worker does: the streams it holds, the task each runs
        and since when (Redis ms), tasks ended so far and per second over the last minute."""
        with self._lock:
            done = self._done + sum(lease.done for lease in self.held.values())
        self._done_seen.append((now, done))
        while now - self._done_seen[0][0] > 60:
            self._done_seen.popleft()
        first_at, first_done = self._done_seen[0]
        rate = (done - first_done) / (now - first_at) if now > first_at else 0.0
        running = {lease.stream: list(lease.running) for lease in leases if lease.running is not None}
        held = sorted(lease.stream for lease in leases)
        # A stopping worker claims nothing more, however long its running tasks still take.
        queues = self.consumed_queues() if self.dispatching else []
        consumed = consumed_fields(queues, registered=self._queues is None and self.dispatching)
        return {"held": held, "running": running, "done": done, "tasks_per_s": round(rate, 3), **consumed}

    def renew_calls(self) -> tuple[list[Lease], list[Call]]:
        leases = [lease for lease in self.held_leases() if not lease.lost]
        return leases, [self.ops.renew(lease) for lease in leases]

    def on_renewed(self, leases: Sequence[Lease], replies: Sequence[Any], sent_at: float) -> list[Lease]:
        """Apply renewal replies (an exception stands for a failed call) of the round sent at
        ``sent_at``; returns the leases found lost by this round."""
        if len(replies) > len(leases):
            self._on_beat(replies[len(leases)], sent_at)
        lost: list[Lease] = []
        arrived = self.clock.monotonic()
        for lease, reply in zip(leases, replies[: len(leases)], strict=True):
            if isinstance(reply, Exception):
                # Unknown whether Redis still holds it: assume lost once it may have lapsed.
                if arrived >= lease.valid_until:
                    lease.mark_lost(f"renewal failed until the lease may have lapsed: {describe_error(reply)}")
                    lost.append(lease)
            else:
                status = RenewReply(int(reply[0] if isinstance(reply, list) else reply))
                if status is RenewReply.REFUSED:
                    if not lease.ending:  # a lease released a moment ago is not lost
                        lease.mark_lost("renewal refused: the lease lapsed or was taken over")
                        lost.append(lease)
                    continue
                lease.confirm(sent_at)
                if status is RenewReply.PAUSED:
                    self._on_paused(lease)
                elif status is RenewReply.REVOKED:
                    self._on_revoked(lease, reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1]))
        for lease in lost:
            self.events.put(LeaseLost(lease.stream, lease.fence, lease.lost_reason))
        return lost

    # -- operator actions reaching work taken ahead ------------------------------------------

    def _on_paused(self, lease: Lease) -> None:
        """The stream is paused: start nothing more under the lease, then say so in Redis,
        which is what ``pause()`` waits for (the halt is in place before the call is made)."""
        if lease.halt("paused"):
            self.events.put(StreamHalted(lease.stream, "paused"))
        if lease.halted and not lease.halt_confirmed:
            self._followups.append((lease, "halted", self.ops.halted(lease)))

    def _on_revoked(self, lease: Lease, skipped: str) -> None:
        """An operator's skip revoked the lease. Nothing more starts under it; the run lets go
        at its next step, or, if what runs here now is the skipped task itself (a head stuck
        in one endless call), the heartbeat lets go on its behalf at once, so the stream moves
        on while that execution, whose result no longer counts, keeps its worker slot."""
        if lease.revoke(skipped):
            self.events.put(LeaseRevoked(lease.stream, lease.fence, skipped))
        running = lease.running
        if running is not None and running[0] in lease.skipped.split() and not lease.letting_go:
            lease.letting_go = True
            acks = lease.unconfirmed_acks() if lease.unconfirmed_acks is not None else []
            self._followups.append((lease, "let_go", self.ops.release(lease, acks)))
        elif not lease.halt_confirmed:
            self._followups.append((lease, "halted", self.ops.halted(lease)))

    def followups(self) -> list[tuple[Lease, str, Call]]:
        """Calls the last heartbeat's replies asked for; send them, then ``on_followups``."""
        out, self._followups = self._followups, []
        return out

    def on_followups(self, items: Sequence[tuple[Lease, str, Call]], replies: Sequence[Any]) -> None:
        for (lease, kind, _), reply in zip(items, replies, strict=True):
            failed = isinstance(reply, Exception)
            if kind == "halted":
                lease.halt_confirmed = not failed and int(reply) == 1
            elif failed:
                lease.letting_go = False  # the next heartbeat tries again
            else:
                lease.mark_lost("let go after an operator's skip")
                with self._lock:
                    if self.held.get(lease.stream) is lease:
                        del self.held[lease.stream]
                        self._stuck.add(id(lease))

    def abort_all(self) -> None:
        for lease in self.held_leases():
            lease.abort.set()
