"""What running one task can come to (the outcomes a driver feeds back to ``StreamRun``), how a
taken task is prepared (decoded, checked, its function found), and dead-letter records.

Must not import redis or do any I/O, and reads no clock: ``prepare`` is given the driver's.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ..config import Settings
from ..errors import DecodeError
from ..task import Entry, TaskContext, TaskRecord
from .events import Clock
from .keys import queue_of
from .lease import Lease

#: Why this process dead-letters a task (Redis's scripts add ``poison`` and ``lease-lost``, and
#: stamp malformed or expired tasks they meet when handing out).
DeadLetterReason = Literal["exhausted", "undecodable", "expired", "unknown-task", "operator", "result-refused"]
_REASONS: dict[str, DeadLetterReason] = {reason: reason for reason in get_args(DeadLetterReason)}


@dataclass(frozen=True)
class Acked:
    """The task succeeded: acknowledge it. ``result``: for a ``store_result`` function, the
    encoded return value and how long Redis keeps it (ms), sent with the acknowledgement."""

    result: tuple[int, bytes] | None = None


@dataclass(frozen=True)
class ResultSpec:
    """How a ``store_result`` function's return values are kept: for ``ttl_ms``, encoded by
    ``serializer``, at most ``max_bytes`` each."""

    ttl_ms: int
    serializer: Any  # serializers.Serializer
    max_bytes: int


@dataclass(frozen=True)
class DeadLettered:
    """Dead-letter the head task with this record header. ``context``: the last attempt's, for
    a task that ran (hooks report it); None for one that never started."""

    header: str
    context: TaskContext | None = field(default=None, compare=False)

    @property
    def reason(self) -> DeadLetterReason | Literal["unknown"]:
        try:
            return _REASONS.get(str(json.loads(self.header).get("reason")), "unknown")
        except (ValueError, AttributeError):
            return "unknown"


@dataclass(frozen=True)
class Aborted:
    """The worker is stopping mid-retry, or an operator halted the stream before the task
    started (``ran`` False): the task stays in flight for the next holder."""

    ran: bool = True


@dataclass(frozen=True)
class Fenced:
    """The lease was lost: drop the result, change nothing. ``ran``: the task ran (at least
    partly) on this holder after or while its lease went, which the holder reports."""

    ran: bool = False


@dataclass(frozen=True)
class Deferred:
    """This replica cannot run the task (its function is not registered here, as during a
    rolling deploy): hand the stream over untouched so a replica that can run it takes it."""

    task_id: str
    #: The task's name, which this replica has no function for.
    name: str = ""


Outcome = Acked | DeadLettered | Aborted | Fenced | Deferred


def safe_text(value: object) -> str:
    """``str(value)``, or a fallback when that raises: whatever a task raises is hostile input,
    and the bookkeeping around it must survive it."""
    try:
        return str(value)
    except BaseException as exc:
        return f"<{type(value).__qualname__} object: str() raised {type(exc).__qualname__}>"


def safe_repr(value: object) -> str:
    try:
        return repr(value)
    except BaseException as exc:
        return f"<{type(value).__qualname__} object: repr() raised {type(exc).__qualname__}>"


def describe_error(error: BaseException) -> str:
    """``Type: message``, safely: how errors appear in logs and dead letters."""
    return f"{type(error).__qualname__}: {safe_text(error)}"


#: The most of a failure a dead letter stores: the start of its message, and the end of its
#: traceback (where the failure is). A record whose text was cut says how long it was
#: (``error_length``, ``traceback_length``), so a task raising megabytes stores kilobytes.
ERROR_LIMIT = 4_000
TRACEBACK_LIMIT = 16_000


def _head(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [truncated {len(text) - limit} characters]" + ("\n" if text.endswith("\n") else "")


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"[truncated {len(text) - limit} characters] ...{text[-limit:]}"


def _bounded_traceback(error: BaseException) -> tuple[str, int | None]:
    """The traceback to store, and the length of the whole when that was cut. Each part (a
    frame, a message) keeps at most its first ``ERROR_LIMIT`` characters, so a huge message
    cannot push the frames out of the end the whole keeps."""
    parts = traceback.format_exception(error)
    kept = "".join(_head(part, ERROR_LIMIT) for part in parts)
    cut = len(kept) > TRACEBACK_LIMIT or any(len(part) > ERROR_LIMIT for part in parts)
    return _tail(kept, TRACEBACK_LIMIT), sum(map(len, parts)) if cut else None


def dead_letter_header(
    reason: DeadLetterReason,
    *,
    replica: str,
    deliveries: int,
    attempts: int = 0,
    name: str | None = None,
    error: BaseException | None = None,
    at_ms: int | None = None,
) -> str:
    """The JSON header of a dead-letter record. ``at_ms``: when, by the caller's wall clock (the
    engine reads none); a header without it sorts first among a stream's dead letters."""
    header: dict[str, Any] = {"reason": reason, "deliveries": deliveries, "attempts": attempts}
    if at_ms is not None:
        header["at_ms"] = at_ms
    header["replica"] = replica
    if name is not None:
        header["name"] = name
    if error is not None:
        header["error_type"] = f"{type(error).__module__}.{type(error).__qualname__}"
        message = safe_text(error)
        header["error"] = _head(message, ERROR_LIMIT)
        if len(message) > ERROR_LIMIT:
            header["error_length"] = len(message)
        try:
            header["traceback"], length = _bounded_traceback(error)
        except BaseException:
            header["traceback"], length = "", None
        if length is not None:
            header["traceback_length"] = length
    # One line: the stored record is "<header>\n<entry>".
    return json.dumps(header, separators=(",", ":"), default=safe_text)


