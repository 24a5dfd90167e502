"""Every error pyfiq raises derives from `PyfiqError`, except `TimeLimitExceeded`,
which interrupts a running task and so must not be caught by the task's ``except Exception``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .task import TaskHandle


class PyfiqError(Exception):
    """Base class of pyfiq's errors."""


class ConfigurationError(PyfiqError, ValueError):
    """A setting, a queue name or a decorator argument is invalid."""


class NotConfiguredError(PyfiqError, RuntimeError):
    """A task was enqueued before any backend was configured in this process."""


class SerializationError(PyfiqError, TypeError):
    """A task's arguments cannot be encoded by the configured serializer."""


class DecodeError(PyfiqError, ValueError):
    """A stored task cannot be decoded (corrupt, or written by an incompatible serializer)."""


class AccessDeniedError(PyfiqError, PermissionError):
    """Redis refused pyfiq's credentials (WRONGPASS, NOAUTH) or one of its commands or keys
    (NOPERM). Never retried: waiting does not fix a password or an ACL."""


class BackendUnavailableError(PyfiqError, ConnectionError):
    """Redis could not be reached within the enqueue retry budget. Nothing was enqueued
    unless Redis accepted the task before the connection failed (enqueue is at-least-once)."""


class NotReplicatedError(BackendUnavailableError):
    """Durable mode (``Settings.min_replicas``): Redis applied the change, but fewer replicas
    than asked confirmed it within ``replica_timeout``. For an enqueue the task IS stored on the
    primary and will run unless a failover loses it; it is not re-sent (that could store it
    twice). ``task_ids`` names the tasks, ``replicas`` how many replicas confirmed, ``wanted``
    how many were asked for."""

    def __init__(self, message: str, task_ids: Sequence[str] = (), replicas: int = 0, wanted: int = 0) -> None:
        super().__init__(message)
        self.task_ids = list(task_ids)
        self.replicas = replicas
        self.wanted = wanted

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.task_ids, self.replicas, self.wanted)


class EnqueueOutcomeUnknown(BackendUnavailableError):
    """An enqueue's request was written to Redis (or may have been), but no reply came back: a
    timeout or a lost connection after the write, or a shared round trip whose reading was cut
    short. The tasks MAY be stored, each at most once: pyfiq did not send them again, which
    could store them twice. ``task_ids`` names them. A task with a ``dedup_key`` is sent again
    instead, which is safe, as long as ``enqueue_timeout`` leaves time for it."""

    def __init__(self, message: str, task_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.task_ids = list(task_ids)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.task_ids)


class TaskFailed(PyfiqError):
    """``handle.result()``: the task will not return a value, because it was dead-lettered.
    ``reason`` is the dead letter's (``exhausted``, ``poison``, ``result-refused``...), and
    ``error_type``, ``error`` and ``traceback`` are the text of what the task last raised, as the
    dead letter keeps it (None when nothing was raised, e.g. a poison task). Requeuing the dead
    letter runs the task again; a later ``result()`` then waits for that run."""

    def __init__(
        self,
        message: str,
        task_id: str = "",
        reason: str = "",
        error_type: str | None = None,
        error: str | None = None,
        traceback: str | None = None,
    ) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.reason = reason
        self.error_type = error_type
        self.error = error
        self.traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.task_id, self.reason, self.error_type, self.error, self.traceback)


class TaskExpired(TaskFailed):
    """``handle.result()``: the task's deadline (``expires_in``) passed before it could start."""


class TaskSkipped(TaskFailed):
    """``handle.result()``: an operator skipped the task (``queue skip``, the dashboard)."""


class PayloadTooLargeError(PyfiqError, ValueError):
    """A task's encoded arguments are larger than ``Settings.max_payload_bytes``: refused at
    the call, before anything is sent, naming the size and the limit. Nothing of its call (or
    of its ``enqueue_many`` batch) was enqueued. Pass a reference (a key, a URL) instead of the
    data, or raise the limit."""


class ResultUnavailable(PyfiqError, LookupError):
    """``handle.result()``: Redis holds neither the task nor its result: it finished without
    storing one (its function has no ``store_result``, or ``result_ttl`` has passed), or no task
    with this id was ever enqueued on this stream."""


class ResultRefused(PyfiqError):
    """A ``store_result`` function returned a value that cannot be stored (larger than
    ``Settings.result_max_bytes`` encoded, or refused by the serializer): its task is
    dead-lettered as ``result-refused`` with this error, and ``result()`` raises ``TaskFailed``."""


class TimeLimitExceeded(BaseException):
    """A task ran past its ``time_limit``: raised inside a plain function's thread, and in place
    of the cancellation of an ``async def`` task. A ``BaseException``, like
    ``asyncio.CancelledError``, so that a task's ``except Exception:`` does not swallow the
    interruption. It is a failed attempt: ``on_error`` sees it, pyfiq's retry policies retry it,
    and a tenacity ``retry=`` predicate decides for itself (tenacity's default matches
    ``Exception`` only)."""


class PartialEnqueueError(BackendUnavailableError):
    """``enqueue_many`` stopped part-way; says exactly which calls Redis holds.

    Every list is of indexes into the calls given, ascending:

    - ``accepted``: Redis confirmed them; ``handles[i]`` is each one's handle (``duplicate``
      when a ``batch_id`` found it stored already);
    - ``unknown``: sent, but no reply came back: maybe stored, at most once (a send that may
      have reached Redis is never repeated blindly); re-sending the whole batch with the same
      ``batch_id`` settles them without storing any twice;
    - ``unsent``: never sent, or refused by Redis before it ran (out of memory, a read-only
      replica, an ACL): certainly not stored; ``handles[i].id`` was never used. Re-sent without
      a ``batch_id``, a stream's unsent calls go after its ``unknown`` ones that
      ``handles[i].status()`` does not find stored, or the stream has a gap.
    """

    def __init__(
        self,
        message: str,
        handles: Sequence[TaskHandle[Any]],
        accepted: Sequence[int],
        unknown: Sequence[int],
        unsent: Sequence[int],
    ) -> None:
        super().__init__(message)
        self.handles = list(handles)
        self.accepted = list(accepted)
        self.unknown = list(unknown)
        self.unsent = list(unsent)

    @property
    def accepted_handles(self) -> list[TaskHandle[Any]]:
        return [self.handles[i] for i in self.accepted]

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds from args (the message only), which this __init__ refuses.
        return type(self), (str(self), self.handles, self.accepted, self.unknown, self.unsent)
