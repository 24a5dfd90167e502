"""How both drivers carry out a task's ``time_limit`` and ``time_warning`` (when is the engine's,
``TaskRun``): an ``async def`` task is cancelled, a plain function gets ``TimeLimitExceeded``
raised in its thread.

A limit never ends an execution early in the lease's eyes: both wrappers return only once the
function has really ended, so the caller keeps the lease held (and renewed) until then. An
exception raised in a thread lands when that thread next runs Python bytecode: a function
blocked in one long C call (``time.sleep(3600)``, a socket read without timeout) is interrupted
only when the call returns, and code that catches ``BaseException`` can ignore it.
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import itertools
import os
import platform
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..engine.task_run import TaskRun
from ..errors import TimeLimitExceeded
from ..logs import log
from .reports import report

T = TypeVar("T")


def _async_exc_setter() -> Callable[[int, Any], int] | None:
    if platform.python_implementation() != "CPython":
        return None
    # A private prototype: another library may have set argtypes on the shared pythonapi entry,
    # and clearing needs a NULL object, which only a py_object argument passes reliably.
    proto = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)
    return proto(("PyThreadState_SetAsyncExc", ctypes.pythonapi))


_set_async_exc = _async_exc_setter()


def _raise_in(thread_id: int) -> None:
    if _set_async_exc is None:
        log.error("pyfiq.time_limit_unsupported", hint="interrupting a thread needs CPython")
        return
    _set_async_exc(thread_id, TimeLimitExceeded)


def _clear_in(thread_id: int) -> None:
    if _set_async_exc is not None:
        _set_async_exc(thread_id, ctypes.py_object())


class _Watch:
    """One attempt as its timers see it. The lock makes "interrupt" and "the attempt ended"
    exclusive: once ``end`` returns, no interruption can be raised any more."""

    def __init__(self, task: TaskRun, interrupt: Callable[[], object]) -> None:
        self.task, self.interrupt = task, interrupt
        self.lock = threading.Lock()
        self.running, self.fired = True, False

    def warn(self) -> None:
        with self.lock:  # not for an attempt that ended while this timer fell due
            if self.running:
                self.task.running_long()
                if self.task.events:
                    report(self.task.events.take())

    def expire(self) -> None:
        with self.lock:
            if not self.running or self.fired:
                return
            self.fired = True
            self.task.limit_reached()
            if self.task.events:
                report(self.task.events.take())
            self.interrupt()

    def end(self) -> bool:
        """The attempt has ended; True if its limit fired."""
        with self.lock:
            self.running = False
            return self.fired


def _arm(watch: _Watch, call_later: Callable[[float, Callable[[], None]], Any], handles: list[Any]) -> None:
    task = watch.task
    if task.time_warning is not None:
        handles.append(call_later(task.time_warning, watch.warn))
    if task.time_limit is not None:
        handles.append(call_later(task.time_limit, watch.expire))


def call_with_limits(task: TaskRun, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in this thread, under the task's time limit and warning."""
    if task.time_limit is None and task.time_warning is None:
        return func(*args, **kwargs)
    thread_id = threading.get_ident()
    watch = _Watch(task, lambda: _raise_in(thread_id))
    handles: list[Any] = []
    try:  # armed inside: however short the limit, it lands where the finally sees it
        _arm(watch, TIMERS.call_later, handles)
        return func(*args, **kwargs)
    finally:
        # A limit that fired after the function's last instruction is still pending: cleared
        # here, or it would land in the worker's own code. If it lands in this block instead,
        # it leaves through this call, where the caller records it as the attempt's failure,
        # and it lands once only, so the inner finally always runs to its end.
        try:
            if watch.end():
                _clear_in(thread_id)
        finally:
            for handle in handles:
                handle.cancel()


async def await_with_limits(task: TaskRun, awaitable: Awaitable[T]) -> T:
    """``await awaitable`` in the current asyncio task, under the task's time limit and warning:
    at the limit the asyncio task is cancelled, and the cancellation (once the coroutine has
    finished handling it) becomes ``TimeLimitExceeded``."""
    if task.time_limit is None and task.time_warning is None:
        return await awaitable
    current = asyncio.current_task()
    assert current is not None
    watch = _Watch(task, current.cancel)
    handles: list[Any] = []
    settled = False
    try:
        _arm(watch, asyncio.get_running_loop().call_later, handles)
        return await awaitable
    except asyncio.CancelledError as exc:
        settled = True
        if _only_our_cancel(watch, current):
            raise TimeLimitExceeded() from exc
        raise
    finally:
        if not settled:
            _only_our_cancel(watch, current)
        for handle in handles:
            handle.cancel()


def _only_our_cancel(watch: _Watch, current: asyncio.Task[Any]) -> bool:
    """End the watch; True if the limit fired and nothing else asked to cancel the task."""
    if not watch.end():
        return False
    uncancel = getattr(current, "uncancel", None)  # Python 3.11+; before, a stop racing the
    return uncancel is None or uncancel() == 0  # limit is taken for the limit (it ends anyway)


class _Handle:
    __slots__ = ("callback", "cancelled", "owner", "when")

    def __init__(self, owner: _Timers, when: float, callback: Callable[[], None]) -> None:
        self.owner, self.when, self.callback, self.cancelled = owner, when, callback, False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.owner.cancelled()


class _Timers:
    """``loop.call_later`` for threads: one daemon thread for the whole process, started on
    first use, so that a time limit costs no thread per attempt."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Handle]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle(self, time.monotonic() + delay, callback)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pyfiq-timers", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
            if self._heap[0][2] is handle:
                self._cond.notify()
        return handle

    def cancelled(self) -> None:
        with self._cond:
            self._cancelled += 1
            # As asyncio does: drop cancelled entries once they are most of the heap, so that
            # long limits on many short tasks do not pile up until they fall due.
            if self._cancelled > 100 and self._cancelled * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def _next(self) -> _Handle:
        with self._cond:
            while not self._heap or self._heap[0][0] > time.monotonic():
                self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
            handle = heapq.heappop(self._heap)[2]
            if handle.cancelled:
                self._cancelled = max(0, self._cancelled - 1)
            return handle

    def _run(self) -> None:
        while True:
            handle = self._next()
            if handle.cancelled:
                continue
            try:
                handle.callback()
            except Exception as exc:  # a timer must outlive anything one callback does
                log.error("pyfiq.timer_callback_failed", error=repr(exc))


TIMERS = _Timers()
if hasattr(os, "register_at_fork"):
    # A forked child has no timer thread and may have copied a lock held by it.
    os.register_at_fork(after_in_child=TIMERS._reset)
