"""The task record, its stored encoding, the value types enqueue and the operator tools hand
out (``EncodedTask``, ``TaskHandle``, ``DeadLetter``), and the context a running task can read."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import math
import os
import re
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, NamedTuple, TypeVar

from .config import validate_seconds
from .errors import ConfigurationError, DecodeError, PayloadTooLargeError, SerializationError
from .serializers import Serializer

#: What a task's function returns: ``TaskHandle[R].result()`` gives it back.
R = TypeVar("R")

#: Version of the record inside the payload; a replica refuses records from the future.
FORMAT_VERSION = 1
ID_LENGTH = 32
#: Most digits a time field of an entry may have (ms since 1970 has 13 until the year 2286).
TIME_DIGITS = 15


def new_task_id() -> str:
    # 128 random bits as 32 hex digits, the form the scripts check; cheaper than uuid4().hex.
    return os.urandom(16).hex()


def new_task_ids(n: int) -> list[str]:
    """``n`` ids from one read of the random source: for a batch, the read per id costs more
    than the rest of making it."""
    digits = os.urandom(16 * n).hex()
    return [digits[i : i + ID_LENGTH] for i in range(0, n * ID_LENGTH, ID_LENGTH)]


#: Exactly what ``parse_entry`` in lua/lib.lua accepts: the scripts and Python must agree, or an
#: entry the scripts hand out could fail here, where it is too late to dead-letter it cheaply.
_ENTRY = re.compile(rb"([0-9a-f]{%d})\|([0-9]{1,%d})\|([0-9]{1,%d})\|" % (ID_LENGTH, TIME_DIGITS, TIME_DIGITS))


@dataclass(frozen=True)
class Entry:
    """One stored task as the scripts see it: ``<id>|<enqueued ms>|<expires ms>|<payload>``.

    ``malformed`` marks raw bytes that are not such an entry (see ``load``)."""

    raw: bytes
    id: str
    enqueued_ms: int
    expires_ms: int
    payload: bytes
    malformed: bool = False

    @classmethod
    def parse(cls, raw: bytes) -> Entry:
        m = _ENTRY.match(raw)
        if m is None:
            raise DecodeError(f"malformed task entry {raw[:80]!r}")
        return cls(raw, m.group(1).decode("ascii"), int(m.group(2)), int(m.group(3)), raw[m.end() :])

    @classmethod
    def load(cls, raw: bytes) -> Entry:
        """``parse``, or for bytes that are not an entry, one marked ``malformed`` whose id is
        what the scripts take as one (the first 32 bytes), so it can still be dead-lettered."""
        try:
            return cls.parse(raw)
        except DecodeError:
            return cls(raw, raw[:ID_LENGTH].decode("latin-1"), 0, 0, raw, malformed=True)


@dataclass(frozen=True)
class TaskRecord:
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    key: str | None = None
    #: What the enqueuing code's ``before_enqueue`` hooks attached (a trace context, say);
    #: older replicas ignore it, so it needs no new format version.
    headers: dict[str, str] | None = None

    def encode(self, serializer: Serializer) -> bytes:
        return encode_record(serializer, self.name, self.args, self.kwargs, self.key, self.headers)

    @classmethod
    def decode(cls, payload: bytes, serializer: Serializer) -> TaskRecord:
        try:
            body = serializer.loads(payload)
        except Exception as exc:
            raise DecodeError(f"{type(serializer).__name__} cannot decode the payload: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise DecodeError("payload is not a pyfiq task record")
        version = body.get("v")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise DecodeError(f"task record format {version!r} is newer than this replica's")
        args, kwargs = body.get("args", []), body.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise DecodeError("task record has malformed args/kwargs")
        headers = body.get("h")
        if headers is not None and not (
            isinstance(headers, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        ):
            raise DecodeError("task record has malformed headers")
        return cls(body["name"], args, kwargs, body.get("key"), headers)


def encode_record(
    serializer: Serializer,
    name: str,
    args: list[Any],
    kwargs: dict[str, Any],
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A ``TaskRecord``'s payload, for callers that encode many without making the records."""
    body: dict[str, Any] = {"v": FORMAT_VERSION, "name": name, "args": args}
    if kwargs:
        body["kwargs"] = kwargs
    if key is not None:
        body["key"] = key
    if headers:
        body["h"] = headers
    try:
        return serializer.dumps(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(
            f"cannot serialize the arguments of task {name!r} with {type(serializer).__name__}: {exc}"
        ) from exc


class EncodedTask(NamedTuple):
    """A task ready for the enqueue script: its id, how long it may wait before it expires (ms,
    0 for never), when it joins its stream (``due_spec``) and its encoded record."""

    id: str
    expires_in_ms: int
    when: str
    payload: bytes


#: ``EncodedTask.when`` of a task that joins its stream at once.
NOW = "0"


def due_spec(delay: float | dt.timedelta | None = None, eta: dt.datetime | None = None) -> str:
    """When a task joins its stream, as the enqueue script takes it: ``NOW``, ``"+<ms>"`` after
    the enqueue by Redis's clock, or ``"=<ms>"`` at that time of Redis's clock (ms since the
    epoch), so a replica's own clock never decides. ``delay``: seconds or a ``timedelta``;
    ``eta``: an aware ``datetime`` (a naive one is refused: whose local time would it be?)."""
    if delay is not None and eta is not None:
        raise ConfigurationError("give delay= or eta=, not both; nothing was enqueued")
    if eta is not None:
        if not isinstance(eta, dt.datetime):
            raise ConfigurationError(f"eta must be a datetime, got {type(eta).__name__}; nothing was enqueued")
        if eta.tzinfo is None or eta.utcoffset() is None:
            raise ConfigurationError(
                f"eta={eta!r} has no time zone: give an aware datetime (e.g. tzinfo=datetime.timezone.utc); "
                "nothing was enqueued"
            )
        return f"={math.ceil(eta.timestamp() * 1000)}"
    if delay is None:
        return NOW
    seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else delay
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(
            f"delay must be a non-negative number of seconds or a timedelta, got {delay!r}; nothing was enqueued"
        )
    ms = math.ceil(seconds * 1000)
    return f"+{ms}" if ms > 0 else NOW


def delay_of(when: str) -> float:
    """Seconds from now until ``when`` (a ``due_spec``), by this process's clock: only to check
    an enqueue's options against each other before anything is sent."""
    if when.startswith("+"):
        return int(when[1:]) / 1000
    if when.startswith("="):
        return int(when[1:]) / 1000 - dt.datetime.now(dt.timezone.utc).timestamp()
    return 0.0


def expires_in_ms(expires_in: float | None) -> int:
    """An enqueue's ``expires_in`` as the scripts take it: ms, 0 for never. Rounded up, so any
    positive value is at least the 1 ms Redis can express."""
    if expires_in is not None:
        validate_seconds("expires_in", expires_in)
    return math.ceil(expires_in * 1000) if expires_in else 0


def encode_tasks(
    records: Sequence[tuple[str, TaskRecord]],
    serializer: Serializer,
    expires_in: float | None = None,
    when: str = NOW,
    max_bytes: int | None = None,
) -> list[EncodedTask]:
    """``(task id, record)`` pairs encoded for enqueue, all before any I/O: a task whose
    arguments cannot be serialized fails at once, and nothing of the batch is sent. ``when``:
    a ``due_spec`` for every task; an ``expires_in`` that ends before it is refused; a task
    larger than ``max_bytes`` encoded is refused with ``PayloadTooLargeError``."""
    ttl_ms = expires_in_ms(expires_in)
    if ttl_ms and when != NOW and ttl_ms / 1000 <= delay_of(when):
        raise ConfigurationError(
            f"expires_in={expires_in} s ends before the task is due ({delay_of(when):.3f} s from now): it could "
            "never run; nothing was enqueued"
        )
    tasks = [EncodedTask(task_id, ttl_ms, when, rec.encode(serializer)) for task_id, rec in records]
    for task, (_, rec) in zip(tasks, records, strict=True):
        check_payload(rec.name, task.payload, max_bytes)
    return tasks


def check_payload(name: str, payload: bytes, max_bytes: int | None) -> None:
    """Refuse a task whose encoded record is larger than ``max_bytes`` (None: no limit)."""
    if max_bytes is not None and len(payload) > max_bytes:
        raise PayloadTooLargeError(
            f"task {name}: its encoded arguments are {len(payload):,} bytes, over max_payload_bytes "
            f"({max_bytes:,}); nothing was enqueued (pass a reference to the data, or raise "
            "Settings.max_payload_bytes)"
        )


#: Where a task is, as ``TaskHandle.status()`` tells it.
#:
#: - ``scheduled``: delayed, not in its stream yet: it joins it at ``due`` (Redis's clock);
#: - ``pending``: waiting in its stream (``place``: how many of the stream's tasks are ahead);
#: - ``taken``: handed to a holder (``replica``) that runs an earlier task first (taken ahead),
#:   or has just ended it and is acknowledging it;
#: - ``running``: its holder runs it (``replica``, ``since``, ``deliveries``), a retry in place
#:   included; a holder names the task it runs at each heartbeat, so a task that started since
#:   the last one shows as ``taken`` for up to a heartbeat interval;
#: - ``dead_lettered``, ``expired``, ``skipped`` (by an operator): in its stream's dead letters,
#:   with ``reason``, ``error_type`` and ``error``;
#: - ``unknown``: in none of these. It finished (pyfiq keeps no record of a task that succeeded)
#:   or was never enqueued on this stream; ``detail`` says which of these is possible.
TaskState = Literal[
    "scheduled",
    "pending",
    "taken",
    "running",
    "retrying",
    "succeeded",
    "dead_lettered",
    "expired",
    "skipped",
    "unknown",
]


@dataclass(frozen=True)
class TaskStatus:
    """A task's state as Redis holds it at one moment, read in one round trip:
    ``handle.status()``. ``state`` is a ``pyfiq.task.TaskState``: ``scheduled`` (delayed until
    ``due``), ``pending`` (with ``place``),
    ``taken`` (handed to ``replica`` ahead of its turn), ``running`` (on ``replica`` since
    ``since``, delivery ``deliveries``, ``attempt`` when past the first), ``retrying`` (its
    ``attempt`` failed; the next starts at ``next_attempt``), ``succeeded`` (its result is stored: only a
    ``store_result`` function's task says so), ``dead_lettered`` / ``expired`` / ``skipped`` (with
    ``reason``, ``error_type``, ``error``, ``traceback``), or ``unknown``; ``detail`` says it in a
    sentence. ``unknown`` with ``searched_all`` false: the task may still wait, deeper in a long
    stream than a status read looks."""

    id: str
    stream: str
    state: TaskState
    detail: str
    place: int | None = None
    replica: str | None = None
    since: dt.datetime | None = None
    deliveries: int | None = None
    attempt: int | None = None
    next_attempt: dt.datetime | None = None
    reason: str | None = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = field(default=None, repr=False)
    #: The stored result as encoded (``succeeded``); ``handle.result()`` decodes it.
    encoded_result: bytes | None = field(default=None, repr=False)
    searched_all: bool = True
    #: When a ``scheduled`` task joins its stream.
    due: dt.datetime | None = None


@dataclass(frozen=True)
class TaskHandle(Generic[R]):
    """What enqueuing returns, or ``FifoFunction.handle(task_id)`` rebuilds in another process.
    ``duplicate`` is true when a dedup key matched an earlier task, whose id is then ``id``.
    ``backend``: where it asks about its task (by default the backend its function enqueues to)."""

    id: str
    queue: str
    stream: str
    name: str
    duplicate: bool = False
    backend: Any = field(default=None, repr=False, compare=False)

    def __await__(self) -> Generator[Any, None, TaskHandle[R]]:
        """``await fn(...)`` gives the handle whatever ``fn`` is: calling a plain ``def`` task
        enqueues at once and returns this handle, and awaiting it must not raise after the task
        was stored (a caller that retried would store it twice). ``fn.aenqueue`` does not block
        the loop for the enqueue's round trip."""
        yield from ()  # a generator that finishes at once, with the handle as its value
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        """A handle sent to another process (a pickled error, a job handed on) carries its task,
        not its backend: connections and pools do not cross processes, and the receiving side
        asks through its own default backend, or ``fn.handle(task_id)`` there."""
        return (TaskHandle, (self.id, self.queue, self.stream, self.name, self.duplicate))

    def status(self) -> TaskStatus:
        """Where the task is now, in one round trip (see ``TaskState``)."""
        return self._backend().task_status(self.stream, self.id)  # type: ignore[no-any-return]

    async def astatus(self) -> TaskStatus:
        """``status()`` for asyncio code."""
        return await self._backend().atask_status(self.stream, self.id)  # type: ignore[no-any-return]

    def result(self, timeout: float | None = None) -> R:
        """Wait for the task to end and return what its function returned (``@fifo(...,
        store_result=True)``), from any process. The wait blocks on the task's own channel,
        which the script that acknowledges or dead-letters the task announces on, so it costs
        Redis one status read per announcement, not a poll.

        Raises ``TimeoutError`` after ``timeout`` seconds (None: no limit), leaving the task
        alone; ``TaskFailed`` when it was dead-lettered (``TaskExpired``, ``TaskSkipped`` when it
        expired or an operator skipped it), with the error it raised; ``ResultUnavailable``
        when Redis holds neither the task nor a result; ``ConfigurationError`` at once when its
        function is known here and stores no result. A task run again after a crash stores the
        result of its last run."""
        from .backend.results import settle, wait_result  # late: the backend imports this module

        backend = self._backend()
        self._check_stores()
        return settle(wait_result(backend, self.stream, self.id, timeout), backend.settings.serializer)  # type: ignore[no-any-return]

    async def aresult(self, timeout: float | None = None) -> R:
        """``result()`` for asyncio code: the wait does not block the event loop."""
        from .backend.results import await_result, settle

        backend = self._backend()
        self._check_stores()
        return settle(await await_result(backend, self.stream, self.id, timeout), backend.settings.serializer)  # type: ignore[no-any-return]

    def _check_stores(self) -> None:
        from .errors import ConfigurationError
        from .functions import default_registry

        fn = default_registry.lookup(self.name)
        if fn is not None and not fn.store_result:
            raise ConfigurationError(
                f"{self.name} does not store its results: declare it with @fifo(..., store_result=True) "
                "to wait for what it returns, or ask handle.status() how it went"
            )

    def _backend(self) -> Any:
        if self.backend is not None:
            return self.backend
        from .functions import get_backend  # the default registry's: a late import, no cycle

        return get_backend()


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter record: why, when, where, and the task itself."""

    stream: str
    reason: str
    header: dict[str, Any]
    entry: Entry | None
    record: TaskRecord | None
    raw: bytes

    @property
    def task_id(self) -> str | None:
        return self.entry.id if self.entry else None

    @classmethod
    def load(cls, stream: str, raw: bytes, serializer: Serializer) -> DeadLetter:
        """A record as stored (a JSON header line, then the task's entry), whatever its state:
        an unreadable header or task is kept as far as it can be read, never raised."""
        head, _, body = raw.partition(b"\n")
        try:
            loaded: Any = json.loads(head)
        except ValueError:
            loaded = None
        header: dict[str, Any] = (
            loaded
            if isinstance(loaded, dict)
            else {"reason": "unknown", "error": f"unreadable dead-letter header {head[:80]!r}"}
        )
        entry = record = None
        try:
            entry = Entry.parse(body)
            record = TaskRecord.decode(entry.payload, serializer)
        except DecodeError:
            pass
        return cls(stream, str(header.get("reason")), header, entry, record, raw)


def _from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)


@dataclass(frozen=True)
class TaskContext:
    """What a running task can know about itself (``pyfiq.current_task()``).

    ``id`` stays the same across retries and redeliveries: use it as an idempotency key for
    side effects. ``fencing_token`` rises with every new lease on the stream: a downstream
    system that remembers the highest token it has seen can refuse writes from a holder whose
    lease has lapsed. ``headers`` are what the enqueuing code's hooks attached to the task
    (``pyfiq.tracing`` puts the enqueuer's trace context there).
    """

    id: str
    name: str
    queue: str
    stream: str
    key: str | None
    attempt: int
    deliveries: int
    fencing_token: int
    enqueued_ms: int
    expires_ms: int
    replica: str
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def enqueued_at(self) -> dt.datetime:
        return _from_ms(self.enqueued_ms)

    @property
    def expires_at(self) -> dt.datetime | None:
        return _from_ms(self.expires_ms) if self.expires_ms else None


_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("pyfiq_current_task")


def current_task() -> TaskContext:
    """The context of the task running in this thread (or asyncio task)."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("pyfiq.current_task() was called outside a running pyfiq task") from None


def set_current(ctx: TaskContext) -> contextvars.Token[TaskContext]:
    return _current.set(ctx)


def reset_current(token: contextvars.Token[TaskContext]) -> None:
    _current.reset(token)
