"""``manage.py scenarios``: every enqueue-on-commit scenario, run in this one process against the
configured database and Redis; prints one JSON object, a result per scenario, that the test
module asserts on. A ``pyfiq_worker`` process the test started runs the ``orders`` queue."""

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.core.management.base import BaseCommand
from django.db import transaction
from django.db.transaction import TransactionManagementError
from django.test import TestCase

import pyfiq
from pyfiq import PartialEnqueueError, RedisQueueBackend
from pyfiq.functions import default_registry
from pyfiq.testing import drain, eager, memory_backend
from shop.models import Order
from shop.tasks import held, record


class Boom(Exception):
    pass


def held_ids(scenario: str) -> list[str]:
    backend = pyfiq.get_backend()
    entries = backend.client.lrange(backend.keys.stream(f"held#{scenario}").pending, 0, -1)
    return [e.decode().split("|", 1)[0] for e in entries]


def commit() -> dict[str, Any]:
    with transaction.atomic():
        order = Order.objects.create(note="commit")
        handle = record(order.id, "commit")
        inside = handle.status().state
        time.sleep(0.3)  # a task sent at the call would run now, before the row is committed
    # The control: the same call sent at once (on_commit=False) runs before the commit.
    with transaction.atomic():
        early = Order.objects.create(note="early")
        record.send_with_options(args=(early.id, "early"), on_commit=False)
        deadline = time.monotonic() + 15
        while "early" not in journal_labels() and time.monotonic() < deadline:
            time.sleep(0.02)
    return {"id": handle.id, "order": order.id, "state_inside": inside}


def journal_labels() -> set[str]:
    backend = pyfiq.get_backend()
    return {json.loads(e)["label"] for e in backend.client.lrange(f"{backend.keys.prefix}:journal", 0, -1)}


def rollback() -> dict[str, Any]:
    try:
        with transaction.atomic():
            Order.objects.create(note="rollback")
            dropped = held("rollback", "dropped")
            raise Boom
    except Boom:
        pass
    after = held("rollback", "after")
    return {"dropped": dropped.id, "after": after.id, "held": held_ids("rollback")}


def savepoints() -> dict[str, Any]:
    with transaction.atomic():
        a = held("savepoint", "a")
        with transaction.atomic():
            b = held("savepoint", "b")  # its savepoint is released: sent with the outer commit
        try:
            with transaction.atomic():
                held("savepoint", "x")
                with transaction.atomic():
                    held("savepoint", "y")  # inside the savepoint that rolls back
                raise Boom
        except Boom:
            pass
        c = held("savepoint", "c")
        before_commit = held_ids("savepoint")
    return {"expected": [a.id, b.id, c.id], "held": held_ids("savepoint"), "before_commit": before_commit}


def order() -> dict[str, Any]:
    backend = pyfiq.get_backend()
    round_trips: list[int] = []
    enqueue = backend.enqueuer.enqueue

    def counting(stream: str, tasks: Any, dedup: Any = None) -> Any:
        round_trips.append(len(tasks))
        return enqueue(stream, tasks, dedup)

    backend.enqueuer.enqueue = counting  # type: ignore[method-assign]
    try:
        with transaction.atomic():
            one = [held("order-1", str(i)) for i in range(150)]
            one += held.enqueue_many([("order-1", str(i)) for i in range(150, 200)])
            other = [held("order-2", str(i)) for i in range(3)]
            one.append(held("order-1", "last"))
        in_one_commit = list(round_trips)
        with transaction.atomic():
            first = [held("order-3", f"t1-{i}") for i in range(10)]
        with transaction.atomic():
            second = [held("order-3", f"t2-{i}") for i in range(10)]
    finally:
        del backend.enqueuer.enqueue
    return {
        "one": [h.id for h in one],
        "held_one": held_ids("order-1"),
        "other": [h.id for h in other],
        "held_other": held_ids("order-2"),
        "round_trips_of_one_commit": in_one_commit,
        "two": [h.id for h in first + second],
        "held_two": held_ids("order-3"),
    }


