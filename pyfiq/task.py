"""The task record, its stored encoding, and the context a running task can read."""

from __future__ import annotations

import contextvars
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import DecodeError, SerializationError
from .serializers import Serializer

#: Version of the record inside the payload; a replica refuses records from the future.
FORMAT_VERSION = 1
ID_LENGTH = 32


def new_task_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Entry:
    """One stored task as the scripts see it: ``<id>|<enqueued ms>|<expires ms>|<payload>``."""

    raw: bytes
    id: str
    enqueued_ms: int
    expires_ms: int
    payload: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Entry:
        try:
            head, enq, exp, payload = raw.split(b"|", 3)
            return cls(raw, head.decode("ascii"), int(enq), int(exp), payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"malformed task entry {raw[:80]!r}") from exc


@dataclass(frozen=True)
class TaskRecord:
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    key: str | None = None

    def encode(self, serializer: Serializer) -> bytes:
        body: dict[str, Any] = {"v": FORMAT_VERSION, "name": self.name, "args": self.args}
        if self.kwargs:
            body["kwargs"] = self.kwargs
        if self.key is not None:
            body["key"] = self.key
        try:
            return serializer.dumps(body)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"cannot serialize the arguments of task {self.name!r} with {type(serializer).__name__}: {exc}"
            ) from exc

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
        return cls(body["name"], args, kwargs, body.get("key"))


def _from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)


@dataclass(frozen=True)
class TaskContext:
    """What a running task can know about itself (``pyfiq.current_task()``).

    ``id`` stays the same across retries and redeliveries: use it as an idempotency key for
    side effects. ``fencing_token`` rises with every new lease on the stream: a downstream
    system that remembers the highest token it has seen can refuse writes from a holder whose
    lease has lapsed.
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
