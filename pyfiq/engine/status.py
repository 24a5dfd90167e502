"""What a ``status`` script reply says about one task, as a ``TaskStatus``: no I/O here.

The reply is what Redis holds at one moment (see ``lua/status.lua``). Redis knows whether a task
waits, was handed to a holder, or was dead-lettered; of a task that succeeded it keeps only the
result of a ``store_result`` function, until ``result_ttl``, so a task found nowhere is
``unknown``, and the detail says what that can mean.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from ..task import TaskState, TaskStatus

#: Pending entries a status call looks through at most: the scan costs Redis O(place), so a
#: task deeper than this in a longer stream is reported ``unknown`` with that said.
STATUS_SCAN = 10_000

#: Dead-letter reasons with a state of their own; every other reason is ``dead_lettered``.
_DEAD_STATES: dict[str, TaskState] = {"expired": "expired", "operator": "skipped"}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _when(ms: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromtimestamp(int(ms) / 1000, tz=dt.timezone.utc)
    except (TypeError, ValueError, OverflowError):
        return None


def holder_of(lease_value: str) -> str | None:
    """The replica id in a lease value (``[!]<fence>:<replica>/<nonce>``), or None."""
    _, _, rest = lease_value.lstrip("!").partition(":")
    replica, slash, _ = rest.rpartition("/")
    return replica if slash and replica else None


def parse_status(stream: str, task_id: str, reply: Any) -> TaskStatus:
    """The ``TaskStatus`` a ``status`` script's reply describes."""
    kind = _text(reply[0])
    if kind == "result":
        detail = "succeeded: its result is stored until result_ttl after it ended"
        return TaskStatus(task_id, stream, "succeeded", detail, encoded_result=bytes(reply[1]))
    if kind == "dead":
        return _dead(stream, task_id, _text(reply[1]))
    if kind == "inflight":
        return _in_flight(stream, task_id, reply)
    if kind == "scheduled":
        due, now = int(reply[1]), int(reply[2])
        detail = f"delayed: it joins {stream!r} at {_when(due):%Y-%m-%d %H:%M:%S.%f}"[:-3] + " UTC"
        detail += f" (in {max(0, due - now) / 1000:.3f} s, by Redis's clock), behind what was enqueued before then"
        return TaskStatus(task_id, stream, "scheduled", detail, due=_when(due))
    if kind == "pending":
        place, deliveries = int(reply[1]), int(reply[2])
        detail = f"waiting in {stream!r} behind {place} task(s)"
        if deliveries:
            detail += f", after {deliveries} earlier delivery(ies)"
        return TaskStatus(task_id, stream, "pending", detail, place=place, deliveries=deliveries or None)
    complete = int(reply[1]) == 1
    if len(reply) > 2 and _text(reply[2]) == "deleted":
        return TaskStatus(task_id, stream, "unknown", "deleted by an operator while it was pending", searched_all=True)
    detail = (
        "not in the stream: it finished (pyfiq keeps a record of a task that succeeded only for a "
        f"store_result function, until result_ttl) or was never enqueued on {stream!r}"
    )
    if not complete:
        detail += f"; only the first {STATUS_SCAN:,} pending tasks were looked through, and it may wait behind them"
    return TaskStatus(task_id, stream, "unknown", detail, searched_all=complete)


def _dead(stream: str, task_id: str, header_text: str) -> TaskStatus:
    try:
        header = json.loads(header_text)
    except ValueError:
        header = {}
    if not isinstance(header, dict):
        header = {}
    reason = str(header.get("reason", "unknown"))
    state = _DEAD_STATES.get(reason, "dead_lettered")
    error = header.get("error")
    detail = f"in the dead letters of {stream!r} ({reason})"
    return TaskStatus(
        task_id,
        stream,
        state,
        detail,
        since=_when(header.get("at_ms")),
        deliveries=header.get("deliveries") if isinstance(header.get("deliveries"), int) else None,
        reason=reason,
        error_type=str(header["error_type"]) if "error_type" in header else None,
        error=str(error) if error is not None else None,
        traceback=str(header["traceback"]) if header.get("traceback") else None,
    )


def _attempt(field: Any) -> tuple[int | None, int]:
    """The heartbeat's "<attempt>:<Redis ms of the next attempt>" of a task being retried."""
    attempt, _, retry_at = _text(field).partition(":")
    try:
        return int(attempt), int(retry_at or 0)
    except ValueError:
        return None, 0


def _in_flight(stream: str, task_id: str, reply: Any) -> TaskStatus:
    index, handed, started = int(reply[1]), int(reply[2]), _text(reply[3])
    deliveries, running, lease = int(reply[4]), _text(reply[5]), _text(reply[6])
    replica = holder_of(lease) if lease else None
    if not lease or index >= handed:
        # Its holder is gone (or never got it): the next claim of the stream hands it over.
        detail = f"in flight without a live holder: it is handed over again when {stream!r} is next claimed"
        return TaskStatus(task_id, stream, "pending", detail, place=index, deliveries=deliveries)
    since = _when(started) if started else None
    # The holder names the task it runs at each heartbeat ('running'); before its first one, the
    # head it was handed with a start mark is the one it runs.
    if running == task_id or (not running and index == 0 and started):
        attempt, retry_at = _attempt(reply[8] if len(reply) > 8 else "")
        if retry_at and retry_at > int(reply[7]):
            detail = (
                f"retrying on {replica or 'a replica'}: attempt {attempt} failed, the next starts at "
                f"{_when(retry_at):%H:%M:%S} UTC (delivery {deliveries})"
            )
            return TaskStatus(
                task_id, stream, "retrying", detail, replica=replica, since=since, deliveries=deliveries,
                attempt=attempt, next_attempt=_when(retry_at),
            )  # fmt: skip
        detail = f"running on {replica or 'a replica'} (delivery {deliveries}" + (
            f", attempt {attempt})" if attempt else ")"
        )
        return TaskStatus(
            task_id, stream, "running", detail, replica=replica, since=since, deliveries=deliveries, attempt=attempt
        )
    detail = (
        f"handed to {replica or 'a replica'}: it runs after the task that holder runs now, or has just "
        "ended and its acknowledgement is on its way (a holder names what it runs at each heartbeat)"
    )
    return TaskStatus(task_id, stream, "taken", detail, place=index, replica=replica, deliveries=deliveries)
