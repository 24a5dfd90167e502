"""The operator's room: actions on a deployment (pause, resume, skip a head task, requeue and
purge dead letters; delete or dead-letter one pending task, in ``work``) beside the reads they
are decided on (``reads``, the bounded ``pages``, a stream's tasks in ``work``). Reached as
``backend.admin``; the backend keeps its documented operator methods as delegations.

Actions that change a stream go through the fenced scripts (``skip``, ``requeue``) as
operator calls, which are never sent twice; a pause waits for the holders of what it pauses
(``halts``).
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable

from ..engine.keys import stream_name, validate_key, validate_queue_name
from ..engine.outcomes import dead_letter_header
from ..engine.ticks import validate_schedule_name
from ..task import Entry
from . import halts
from .halts import HaltReport
from .work import Work

#: Dead-letter records one requeue script call looks at, at most.
REQUEUE_STEP = 500


class Admin(Work):
    """The operator's actions and reads over the backend ``host`` (see the module)."""

    def pause(self, queue: str, key: str | None = None, *, wait: float | None = None) -> HaltReport:
        """Pause a queue (every stream of it, across the fleet) or one keyed stream of it: a
        running task finishes, nothing new starts, enqueues are still accepted. The state is
        kept in Redis, so it survives restarts of the workers and of Redis (with AOF).

        Returns once every worker holding an affected stream has confirmed that it starts
        nothing more (tasks it took ahead go back to the stream, in order), or its lease has
        ended: from then on no task of the target starts anywhere. The wait is bounded by
        ``wait`` seconds, by default the lease TTL and a second (a holder that cannot answer
        loses its lease by then); the report says who confirmed and who did not."""
        self._set_paused(queue, key, add=True)
        target = stream_name(queue, key)
        return halts.wait_for_holders(self._host, target, halts.leased_streams(self._host, queue, key), wait)

    def resume(self, queue: str, key: str | None = None) -> None:
        """Undo ``pause``; idle workers are woken to look at once."""
        self._set_paused(queue, key, add=False)

    def _set_paused(self, queue: str, key: str | None, *, add: bool) -> None:
        validate_queue_name(queue)
        if key is not None:
            validate_key(key)  # the name is written into Redis: bounded as an enqueue's are
        if key is None:
            targets = [(self.keys.paused(shard), queue, shard) for shard in range(self.keys.shards)]
        else:
            k = self.keys.stream(stream_name(queue, key))
            targets = [(k.paused, k.stream, k.shard)]
        pipe = self.client.pipeline(transaction=False)
        for paused_key, member, shard in targets:
            if add:
                pipe.sadd(paused_key, member)
            else:
                pipe.srem(paused_key, member)
                channel = self.keys.wake(shard)
                (pipe.spublish if self.keys.sharded_wake else pipe.publish)(channel, shard)
        with self.translated():
            pipe.execute()

    def skip(self, stream: str, reason: str = "skipped by an operator") -> str | None:
        """Dead-letter the head task of a stream as ``operator`` so the stream moves on (a head
        that blocks it); the lease is revoked, which ends its holder's retries. Nobody else
        claims the stream until that holder has let go (at once if it runs only the skipped
        task, else when the task it runs now ends) or, if it died, its lease has lapsed, so
        tasks it took ahead never run twice at once. Returns the task id, or None when the
        stream holds no task."""
        header = dead_letter_header(
            "operator",
            replica=f"operator@{socket.gethostname()}",
            deliveries=0,
            error=RuntimeError(reason),
            at_ms=int(time.time() * 1000),
        )
        reply = self._host.operator_call(self.ops.skip(stream, header))
        return Entry.load(reply[1]).id if int(reply[0]) in (1, 2) else None

    def requeue_dead_letters(
        self, stream: str, *, count: int | None = None, task_id: str | None = None, front: bool = False
    ) -> int:
        """Move dead letters back to pending: the one ``task_id``, or the ``count`` oldest (all
        by default); ``front`` puts them before the stream's pending work, in order. Returns
        how many moved; records whose task entry is malformed stay dead letters.

        Each script call looks at no more than ``REQUEUE_STEP`` records, so a requeue from a
        dead-letter set of any size never stalls Redis for its other clients."""
        if task_id is not None:
            call = self.ops.requeue(stream, front=front, limit=1, task_id=task_id)
            moved, _, _ = self._host.operator_call(call)
            return int(moved)
        k = self.keys.stream(stream)
        low, high = "-inf", "+inf"
        if count is not None:
            if count <= 0:
                return 0
            nth = self.client.zrange(k.dead, count - 1, count - 1, withscores=True)
            if nth:
                high = str(int(nth[0][1]))
        if front and min(count or math.inf, int(self.client.zcard(k.dead))) > REQUEUE_STEP:
            # Pages go to the front newest first: a holder taking between two calls would run
            # a later page before an earlier one. The stream is halted meanwhile, as a pause
            # does it (its holder confirms it starts nothing more), and resumed after.
            return self._halted(stream, lambda: self._requeue_pages(stream, front, low, high))
        return self._requeue_pages(stream, front, low, high)

    def _halted(self, stream: str, action: Callable[[], int]) -> int:
        k = self.keys.stream(stream)
        with self.translated():
            added = bool(self.client.sadd(k.paused, stream))
        try:
            halts.wait_for_holders(self._host, stream, [stream], None)
            # A halted holder lets go once its running task ends, putting what it took ahead
            # back at the head of pending: between two pages that would land in the middle of
            # the requeued block. Waiting for it (bounded) keeps the block whole.
            halts.wait_for_release(self._host, stream, self.settings.lease_ttl + halts.MARGIN_SECONDS)
            return action()
        finally:
            if added:  # an operator's own pause of the stream stays
                pipe = self.client.pipeline(transaction=False)
                pipe.srem(k.paused, stream)
                (pipe.spublish if self.keys.sharded_wake else pipe.publish)(self.keys.wake(k.shard), k.shard)
                with self.translated():
                    pipe.execute()

    def _requeue_pages(self, stream: str, front: bool, low: str, high: str) -> int:
        total = 0
        while True:
            call = self.ops.requeue(stream, front=front, limit=REQUEUE_STEP, low=low, high=high)
            moved, skipped, last = (int(x) for x in self._host.operator_call(call))
            total += moved
            if moved + skipped < REQUEUE_STEP:
                return total
            # Page on past what this call looked at: downwards for 'front', upwards otherwise.
            if front:
                high = f"({last}"
            else:
                low = f"({last}"

    def purge_dead_letters(self, stream: str) -> int:
        """Delete every dead letter of ``stream``; returns how many there were."""
        k = self.keys.stream(stream)
        pipe = self.client.pipeline(transaction=True)
        # UNLINK frees a large set in the background instead of blocking Redis.
        pipe.zcard(k.dead).unlink(k.dead, k.dead_ids).srem(k.dlq_index, stream)
        return int(pipe.execute()[0])

    def forget_schedule(self, name: str) -> bool:
        """Delete the record of the periodic schedule ``name`` (its function was removed or
        renamed, or a rollback carries a lower ``version``); False if there was none. Its
        version and rule go at once; its last tick stands for ``FORGOTTEN_MS`` more, so a
        replica that starts meanwhile does not fire again the tick fired just before. A replica
        that still runs the schedule goes on from its next tick."""
        validate_schedule_name(name)
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.sismember(self.keys.schedules(shard), name)
        with self.translated():
            shards = [shard for shard, found in enumerate(pipe.execute()) if found]
            for shard in shards:
                record, aside = self.keys.schedule_record(shard, name), self.keys.schedule_forgotten(shard, name)
                pipe = self.client.pipeline(transaction=True)
                # The whole record moves aside at once; tick.lua reads only its last tick there.
                pipe.rename(record, aside).pexpire(aside, FORGOTTEN_MS)
                pipe.srem(self.keys.schedules(shard), name)
                pipe.execute(raise_on_error=False)  # RENAME fails on a record already gone
        return bool(shards)


#: How long a forgotten schedule's last tick still stands: past the longest grace (60 s) of a
#: tick, so no replica starting meanwhile can owe that tick again.
FORGOTTEN_MS = 120_000
