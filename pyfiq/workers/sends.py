"""How an executor of the threaded worker sends its group takes: on a one-thread pool of its
own while it runs the next task, in order, and never two beside each other."""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Callable
from typing import Any


def send_in_order(
    sender: concurrent.futures.ThreadPoolExecutor,
    sent: deque[concurrent.futures.Future[Any]],
    call: Callable[[Any], Any],
    what: Any,
) -> concurrent.futures.Future[Any]:
    """``call(what)`` on the sender thread, or here once the interpreter exits: thread pools
    take no new work then, and a worker stopped by an ``atexit`` function must still send the
    acknowledgements of the tasks it finished (else they run again elsewhere). Here it goes
    after the sends under way, so sends stay in order and never beside each other."""
    try:
        return sender.submit(call, what)
    except RuntimeError:
        for earlier in sent:
            concurrent.futures.wait([earlier])
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(call(what))
        except Exception as exc:
            future.set_exception(exc)
        return future


def settled(future: concurrent.futures.Future[Any]) -> Any:
    """The future's result, or the exception it ended with, once it has ended."""
    try:
        return future.result()
    except Exception as exc:
        return exc