@dataclass(frozen=True)
class Prepared:
    """A task ready to run: its function and its context."""

    func: Any  # registry.FifoFunction; typed loosely to keep core free of the registry
    record: TaskRecord
    context: TaskContext
    #: Seconds an attempt may run before it is interrupted, and before it is reported as
    #: running long (the function's own, else the settings' default); None: never.
    time_limit: float | None = None
    time_warning: float | None = None
    #: Set for a function that stores its results (``@fifo(store_result=True)``).
    results: ResultSpec | None = None


def result_spec(func: Any, settings: Settings) -> ResultSpec | None:
    """How ``func``'s results are kept, or None when it keeps none."""
    # getattr: a task directory may hand the engine anything callable-like (test doubles).
    if not getattr(func, "store_result", False):
        return None
    return ResultSpec(int(func.result_ttl * 1000), settings.serializer, settings.result_max_bytes)


def time_limits(func: Any, settings: Settings) -> tuple[float | None, float | None]:
    """The time limit and warning in force for ``func``: its own, else the settings' defaults."""
    # getattr: a task directory may hand the engine anything callable-like (test doubles).
    limit, warning = getattr(func, "time_limit", None), getattr(func, "time_warning", None)
    return (
        settings.time_limit if limit is None else limit,
        settings.time_warning if warning is None else warning,
    )


def prepare(
    entry: Entry,
    deliveries: int,
    lease: Lease,
    lookup: Callable[[str], Any],
    settings: Settings,
    replica: str,
    *,
    clock: Clock,
    unknown_for: Callable[[str], float] = lambda task_id: float("inf"),
) -> Prepared | DeadLettered | Deferred:
    """Decode a taken task and find its function, or say why it must be dead-lettered.

    ``unknown_for(task_id)`` tells how long this replica has been meeting a task whose
    function it lacks; within ``settings.unknown_task_grace`` the task is deferred to other
    replicas (a rolling deploy may not have reached this one), after it dead-lettered.
    A task whose deadline has passed by Redis's clock (estimated from the last reply) is
    dead-lettered as expired, however long it waited in this holder's buffer.
    """

    def refused(reason: DeadLetterReason, error: BaseException, name: str | None = None) -> DeadLettered:
        header = dead_letter_header(
            reason, replica=replica, deliveries=deliveries, name=name, error=error, at_ms=clock.wall_ms()
        )
        return DeadLettered(header)

    if entry.malformed:
        return refused("undecodable", DecodeError(f"malformed task entry {entry.raw[:80]!r}"))
    try:
        record = TaskRecord.decode(entry.payload, settings.serializer)
    except DecodeError as exc:
        return refused("undecodable", exc)
    if entry.expires_ms and entry.expires_ms <= lease.redis_now_ms(clock.monotonic()):
        late = f"the task's deadline passed before it could start (expires_ms={entry.expires_ms})"
        return refused("expired", TimeoutError(late), record.name)
    func = lookup(record.name)
    if func is None and unknown_for(entry.id) < settings.unknown_task_grace:
        return Deferred(entry.id, record.name)
    if func is None:
        unknown = f"no replica ran a @fifo function named {record.name!r} within {settings.unknown_task_grace}s"
        return refused("unknown-task", LookupError(unknown), record.name)
    context = TaskContext(
        id=entry.id,
        name=record.name,
        queue=queue_of(lease.stream),
        stream=lease.stream,
        key=record.key,
        attempt=1,
        deliveries=deliveries,
        fencing_token=lease.fence,
        enqueued_ms=entry.enqueued_ms,
        expires_ms=entry.expires_ms,
        replica=replica,
        headers=record.headers or {},
    )
    return Prepared(func, record, context, *time_limits(func, settings), result_spec(func, settings))