def autocommit() -> dict[str, Any]:
    handle = held("autocommit", "now")
    state = handle.status().state  # read before anything else happens
    with transaction.atomic():
        opted_out = held.send_with_options(args=("autocommit", "opted-out"), on_commit=False)
        inside = held_ids("autocommit")
    return {"id": handle.id, "state": state, "opted_out": opted_out.id, "held_inside": inside}


def manual_transaction() -> dict[str, Any]:
    """``set_autocommit(False)`` outside any ``atomic()``: Django has no commit hook there."""
    transaction.set_autocommit(False)
    try:
        try:
            held("manual", "hooked")
            error = ""
        except TransactionManagementError as exc:
            error = str(exc)
        now = held.send_with_options(args=("manual", "now"), on_commit=False)
        transaction.rollback()
    finally:
        transaction.set_autocommit(True)
    return {"error": error, "now": now.id, "held": held_ids("manual")}


def redis_ms() -> int:
    seconds, micros = pyfiq.get_backend().client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def from_the_commit() -> dict[str, Any]:
    """``delay=`` counts from the commit, and a dedup key is matched at the commit."""
    backend = pyfiq.get_backend()
    with transaction.atomic():
        delayed = held.send_with_options(args=("delay", "d"), delay=1.0)
        called_at = redis_ms()
        time.sleep(0.6)
        leaving_at = redis_ms()  # the commit, and the send, come after this
    # Members are "<seq>|<entry>", the entry starting with the task's id.
    entries = backend.client.zrange(backend.keys.stream("held#delay").later, 0, -1, withscores=True)
    (due,) = [score for raw, score in entries if raw.decode().split("|")[1] == delayed.id]
    with transaction.atomic():
        first = held.send_with_options(args=("dedup", "1"), dedup_key="once")
    with transaction.atomic():
        again = held.send_with_options(args=("dedup", "2"), dedup_key="once")
    return {
        "called_at": called_at,
        "leaving_at": leaving_at,
        "due": int(due),
        "first": first.id,
        "again": again.id,
        "held_dedup": held_ids("dedup"),
    }


def redis_down() -> dict[str, Any]:
    up = pyfiq.get_backend()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free now, so nothing listens there
    url = f"redis://127.0.0.1:{port}/0"
    down = RedisQueueBackend(url, prefix=up.keys.prefix, enqueue_timeout=0.3, enqueue_attempts=2)
    pyfiq.configure(down)
    error: BaseException | None = None
    ids: list[str] = []
    try:
        with transaction.atomic():
            Order.objects.create(note="redis-down")
            ids += [held("down", "a").id, held("down", "b").id]
            with transaction.atomic():
                ids.append(held("down", "c").id)  # another savepoint: another batch
    except Exception as exc:
        error = exc
    finally:
        pyfiq.configure(up)
    return {
        "error_type": type(error).__name__,
        "partial": isinstance(error, PartialEnqueueError),
        "message": str(error),
        "unsent": [error.handles[i].id for i in error.unsent] if isinstance(error, PartialEnqueueError) else [],
        "ids": ids,
        "committed": Order.objects.filter(note="redis-down").exists(),
    }


def raise_boom() -> None:
    raise Boom("another application's callback")


def foreign_callback() -> dict[str, Any]:
    """Another application's on-commit callback raises before pyfiq's runs, and then after one
    of pyfiq's failed: what is not sent, and what the error counts."""
    error = ""
    try:
        with transaction.atomic():
            transaction.on_commit(raise_boom)
            dropped = held("foreign", "after-their-raise")
    except Boom as exc:
        error = str(exc)
    up = pyfiq.get_backend()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free now, so nothing listens there
    pyfiq.configure(RedisQueueBackend(f"redis://127.0.0.1:{port}/0", prefix=up.keys.prefix, enqueue_timeout=0.3))
    partial: BaseException | None = None
    try:
        with transaction.atomic():
            first = held("foreign-down", "before")
            transaction.on_commit(lambda: None)
            later = held("foreign-down", "after")  # behind their callback: pyfiq's next one
    except PartialEnqueueError as exc:
        partial = exc
    finally:
        pyfiq.configure(up)
    unsent = [partial.handles[i].id for i in partial.unsent] if isinstance(partial, PartialEnqueueError) else []
    return {
        "error": error,
        "dropped": dropped.id,
        "held": held_ids("foreign"),
        "partial": type(partial).__name__,
        "message": str(partial),
        "first": first.id,
        "later": later.id,
        "unsent": unsent,
    }


