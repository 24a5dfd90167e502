"""What the engine tells its drivers instead of doing it: the clock it reads, and the events it
keeps for them (what to log, which hooks to call, which of a task's callbacks to run).

The engine never logs, calls a hook or reads the time itself. Each of its state machines
(``Scheduler``, ``StreamRun``, ``TaskRun``) is given a ``Clock`` when made, and keeps what
happened in its ``events`` outbox; the driver takes them after each call and reports them
(``pyfiq.workers.reports``), in the thread or task that made the call. Events are plain values:
a test reads them as it reads steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from ..task import TaskContext

#: How one attempt of a task ended, as ``after_execution`` hooks and metrics see it.
TaskOutcome = Literal["succeeded", "failed", "fenced", "cancelled"]
#: What happened to a lease this worker held, as ``on_lease`` hooks and metrics see it.
LeaseChange = Literal["acquired", "taken_over", "released", "lost"]


class Clock(Protocol):
    """The time as the engine may know it: given by the driver, so tests drive time by hand.

    ``monotonic()``: seconds, for deadlines and durations (leases, back-offs, heartbeats).
    ``wall_ms()``: milliseconds since the epoch, only stamped on records operators read."""

    def monotonic(self) -> float: ...

    def wall_ms(self) -> int: ...


# -- events a task's attempts produce (TaskRun) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    """An attempt starts: ``before_execution`` hooks."""

    ctx: TaskContext


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """The attempt raised ``error``: ``on_failure`` hooks."""

    ctx: TaskContext
    error: BaseException


@dataclass(frozen=True, slots=True)
class AttemptEnded:
    """The attempt ended after ``duration`` seconds: ``after_execution`` hooks."""

    ctx: TaskContext
    outcome: TaskOutcome
    duration: float


@dataclass(frozen=True, slots=True)
class CallbackDue:
    """Run one of the task's own callbacks (``@fifo(on_success=, on_error=)``) with ``args``;
    one that raises is logged and changes nothing."""

    name: Literal["on_success", "on_error"]
    callback: Callable[..., Any]
    args: tuple[Any, ...]
    ctx: TaskContext


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    """The attempt failed with ``error``; the task runs again in place after ``wait`` seconds.
    ``blocking``: an ``on_exhausted="block"`` task's policy gave up and a fresh round begins."""

    ctx: TaskContext
    error: BaseException
    wait: float
    attempts: int
    blocking: bool = False


@dataclass(frozen=True, slots=True)
class TaskExhausted:
    """The retry policy gave up: the task is dead-lettered as ``exhausted``."""

    ctx: TaskContext
    error: BaseException
    attempts: int


@dataclass(frozen=True, slots=True)
class RunningLong:
    """The attempt passed its ``time_warning`` (reported once per attempt)."""

    ctx: TaskContext
    attempt: int
    elapsed: float
    time_warning: float | None
    time_limit: float | None


@dataclass(frozen=True, slots=True)
class LimitReached:
    """The attempt passed its ``time_limit``: the driver interrupts it."""

    ctx: TaskContext
    attempt: int
    elapsed: float
    time_limit: float | None


@dataclass(frozen=True, slots=True)
class TaskFenced:
    """The task's lease went while it ran. ``skipped``: an operator's skip dead-lettered it
    (nothing to regret); else its result is dropped and the next holder runs it again."""

    ctx: TaskContext
    attempts: int
    reason: str
    skipped: bool


@dataclass(frozen=True, slots=True)
class TaskInterrupted:
    """A stop ended the task's retries: it stays in flight for the next holder."""

    ctx: TaskContext


# -- events of a lease and the scheduler ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetterConfirmed:
    """Redis confirmed a dead letter this worker asked for: ``on_dead_letter`` hooks. ``ctx``:
    the last attempt's, None for a task that never started."""

    stream: str
    reason: str
    ctx: TaskContext | None


@dataclass(frozen=True, slots=True)
class TaskRefused:
    """A taken task is dead-lettered before it starts (undecodable, expired, unknown)."""

    stream: str
    task_id: str
    header: str


@dataclass(frozen=True, slots=True)
class TaskDeferred:
    """A task this replica has no function for was handed back to others (said once per
    stream per ``grace``: it is handed back again every second or so until then)."""

    stream: str
    task_id: str
    grace: float
    name: str = ""


@dataclass(frozen=True, slots=True)
class LeaseRevoked:
    """An operator's skip revoked a lease this worker held."""

    stream: str
    fencing_token: int
    skipped: str


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """A lease this worker held is gone (fenced): another holder may run the stream now."""

    stream: str
    fencing_token: int
    reason: str


@dataclass(frozen=True, slots=True)
class StreamHalted:
    """An operator paused a held stream: nothing more starts under its lease."""

    stream: str
    reason: str


@dataclass(frozen=True, slots=True)
class LayoutMismatch:
    """A shard's layout was written by another shard count (a misconfigured replica)."""

    shard: int
    shards: int
    error: str


@dataclass(frozen=True, slots=True)
class ClaimFailed:
    """A look or a claim failed; the next one comes after ``retry_in`` seconds."""

    error: str
    retry_in: float


@dataclass(frozen=True, slots=True)
class HeartbeatLate:
    """A heartbeat round started ``late_by`` seconds past its time (a paused process, the GIL)."""

    late_by: float
    interval: float


Event = (
    AttemptStarted
    | AttemptFailed
    | AttemptEnded
    | CallbackDue
    | RetryScheduled
    | TaskExhausted
    | RunningLong
    | LimitReached
    | TaskFenced
    | TaskInterrupted
    | DeadLetterConfirmed
    | TaskRefused
    | TaskDeferred
    | LeaseRevoked
    | LeaseLost
    | StreamHalted
    | LayoutMismatch
    | ClaimFailed
    | HeartbeatLate
)


class Outbox(deque["Event"]):
    """The events an engine object kept for its driver, oldest first. A deque: a timer or a
    heartbeat thread may add while the driver's thread takes, and neither loses one. Its
    truth and ``put`` are the deque's own C methods, so a driver's check after every call
    costs no Python frame when nothing happened (the hot path's usual case)."""

    __slots__ = ()

    put = deque.append

    def take(self) -> list[Event]:
        """Every event kept so far, and forget them."""
        out = []
        while self:
            try:
                out.append(self.popleft())
            except IndexError:  # another thread took the last one meanwhile
                break
        return out
