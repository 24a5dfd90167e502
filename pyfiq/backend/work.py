"""The work itself, one stream at a time: its tasks as they wait (``task_page``, read in bounded
``LRANGE`` windows), the operator's removal of one pending task (``delete_task``,
``dead_letter_task``: one script each, which refuses a task a holder was handed), and a task
found by its id across a queue's streams as far as the indexes reach (``find_task``).

A task in a stream's pending list has been handed to nobody: a holder takes tasks into the
in-flight list, in the script that hands them over, before it can run them, tasks it takes
ahead included, and puts back into pending only what it gives up with its lease. So a removal
from the pending list, in one script that first looks at the in-flight list, never takes a task
from under a worker that may run it.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

from ..engine.keys import queue_of, stream_name, validate_queue_name
from ..engine.outcomes import dead_letter_header
from ..engine.status import STATUS_SCAN, holder_of, parse_status
from ..errors import ConfigurationError, DecodeError
from ..task import ID_LENGTH, Entry, TaskRecord, TaskStatus
from .pages import OVERVIEW_STREAMS, Pages
from .reads import Operated, as_text
from .views import held_streams

#: Tasks one page of a stream shows (and in-flight tasks its first page shows, at most).
TASK_PAGE = 50
#: The largest page a caller may ask for: each row is a task's whole entry.
MAX_TASK_PAGE = 500
#: Pending (and delayed) tasks of each stream a search across a queue looks through.
FIND_DEPTH = 100
#: Reason recorded with a task moved to the dead letters by ``dead_letter_task``: the reason of
#: every operator's dead letter, so it is requeued, filtered and reported (``skipped``) as one.
OPERATOR_REASON: Literal["operator"] = "operator"

_TASK_ID = re.compile(rf"[0-9a-f]{{{ID_LENGTH}}}")

#: Where a task of a stream is: ``running`` on its holder; ``taken`` by its holder ahead of the
#: task it runs (or just ended, its acknowledgement on the way); ``in_flight`` without a live
#: holder (handed out before: the next claim hands it over again first); ``pending`` (handed
#: to nobody yet: the only state in which an operator may remove it).
TaskPlace = Literal["running", "taken", "in_flight", "pending"]
Outcome = Literal["deleted", "dead_lettered", "in_flight", "not_found"]


#: The largest payload a page decodes to show its arguments.
SHOWN_PAYLOAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class WaitingTask:
    """One task of a stream as it waits. ``place``: how many of the stream's tasks are ahead of
    it (in-flight ones first); ``index``: its place in its own list (the in-flight list, or the
    pending list); ``record``: its decoded record, else None with ``problem`` saying why."""

    place: int
    index: int
    entry: Entry
    state: TaskPlace
    record: TaskRecord | None
    problem: str | None
    deliveries: int = 0
    attempt: int | None = None
    holder: str | None = None

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def removable(self) -> bool:
        """Whether an operator may delete it or move it to the dead letters now."""
        return self.state == "pending" and not self.entry.malformed


@dataclass(frozen=True)
class TaskPage:
    """One page of a stream's tasks, read at one moment (one ``MULTI``): the in-flight ones on the
    first page, then ``pending`` list entries from ``offset``; ``next_offset`` goes on (None: the
    last page). ``scheduled``: delayed tasks, not shown (they join the list when due)."""

    stream: str
    tasks: list[WaitingTask]
    pending: int
    inflight: int
    scheduled: int
    dead: int
    paused: bool
    holder: str | None
    offset: int
    next_offset: int | None
    now_ms: int

    @property
    def queue(self) -> str:
        return queue_of(self.stream)


@dataclass(frozen=True)
class Removal:
    """What ``delete_task`` or ``dead_letter_task`` did: ``deleted`` or ``dead_lettered``, or
    nothing: ``in_flight`` (refused: a holder was handed the task) or ``not_found``. ``detail``
    says it in a sentence for an operator."""

    task_id: str
    stream: str
    outcome: Outcome
    detail: str
    name: str | None = None

    @property
    def done(self) -> bool:
        return self.outcome in ("deleted", "dead_lettered")


@dataclass(frozen=True)
class TaskSearch:
    """A task looked for by its id across a queue: ``status`` in the stream it was found in
    (``found``), else its status in the queue's unkeyed stream, with ``searched`` saying what
    else was looked through."""

    status: TaskStatus
    found: bool
    searched: str = ""


def flight_state(index: int, task_id: str, handed: int, lease: str, running: str, started: bool) -> TaskPlace:
    """Where an in-flight task is, as ``engine.status`` tells it: a task past what the live
    holder was handed (or with no live holder) waits for the next claim; the one the holder
    names at its heartbeats runs (before its first heartbeat: the head marked started)."""
    if not lease or index >= handed:
        return "in_flight"
    if running == task_id or (not running and index == 0 and started):
        return "running"
    return "taken"


def check_task_id(task_id: str) -> str:
    if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
        raise ConfigurationError(
            f"{task_id!r} is not a task id: pyfiq's ids are {ID_LENGTH} lowercase hex digits (TaskHandle.id)"
        )
    return task_id


class Work(Pages):
    """The task-level reads and actions of ``admin.Admin`` (see the module)."""

    def __init__(self, host: Operated) -> None:
        super().__init__(host)
        self.ops = host.ops

    # -- a stream's tasks ---------------------------------------------------------------------

    def task_page(self, stream: str, *, offset: int = 0, size: int = TASK_PAGE) -> TaskPage:
        """Tasks of ``stream`` from place ``offset`` of its pending list, ``size`` of them, and on
        the first page the in-flight ones (at most ``size``) ahead of them: one ``MULTI`` of
        bounded reads (``LRANGE`` windows, the stream's counts, lease and meta hash), then
        Redis's clock. Nothing is written."""
        if not 1 <= size <= MAX_TASK_PAGE or offset < 0:
            raise ConfigurationError(f"a page has 1 to {MAX_TASK_PAGE} tasks from an offset of 0 or more")
        k = self.keys.stream(stream)
        pipe = self.client.pipeline(transaction=True)
        # Later pages show no in-flight task: LRANGE 1 0 is an empty range.
        pipe.llen(k.pending).llen(k.inflight).lrange(k.inflight, *((0, size - 1) if offset == 0 else (1, 0)))
        pipe.lrange(k.pending, offset, offset + size - 1).get(k.lease).hgetall(k.meta)
        pipe.zcard(k.later).zcard(k.dead).smismember(k.paused, [stream, queue_of(stream)])
        with self.translated():
            pending, inflight, flying, waiting, lease, meta, later, dead, paused = pipe.execute()
            now = self.redis_now_ms()
        marks = {as_text(f): as_text(v) for f, v in meta.items()}
        token = as_text(lease) if lease else ""
        handed, running = int(marks.get("handed", "0") or 0), marks.get("running", "")
        tasks = [self._flying(i, Entry.load(raw), marks, token, handed, running) for i, raw in enumerate(flying)]
        tasks += [self._waiting(int(inflight) + offset + j, offset + j, raw, marks) for j, raw in enumerate(waiting)]
        nxt = offset + size if offset + size < int(pending) else None
        return TaskPage(
            stream=stream,
            tasks=tasks,
            pending=int(pending),
            inflight=int(inflight),
            scheduled=int(later),
            dead=int(dead),
            paused=any(paused),
            holder=holder_of(token) if token else None,
            offset=offset,
            next_offset=nxt,
            now_ms=now,
        )

    def _decoded(self, entry: Entry, shown: bool = True) -> tuple[TaskRecord | None, str | None]:
        """The entry's record; for a page (``shown``), only one whose payload a page can afford to
        decode: fifty near the payload limit each would take seconds and gigabytes."""
        if entry.malformed:
            return None, f"not a task entry ({len(entry.raw):,} bytes): the next claim dead-letters it"
        if shown and len(entry.payload) > SHOWN_PAYLOAD_BYTES:
            return (
                None,
                f"arguments not shown: a payload of {len(entry.payload):,} bytes"
                f" (pages decode at most {SHOWN_PAYLOAD_BYTES:,})",
            )
        try:
            return TaskRecord.decode(entry.payload, self.settings.serializer), None
        except DecodeError as exc:
            return None, str(exc)

    def _flying(
        self, index: int, entry: Entry, marks: dict[str, str], token: str, handed: int, running: str
    ) -> WaitingTask:
        record, problem = self._decoded(entry)
        state = flight_state(index, entry.id, handed, token, running, f"s:{entry.id}" in marks)
        attempt, _, _ = marks.get("attempt", "").partition(":") if state == "running" else ("", "", "")
        return WaitingTask(
            place=index,
            index=index,
            entry=entry,
            state=state,
            record=record,
            problem=problem,
            deliveries=int(marks.get(f"d:{entry.id}", "1") or 1),
            attempt=int(attempt) if attempt.isdigit() else None,
            holder=holder_of(token) if token and state != "in_flight" else None,
        )

    def _waiting(self, place: int, index: int, raw: bytes, marks: dict[str, str]) -> WaitingTask:
        entry = Entry.load(raw)
        record, problem = self._decoded(entry)
        deliveries = int(marks.get(f"d:{entry.id}", "0") or 0)
        return WaitingTask(place, index, entry, "pending", record, problem, deliveries)

    # -- removing one pending task ------------------------------------------------------------

    def delete_task(self, queue: str, task_id: str, key: str | None = None, *, place: int | None = None) -> Removal:
        """Delete task ``task_id`` from the pending list of ``queue`` (or of its stream ``key``):
        it will never run, and the tasks behind it keep their order. A task a holder was handed
        (running, taken ahead of the one it runs, or in flight awaiting the next claim) is
        refused, with nothing changed: see ``Removal``. ``place``: where it was seen
        (``WaitingTask.index``, or the place ``status()`` gives), looked around first (500
        entries either side); without it, or when it moved further, the first ``STATUS_SCAN``
        pending tasks are looked through. One script call."""
        stream = self._stream_of(queue, key)
        call = self.ops.delete_pending(stream, check_task_id(task_id), -1 if place is None else place)
        return self._removal(stream, task_id, "deleted", self._host.operator_call(call), place)

    def dead_letter_task(
        self,
        queue: str,
        task_id: str,
        key: str | None = None,
        *,
        reason: str = "moved to the dead letters by an operator",
        place: int | None = None,
    ) -> Removal:
        """Move task ``task_id`` from the pending list of ``queue`` (or of its stream ``key``) to
        the stream's dead letters, reason ``operator`` with ``reason`` as its error: it can be
        requeued later like any dead letter. Refuses what ``delete_task`` refuses."""
        stream = self._stream_of(queue, key)
        header = dead_letter_header(
            OPERATOR_REASON,
            replica=f"operator@{socket.gethostname()}",
            deliveries=0,
            error=RuntimeError(reason),
            at_ms=int(time.time() * 1000),
        )
        place_arg = -1 if place is None else place
        call = self.ops.dead_letter_pending(stream, check_task_id(task_id), header, place_arg)
        return self._removal(stream, task_id, "dead_lettered", self._host.operator_call(call), place)

    @staticmethod
    def _stream_of(queue: str, key: str | None) -> str:
        # The key is not validated as an enqueue's is: this acts on what Redis holds, whatever
        # name an older version gave it, and writes no new name.
        return stream_name(validate_queue_name(queue), key)

    def _removal(self, stream: str, task_id: str, done: Outcome, reply: Any, place: int | None) -> Removal:
        code = int(reply[0])
        if code == 1:
            entry = Entry.load(bytes(reply[1]))
            name = self._decoded(entry, shown=False)[0]
            verb = "deleted" if done == "deleted" else "moved to the dead letters (reason operator)"
            detail = f"task {task_id} ({name.name if name else 'undecodable'}) of {stream!r} {verb}"
            return Removal(task_id, stream, done, detail, name.name if name else None)
        if code == 2:
            index, handed, lease, running, started = int(reply[1]), int(reply[2]), *map(as_text, reply[3:6])
            state = flight_state(index, task_id, handed, lease, running, bool(started))
            return Removal(task_id, stream, "in_flight", _refusal(task_id, state, lease))
        detail = f"task {task_id} is not pending in {stream!r}: it ran, was removed, or was never enqueued there"
        if not int(reply[1]):
            around = f" and those around place {place:,}" if place is not None else ""
            detail += f" (only the first {STATUS_SCAN:,} pending tasks{around} were looked through)"
        return Removal(task_id, stream, "not_found", detail)

    # -- a task by its id, across a queue -----------------------------------------------------

    def find_task(self, queue: str, task_id: str) -> TaskSearch:
        """Task ``task_id`` of ``queue`` when its stream key is not known: its status in the
        unkeyed stream, else in the first other stream where it is found by a bounded look: the
        streams held now and those waiting longest (their in-flight tasks, stored results, dead
        letters and first ``FIND_DEPTH`` pending tasks, one read-only script call each, in one
        round trip), then the dead-letter id indexes of the queue's streams with dead letters (a
        bounded scan). Deeper in a keyed stream it is found only with its key, and ``searched``
        says so."""
        validate_queue_name(queue)
        check_task_id(task_id)
        own = self._status(queue, task_id)
        if own.state != "unknown":
            return TaskSearch(own, True)
        held = [s for s in held_streams(self.replicas()) if queue_of(s) == queue]
        _, lowest = self._lowest([queue], OVERVIEW_STREAMS)
        lively = [s for s in dict.fromkeys([*held, *lowest[queue]]) if s != queue]
        replies = self._host.call_many([self.ops.status(s, task_id, FIND_DEPTH) for s in lively])
        for stream, reply in zip(lively, replies, strict=True):
            if not isinstance(reply, Exception) and as_text(reply[0]) != "none":
                return TaskSearch(parse_status(stream, task_id, reply), True)
        dead = self.dead_streams_of(queue)
        resting = [s for s in dead.streams if s != queue and s not in set(lively)]
        pipe = self.client.pipeline(transaction=False)
        for stream in resting:
            pipe.hexists(self.keys.stream(stream).dead_ids, task_id)
        with self.translated():
            found = [s for s, hit in zip(resting, pipe.execute() if resting else [], strict=True) if hit]
        if found:
            return TaskSearch(self._status(found[0], task_id), True)
        scanned = "all of them" if dead.complete else f"a bounded scan of {dead.shards_scanned} of {dead.shards} shards"
        searched = (
            f"Not in the unkeyed stream {queue!r}, nor among the in-flight tasks, results, dead letters and "
            f"first {FIND_DEPTH} pending tasks of the {len(lively):,} stream(s) held now or waiting longest, "
            f"nor in the dead letters of the {len(dead.streams):,} stream(s) of {queue!r} with any ({scanned}). "
            "Deeper in a keyed stream a task is found only with its stream key: give it to look there."
        )
        return TaskSearch(own, False, searched)

    def _status(self, stream: str, task_id: str) -> TaskStatus:
        return parse_status(stream, task_id, self._host.operator_call(self.ops.status(stream, task_id)))


def _refusal(task_id: str, state: TaskPlace, lease: str) -> str:
    """Why a task in flight is not removed, and what the operator can do instead."""
    replica = holder_of(lease) or "its holder"
    if state == "running":
        return (
            f"refused: task {task_id} is running on {replica}; a running task is not removed from under "
            "its worker (skip the stream's head to dead-letter it and move on)"
        )
    if state == "taken":
        return (
            f"refused: task {task_id} was handed to {replica}, which took it ahead and runs it after its "
            "current task; it is not removed from under that worker (pause the stream: once its running "
            "task ends the holder hands back what it took ahead, and the task can be removed)"
        )
    return (
        f"refused: task {task_id} is in flight without a live holder: it was handed out before and may "
        "have run, and the next claim hands it over again first (skip the stream's head to dead-letter it)"
    )
