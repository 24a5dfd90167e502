"""Enqueues held back for later, and ``send``: the one loop that sends encoded tasks in batches.

A ``Deferrer`` installed on a registry (``Registry.deferrer``) is asked at every enqueue whether
it takes the call's tasks to send later. The call is checked and encoded first (a bad argument
still raises at the call, and nothing is held), so every task has its id, and the caller its
handle, before anything is sent. The Django integration installs one that holds a call made
inside a database transaction until the transaction commits (``pyfiq.contrib.django``); any
integration can do the same, and sends what it held with ``send``.

``send`` is also the sending half of ``enqueue_many``: tasks grouped by backend and stream,
each stream's in the order given, one round trip per ``ENQUEUE_CHUNK`` tasks, stopping at the
first round trip that fails, so that no stream gets a later task without an earlier one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from . import hooks
from .errors import AccessDeniedError, BackendUnavailableError, ConfigurationError, PartialEnqueueError, PyfiqError
from .task import EncodedTask, TaskHandle

__all__ = ["ENQUEUE_CHUNK", "Deferrer", "Pending", "send"]

#: Tasks per enqueue script call: keeps each call short for Redis.
ENQUEUE_CHUNK = 500

#: What a ``PartialEnqueueError`` advises when re-sending everything could store a task twice.
RESEND_UNSENT = (
    "re-send only the unsent calls, each stream's after its unknown ones that handle.status() does not find stored"
)
#: Error replies of a call Redis refused before running it: nothing of it was stored.
_REFUSALS = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.NoPermissionError,
    AccessDeniedError,
    ConfigurationError,  # the shard layout check, before the script writes anything
)


@dataclass(frozen=True)
class Pending:
    """One task, checked and encoded, not sent yet: the handle its call returned (its id, queue,
    stream, name and backend), the task as the enqueue script takes it, and its dedup key."""

    handle: TaskHandle[Any]
    task: EncodedTask
    dedup_key: str | None = None


class Deferrer(Protocol):
    """What ``Registry.deferrer`` holds: asked at each enqueue of the registry's functions
    (``send_with_options``, its asyncio twin, ``enqueue_many``; not in ``eager()`` mode, and
    not for a call made with ``on_commit=False``)."""

    def defer(self, tasks: Sequence[Pending]) -> bool:
        """Take ``tasks`` (one call's, or one ``enqueue_many``'s, in call order) to send later,
        with ``send``: True. False: the caller sends them now, as if there were no deferrer.
        It runs in the caller's thread (or event loop: it must not block)."""
        ...


def send(tasks: Sequence[Pending], *, what: str = "enqueue_many", advice: str = RESEND_UNSENT) -> list[TaskHandle[Any]]:
    """Send ``tasks`` in as few round trips as the enqueue script allows and return their
    handles in order (``duplicate`` where a dedup key found the task stored already, with the
    stored task's id). Each round trip is atomic, the whole is not: when one fails, sending
    stops and ``PartialEnqueueError`` says, by index into ``tasks``, which Redis confirmed,
    which were sent without a reply, and which were never sent; its message starts with
    ``what`` and ends with ``advice``."""
    handles = [p.handle for p in tasks]
    accepted: list[int] = []
    for chunk in _round_trips(tasks):
        first = tasks[chunk[0]].handle
        items = [tasks[i].task for i in chunk]
        dedup = None if tasks[chunk[0]].dedup_key is None else [str(tasks[i].dedup_key) for i in chunk]
        try:
            reply = first.backend.enqueuer.enqueue(first.stream, items, dedup)
        except (PyfiqError, redis.RedisError) as exc:
            # Without dedup keys a call is never sent twice, so a refusal is the only answer the
            # chunk got: it is certainly not stored, and re-sending it keeps its stream whole.
            # Redis unreachable through every try stored nothing either, dedup keys or not (a
            # try that may have run ends in EnqueueOutcomeUnknown, a subclass, instead).
            refused = type(exc) is BackendUnavailableError or (dedup is None and _refused(exc))
            if refused and not accepted and not isinstance(exc, BackendUnavailableError):
                raise  # nothing stored at all: the refusal as it is (a password, an ACL, a layout)
            raise partial_error(exc, handles, accepted, [] if refused else chunk, what, advice) from exc
        for i, (task_id, new) in zip(chunk, reply, strict=True):
            if not new:
                was = handles[i]
                handles[i] = TaskHandle(task_id, was.queue, was.stream, was.name, duplicate=True, backend=was.backend)
        accepted.extend(chunk)
        if stored := sum(new for _, new in reply):
            hooks.dispatcher.on_enqueue(first.queue, stored)
    return handles


def _refused(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it wraps) is Redis refusing the call before running it."""
    while exc is not None:
        if isinstance(exc, _REFUSALS):
            return True
        exc = exc.__cause__
    return False


def _round_trips(tasks: Sequence[Pending]) -> Iterator[list[int]]:
    """Indexes into ``tasks``, one list per script call: by backend and stream (each stream's in
    the order given), cut every ``ENQUEUE_CHUNK`` tasks and where dedup keys start or stop (a
    call carries one for every task or none)."""
    # By the Redis and prefix a backend names, not the object: two backends of one deployment
    # (one made per request, say) send one stream's tasks in the order given all the same.
    streams: dict[tuple[str, str, str], list[int]] = {}
    for i, pending in enumerate(tasks):
        backend = pending.handle.backend
        where = (str(backend.url), backend.keys.prefix) if backend is not None else ("", "")
        key = (*where, pending.handle.stream)
        streams.setdefault(key, []).append(i)
    for indexes in streams.values():
        run: list[int] = []
        for i in indexes:
            switch = run and (tasks[run[0]].dedup_key is None) != (tasks[i].dedup_key is None)
            if run and (switch or len(run) == ENQUEUE_CHUNK):
                yield run
                run = []
            run.append(i)
        if run:
            yield run


def partial_error(
    exc: Exception,
    handles: list[TaskHandle[Any]],
    accepted: list[int],
    failed: list[int],
    what: str = "enqueue_many",
    advice: str = RESEND_UNSENT,
) -> PartialEnqueueError:
    """The ``PartialEnqueueError`` of a send that stopped at the round trip of ``failed``."""
    done = set(accepted) | set(failed)
    unsent = [i for i in range(len(handles)) if i not in done]
    return PartialEnqueueError(
        f"{what} stopped: Redis confirmed {len(accepted)} of {len(handles)} calls, "
        f"{len(failed)} were sent without a reply (maybe stored), {len(unsent)} were not sent; "
        f"{advice}. Cause: {exc}",
        handles,
        sorted(accepted),
        sorted(failed),
        unsent,
    )
