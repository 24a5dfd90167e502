"""Waiting for a task's end (``TaskHandle.result()``): subscribe to the task's own sharded
channel, read its status once the subscription is confirmed, and read it again each time the
channel announces an end (the scripts that acknowledge a ``store_result`` task, or dead-letter
any task, announce on it). So a wait costs Redis one status read per announcement and one every
``RECHECK`` seconds in case an announcement was lost to a reconnect, never a tight poll; and no
end can fall between the first read and the subscription.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import DecodeError, ResultUnavailable, TaskExpired, TaskFailed, TaskSkipped
from ..serializers import Serializer
from ..task import TaskStatus

#: Seconds between status reads when no announcement comes (one lost to a reconnect).
RECHECK = 5.0
#: How long a cluster's listener waits on one node before looking at the next (as the
#: worker's wake-up listener does).
_NODE_SLICE = 0.02
#: States a task does not leave by itself.
ENDED = frozenset({"succeeded", "dead_lettered", "expired", "skipped"})
_FAILED: dict[str, type[TaskFailed]] = {"expired": TaskExpired, "skipped": TaskSkipped}


def ended(status: TaskStatus) -> bool:
    """Whether waiting longer can change what ``settle`` says of ``status``."""
    return status.state in ENDED or (status.state == "unknown" and status.searched_all)


def settle(status: TaskStatus, serializer: Serializer) -> Any:
    """The value of an ended task, or the error that says why there is none."""
    if status.state == "succeeded":
        assert status.encoded_result is not None
        try:
            return serializer.loads(status.encoded_result)
        except Exception as exc:
            raise DecodeError(f"the stored result of task {status.id} cannot be decoded: {exc}") from exc
    if status.state in ("dead_lettered", "expired", "skipped"):
        error = _FAILED.get(status.state, TaskFailed)
        said = f": {status.error_type}: {status.error}" if status.error_type else ""
        raise error(
            f"task {status.id} of {status.stream!r} was dead-lettered ({status.reason}){said}",
            status.id,
            status.reason or "",
            status.error_type,
            status.error,
            status.traceback,
        )
    raise ResultUnavailable(f"no result for task {status.id}: {status.detail}")


def _left(deadline: float | None) -> float:
    return RECHECK if deadline is None else min(RECHECK, deadline - time.monotonic())


def _timed_out(status: TaskStatus, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"task {status.id} did not end within {timeout} s: {status.detail}")


def _is_end(message: Any) -> bool:
    return bool(message) and message.get("type") in ("smessage", "message")


class ResultListener:
    """A subscription to one task's channel: ``wait(timeout)`` returns True when an end was
    announced, False when ``timeout`` passed first."""

    def __init__(self, client: Any, channel: str, cluster: bool) -> None:
        self._cluster = cluster
        self._pubsub = client.pubsub()
        try:
            self._pubsub.ssubscribe(channel)
            self._read_until(lambda m: bool(m) and m.get("type") == "ssubscribe", RECHECK)
        except BaseException:
            self.close()
            raise

    def _next(self, timeout: float) -> Any:
        if self._cluster:
            return self._pubsub.get_sharded_message(timeout=min(timeout, _NODE_SLICE))
        return self._pubsub.get_message(timeout=timeout)

    def _read_until(self, wanted: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if wanted(self._next(left)):
                return True
        return False

    def wait(self, timeout: float) -> bool:
        return self._read_until(_is_end, timeout)

    def close(self) -> None:
        self._pubsub.close()


class AsyncResultListener:
    """``ResultListener`` for asyncio code: ``await subscribe()`` first."""

    def __init__(self, client: Any, channel: str, cluster: bool) -> None:
        self._cluster = cluster
        self._channel = channel
        self._pubsub = client.pubsub()

    async def subscribe(self) -> None:
        await self._pubsub.ssubscribe(self._channel)
        await self._read_until(lambda m: bool(m) and m.get("type") == "ssubscribe", RECHECK)

    async def _next(self, timeout: float) -> Any:
        if self._cluster:
            return await self._pubsub.get_sharded_message(timeout=min(timeout, _NODE_SLICE))
        return await self._pubsub.get_message(timeout=timeout)

    async def _read_until(self, wanted: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if wanted(await self._next(left)):
                return True
        return False

    async def wait(self, timeout: float) -> bool:
        return await self._read_until(_is_end, timeout)

    async def aclose(self) -> None:
        await self._pubsub.aclose()


def wait_result(backend: Any, stream: str, task_id: str, timeout: float | None) -> TaskStatus:
    """The status of task ``task_id`` once it has ended (see ``ended``); ``TimeoutError`` after
    ``timeout`` seconds (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    channel = backend.keys.stream(stream).result(task_id)
    with backend.translated():
        listener = ResultListener(backend.client, channel, backend.transport.is_cluster)
    try:
        while True:
            status: TaskStatus = backend.task_status(stream, task_id)
            if ended(status):
                return status
            if (left := _left(deadline)) <= 0:
                raise _timed_out(status, timeout)
            with backend.translated():
                listener.wait(left)
    finally:
        listener.close()


async def await_result(backend: Any, stream: str, task_id: str, timeout: float | None) -> TaskStatus:
    """``wait_result`` for asyncio code."""
    deadline = None if timeout is None else time.monotonic() + timeout
    channel = backend.keys.stream(stream).result(task_id)
    listener = AsyncResultListener(backend.async_client, channel, backend.transport.is_cluster)
    try:
        with backend.translated():
            await listener.subscribe()
        while True:
            status: TaskStatus = await backend.atask_status(stream, task_id)
            if ended(status):
                return status
            if (left := _left(deadline)) <= 0:
                raise _timed_out(status, timeout)
            with backend.translated():
                await listener.wait(left)
    finally:
        await listener.aclose()
