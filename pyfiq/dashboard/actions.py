"""The operators' actions the dashboard offers, read from a submitted form: what each will do
(said on the confirmation page, with the counts as they are now) and carrying it out through
the backend's own operator methods, the ones the CLI uses.

Pause and resume take effect at once; skip, requeue, purge, and the delete or dead-letter of
one pending task change what runs or delete records, so they ask first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..backend.backend import RedisQueueBackend
from ..backend.work import check_task_id
from ..engine.keys import STREAM_SEPARATOR, queue_of, validate_key, validate_queue_name
from ..task import Entry, TaskRecord

NAMES = ("pause", "resume", "skip", "requeue", "purge", "delete", "dead-letter")
#: Actions on one pending task (``Action.task_id``), from a stream's tasks page.
TASK_ACTIONS = ("delete", "dead-letter")
#: Error recorded with a pending task moved to the dead letters from the dashboard.
MOVE_REASON = "moved to the dead letters from the dashboard"
_PLACE = re.compile(r"[0-9]{1,15}")
#: Reason recorded with a head task skipped from the dashboard.
SKIP_REASON = "skipped from the dashboard"


@dataclass(frozen=True)
class Action:
    """One submitted action. ``stream`` narrows it to one stream of ``queue``; ``scope`` is
    ``one`` / ``selected`` (the ``tasks``, as (stream, task id)) / ``all`` for a requeue."""

    name: str
    queue: str
    stream: str | None = None
    scope: str = "all"
    front: bool = False
    tasks: list[tuple[str, str]] = field(default_factory=list)
    #: The pending task of a task action, and its place in the pending list when the page showed it.
    task_id: str | None = None
    place: int | None = None

    @property
    def confirm(self) -> bool:
        return self.name not in ("pause", "resume")

    @property
    def target(self) -> str:
        return self.stream or self.queue


def parse(name: str, form: Sequence[tuple[str, str]]) -> Action:
    """The action a form asks for; ``ValueError`` (with a message for the operator) otherwise."""
    if name not in NAMES:
        raise ValueError(f"unknown action {name!r}")
    values = dict(form)
    queue = validate_queue_name(values.get("queue", ""))
    stream = values.get("stream") or None
    if stream is not None and queue_of(stream) != queue:
        raise ValueError(f"stream {stream!r} is not a stream of {queue!r}")
    if stream is not None and name in ("pause", "resume") and STREAM_SEPARATOR in stream:
        # These write the name into Redis: only a name an enqueue could make (skip and
        # requeue act on streams Redis already holds, whatever their names).
        validate_key(stream.partition(STREAM_SEPARATOR)[2])
    if name in ("skip", *TASK_ACTIONS) and stream is None:
        stream = queue
    if name in TASK_ACTIONS:
        place = values.get("place", "")
        return Action(
            name,
            queue,
            stream,
            task_id=check_task_id(values.get("id", "").strip().lower()),
            place=int(place) if _PLACE.fullmatch(place) else None,
        )
    op = values.get("op", "all-back")
    scope, _, rest = op.partition("-")
    where, _, one = rest.partition(":")
    if scope not in ("one", "selected", "all") or where not in ("front", "back"):
        raise ValueError(f"unknown requeue {op!r}")
    picked = [v for k, v in form if k == "task"] if scope == "selected" else [one] if scope == "one" else []
    tasks = [_task(v, queue) for v in picked]
    if name == "requeue" and scope != "all" and not tasks:
        raise ValueError("no dead letter was selected")
    return Action(name, queue, stream, scope, where == "front", tasks)


def _task(value: str, queue: str) -> tuple[str, str]:
    task_id, _, stream = value.partition(":")
    if not task_id or queue_of(stream) != queue:
        raise ValueError(f"not a dead letter of {queue!r}: {value!r}")
    return stream, task_id


def _streams(backend: RedisQueueBackend, action: Action) -> list[str]:
    """The streams with dead letters an action on every dead letter covers (all of them: an
    action, unlike a page, goes through the whole dead-letter index)."""
    if action.stream is not None:
        return [action.stream]
    return backend.admin.dead_streams_of(action.queue, budget=10**12).streams


def _dead_count(backend: RedisQueueBackend, streams: list[str]) -> int:
    return sum(backend.queue_info(s)["dead"] for s in streams)


def describe(backend: RedisQueueBackend, action: Action) -> str:
    """What carrying out ``action`` will do, counted as Redis holds it now."""
    if action.name in ("pause", "resume"):
        return f"{action.name.capitalize()} {action.target} across the fleet."
    if action.name == "skip":
        head = backend.admin.read_streams([action.target])[0].head
        if head is None:
            return f"{action.target} holds no task: there is nothing to skip."
        return (
            f"Dead-letter the head task {head.id} ({head.name or 'undecodable'}) of {action.target} as "
            "'operator'. Its lease is revoked, which ends its holder's retries, and the stream moves on "
            "to its next task."
        )
    if action.task_id is not None:
        return _describe_task(backend, action, action.task_id)
    where = "front of its stream, before the pending tasks" if action.front else "back of its stream"
    if action.name == "requeue" and action.scope != "all":
        n = len(action.tasks)
        return f"Requeue {n} dead letter{'s' * (n != 1)} of {action.queue} to the {where}, in their order."
    streams = _streams(backend, action)
    total = _dead_count(backend, streams)
    spread = f"{total} dead letters of {action.target} ({len(streams)} stream{'s' * (len(streams) != 1)})"
    if action.name == "purge":
        return f"Delete all {spread}. This cannot be undone."
    return f"Requeue all {spread} to the {where}, in their order."


def _describe_task(backend: RedisQueueBackend, action: Action, task_id: str) -> str:
    status = backend.task_status(action.target, task_id)
    name = ""
    if action.place is not None:  # the entry where the page showed it, for its name
        raw = backend.client.lindex(backend.keys.stream(action.target).pending, action.place)
        entry = Entry.load(raw) if raw is not None else None
        if entry is not None and entry.id == task_id and not entry.malformed:
            try:
                name = f" ({TaskRecord.decode(entry.payload, backend.settings.serializer).name})"
            except ValueError:
                name = " (undecodable)"
    if action.name == "delete":
        what = f"Delete task {task_id}{name} of {action.target}: it will never run, and no record of it is kept."
    else:
        what = (
            f"Move task {task_id}{name} of {action.target} to its dead letters (reason operator): it will not "
            "run unless it is requeued."
        )
    now = f" Now: {status.detail}."
    if status.state != "pending":
        now += " Only a pending task a worker has not been handed can be removed: this will be refused."
    return what + " The tasks behind it keep their order." + now


def run(backend: RedisQueueBackend, action: Action) -> str:
    """Carry ``action`` out; returns what was done, for the page that follows."""
    if action.name in ("pause", "resume"):
        key = action.stream.partition(STREAM_SEPARATOR)[2] if action.stream else None
        if action.name == "pause":
            # Returns once every holder has confirmed it starts nothing more: say who did.
            return backend.pause(action.queue, key).describe()
        backend.resume(action.queue, key)
        return f"resumed {action.target}"
    if action.name == "skip":
        task_id = backend.skip(action.target, SKIP_REASON)
        return f"dead-lettered {task_id} as operator" if task_id else f"{action.target} held no task"
    if action.task_id is not None:
        key = action.target.partition(STREAM_SEPARATOR)[2] if STREAM_SEPARATOR in action.target else None
        if action.name == "delete":
            return backend.admin.delete_task(action.queue, action.task_id, key, place=action.place).detail
        removal = backend.admin.dead_letter_task(
            action.queue, action.task_id, key, reason=MOVE_REASON, place=action.place
        )
        return removal.detail
    if action.name == "purge":
        return f"deleted {sum(backend.purge_dead_letters(s) for s in _streams(backend, action))} dead letters"
    if action.scope == "all":
        moved = sum(backend.requeue_dead_letters(s, front=action.front) for s in _streams(backend, action))
    else:
        # To the front one by one: the last requeued ends up first, so go newest first.
        order = reversed(action.tasks) if action.front else iter(action.tasks)
        moved = sum(backend.requeue_dead_letters(s, task_id=t, front=action.front) for s, t in order)
    return f"requeued {moved} dead letter{'s' * (moved != 1)} to the {'front' if action.front else 'back'}"