def two_databases() -> dict[str, Any]:
    with transaction.atomic():
        with transaction.atomic(using="other"):
            both = held("two-db", "both")
        after_other_commit = held_ids("two-db")
    sent_after_both = held_ids("two-db")
    with transaction.atomic():
        try:
            with transaction.atomic(using="other"):
                dropped = held("two-db", "dropped")
                raise Boom
        except Boom:
            pass
    return {
        "both": both.id,
        "after_other_commit": after_other_commit,
        "sent_after_both": sent_after_both,
        "dropped": dropped.id,
        "held": held_ids("two-db"),
    }


def asynchronous() -> dict[str, Any]:
    """An enqueue follows the transaction of the thread that makes it; a coroutine runs on the
    event loop's thread, where Django opens none: ``aenqueue`` there is sent at once, while a
    call made in the synchronous code holding the transaction waits for its commit."""
    opened, release = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def in_transaction() -> None:
        with transaction.atomic():
            seen["sync"] = held("async", "sync").id
            opened.set()
            release.wait(10)

    async def main() -> None:
        work = asyncio.ensure_future(sync_to_async(in_transaction, thread_sensitive=False)())
        await asyncio.get_running_loop().run_in_executor(None, opened.wait, 10)
        seen["async"] = (await held.aenqueue("async", "async")).id
        seen["held_while_open"] = held_ids("async")
        release.set()
        await work

    asyncio.run(main())
    return {**seen, "held": held_ids("async")}


def testing_helpers() -> dict[str, Any]:
    ran: list[str] = []
    with eager(), transaction.atomic():
        order = Order.objects.create(note="eager")
        record(order.id, "eager")  # runs at the call, inside the transaction
        ran.append("eager")
    up = pyfiq.get_backend()
    backend = memory_backend()
    try:
        with transaction.atomic():
            placed = Order.objects.create(note="drained")
            record(placed.id, "drained")
            drain(backend, ["orders"])  # nothing to run yet: the call waits for the commit
            ran.append(f"inside:{backend.queue_info('orders')['pending']}")
        drain(backend, ["orders"])
    finally:
        default_registry.configure(up)
        backend.close()
    return {"ran": ran, "deferrer": type(default_registry.deferrer).__name__}


def test_case() -> dict[str, Any]:
    """As in a Django ``TestCase``: the test's transaction never commits, and
    ``captureOnCommitCallbacks(execute=True)`` runs the callbacks registered within it."""
    try:
        with transaction.atomic():
            with TestCase.captureOnCommitCallbacks(execute=True):
                a = held("testcase", "a")
            first = held_ids("testcase")
            with TestCase.captureOnCommitCallbacks(execute=True):
                b = held("testcase", "b")
            second = held_ids("testcase")
            raise Boom
    except Boom:
        pass
    return {"a": a.id, "b": b.id, "first": first, "second": second}


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "commit": commit,
    "rollback": rollback,
    "savepoints": savepoints,
    "order": order,
    "autocommit": autocommit,
    "manual_transaction": manual_transaction,
    "from_the_commit": from_the_commit,
    "redis_down": redis_down,
    "two_databases": two_databases,
    "foreign_callback": foreign_callback,
    "asynchronous": asynchronous,
    "testing_helpers": testing_helpers,
    "test_case": test_case,
}


class Command(BaseCommand):
    def handle(self, *args: Any, **options: Any) -> None:
        results: dict[str, Any] = {}
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario()
            except Exception as exc:  # one failing scenario fails its test, not the others
                results[name] = {"crashed": f"{type(exc).__name__}: {exc}"}
        self.stdout.write(json.dumps(results))
