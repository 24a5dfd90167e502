"""``pyfiq.testing.drain`` as an application's test suite uses it: a task that fails fails the
test that drained it, retries do not wait out production back-offs, and the failures can be
read instead of raised."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import pyfiq
from pyfiq.functions import Registry
from pyfiq.testing import Failure, TasksFailed, drain, memory_backend


def qname() -> str:
    return f"drain-{uuid.uuid4().hex[:8]}"


class CardDeclined(Exception):
    pass


def test_a_task_that_fails_fails_the_test_that_drained_it() -> None:
    registry, q, ran = Registry(), qname(), []
    backend = memory_backend(registry=registry)

    @registry.fifo(queue=q, name=f"{q}.charge", max_retries=0)
    def charge(order: int) -> None:
        ran.append(order)
        if order == 2:
            raise CardDeclined(f"order {order}: card declined")

    for order in (1, 2, 3):
        charge(order)
    with pytest.raises(TasksFailed) as caught:
        drain(backend, [q], registry=registry)
    assert ran == [1, 2, 3], "the queue ran to its end first"
    (failure,) = caught.value.failures
    assert (failure.stream, failure.task, failure.reason) == (q, f"{q}.charge", "exhausted")
    assert isinstance(failure.exception, CardDeclined) and caught.value.__cause__ is failure.exception
    assert "card declined" in str(caught.value) and f"{q}.charge" in str(caught.value)
    assert isinstance(caught.value, AssertionError), "a test runner reports it as the test's failure"


def test_retries_run_at_once_in_a_drain_whatever_their_back_off() -> None:
    registry, q, attempts = Registry(), qname(), []
    backend = memory_backend(registry=registry)

    @registry.fifo(queue=q, name=f"{q}.flaky", max_retries=3, retry_wait=60)
    def flaky() -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("the API is down")

    flaky()
    started = time.monotonic()
    assert drain(backend, [q], registry=registry, timeout=10) == []
    assert len(attempts) == 3 and time.monotonic() - started < 5, "no 60 s back-off was waited out"


def test_failures_can_be_read_instead_of_raised_and_only_this_drain_s_count() -> None:
    registry, q = Registry(), qname()
    backend = memory_backend(registry=registry)

    @registry.fifo(queue=q, name=f"{q}.boom", max_retries=1, key=lambda k: k)
    def boom(k: str) -> None:
        raise ValueError(f"bad input {k}")

    boom("a")
    assert [f.error for f in drain(backend, [q], registry=registry, raise_failures=False)] == [
        "ValueError: bad input a"
    ]
    boom("b")
    boom("c")
    failures = drain(backend, [q], registry=registry, raise_failures=False)
    assert [(f.stream, f.reason) for f in failures] == [(f"{q}#b", "exhausted"), (f"{q}#c", "exhausted")]
    assert all(isinstance(f, Failure) and isinstance(f.exception, ValueError) for f in failures)


def test_a_drain_where_every_task_succeeds_returns_no_failures() -> None:
    q = qname()
    backend = memory_backend()
    done: list[int] = []

    @pyfiq.fifo(queue=q, name=f"{q}.ok")
    def ok(i: int) -> None:
        done.append(i)

    for i in range(5):
        ok(i)
    assert drain(backend, [q]) == [] and done == [0, 1, 2, 3, 4]


def test_the_docs_testing_example_runs_under_pytest_and_catches_a_failing_task(tmp_path: Path) -> None:
    block = re.search(r"```python\n# test_billing.py\n(.*?)```", docs_page("guide/testing.md"), flags=re.S)
    assert block is not None, "the testing page's example"
    (tmp_path / "test_billing.py").write_text(block.group(1))
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_billing.py")]
    done = subprocess.run(run, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
    # The same file where the failing charge is not expected: the user's test fails, naming why.
    (tmp_path / "test_billing.py").write_text(
        block.group(1).replace('with pytest.raises(TasksFailed, match="nothing to charge c-7"):\n        ', "")
    )
    done = subprocess.run(run, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and "1 failed, 2 passed" in done.stdout, done.stdout
    assert "TasksFailed" in done.stdout and "nothing to charge c-7" in done.stdout


def test_a_task_that_fails_its_last_attempt_is_an_error_record_with_its_traceback() -> None:
    """What an error tracker's logging integration reports: one ERROR record carrying the
    exception (exc_info), for the final failure only; a success is one DEBUG line."""
    import logging

    registry, q = Registry(), qname()
    backend = memory_backend(registry=registry)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    @registry.fifo(queue=q, name=f"{q}.charge", max_retries=1)
    def charge(order: int) -> None:
        if order == 2:
            raise CardDeclined(f"order {order}: card declined")

    logger = logging.getLogger("pyfiq")
    handler, level = Keep(level=logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        charge(1)
        charge(2)
        drain(backend, [q], registry=registry, raise_failures=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "pyfiq.task_dead_lettered" in errors[0].getMessage()
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], CardDeclined)
    assert errors[0].exc_info[2] is not None, "with the traceback of the task's own code"
    succeeded = [r for r in records if "pyfiq.task_succeeded" in r.getMessage()]
    assert len(succeeded) == 1 and succeeded[0].levelno == logging.DEBUG and "duration=" in succeeded[0].getMessage()


def docs_page(page: str) -> str:
    """A page of the documentation site, by its path under docs/."""
    return (Path(__file__).resolve().parents[2] / "docs" / page).read_text()


def docs_block(page: str, after: str) -> str:
    """The first Python block of ``page`` after the line ``after``."""
    block = re.search(re.escape(after) + r"\n.*?```python\n(.*?)```", docs_page(page), flags=re.S)
    assert block is not None, f"the block of {page} after {after!r}"
    return block.group(1)


def test_the_inside_a_task_block_hands_the_id_and_the_fencing_token_downstream() -> None:
    """docs/guide/tasks.md, "Inside a task": the headers its task sends carry the task's id and
    a fencing token, as the page says."""
    source = docs_block("guide/tasks.md", "## Inside a task").replace(
        '"redis://localhost"', repr(f"memory://docs-{uuid.uuid4().hex}")
    )
    assert "current_task()" in source
    scope: dict[str, object] = {"__name__": "docs_inside_a_task"}
    exec(compile(source, "docs/guide/tasks.md", "exec"), scope)
    (headers,) = scope["sent"]  # type: ignore[misc]
    assert len(headers["Idempotency-Key"]) == 32 and int(headers["X-Fencing-Token"]) > 0


def test_the_logging_set_up_for_embedded_workers_runs_as_written() -> None:
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for h in handlers:
        root.removeHandler(h)
    try:
        source = docs_block("operations/logging.md", "only once it configures logging, for instance in two lines:")
        exec(compile(source, "docs/operations/logging.md", "exec"), {})
        assert root.level == logging.INFO and root.handlers
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def test_eager_mode_runs_each_call_at_once_in_order_through_the_serializer() -> None:
    from pyfiq import PyfiqError, current_task
    from pyfiq.testing import eager

    registry, q, seen = Registry(), qname(), []

    @registry.fifo(queue=q, name=f"{q}.record", key=lambda customer, amount: customer, store_result=True)
    def record(customer: str, amount: object) -> dict[str, object]:
        task = current_task()
        seen.append((task.queue, task.stream, customer, amount))
        if amount == 0:
            raise CardDeclined("nothing to charge")
        return {"customer": customer, "amount": amount}

    with eager(registry=registry):
        handle = record("c-1", (1, 2))  # a tuple comes back a list, as a worker would see it
        record("c-2", 5)
        with pytest.raises(CardDeclined, match="nothing to charge"):
            record("c-3", 0)
        with pytest.raises(PyfiqError):  # what the serializer refuses fails as at an enqueue
            record("c-4", object())
        handles = record.enqueue_many([("c-5", 7), ("c-6", 8)])
    assert handle.result() == {"customer": "c-1", "amount": [1, 2]}
    assert [h.result()["amount"] for h in handles] == [7, 8]
    assert [s[2:] for s in seen] == [("c-1", [1, 2]), ("c-2", 5), ("c-3", 0), ("c-5", 7), ("c-6", 8)]
    assert seen[0][:2] == (q, f"{q}#c-1"), "current_task() knows the queue and the stream"
    with pytest.raises(pyfiq.NotConfiguredError):
        record("c-7", 1)  # outside the block, calls enqueue again (and this registry has no backend)


def test_eager_mode_runs_async_tasks_from_sync_and_async_callers() -> None:
    import asyncio

    from pyfiq.testing import eager

    registry, q = Registry(), qname()

    @registry.fifo(queue=q, name=f"{q}.double", store_result=True)
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def from_a_loop() -> int:
        handle = await double(4)
        return int(handle.result())

    with eager(registry=registry):
        assert double(3).result() == 6
        assert asyncio.run(from_a_loop()) == 8


def test_a_task_dead_lettered_before_it_starts_is_logged_in_the_same_fields_as_any_other() -> None:
    """A task no replica has a function for, past its grace: one ERROR line with queue, stream,
    task, reason and error as fields, like a task that failed its last attempt."""
    import logging

    registry, q = Registry(), qname()
    backend = memory_backend(registry=registry, unknown_task_grace=0.05)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    sender = Registry()
    sender.configure(backend)
    sender.fifo(queue=q, name=f"{q}.removed")(lambda: None)()  # enqueued by an older deploy
    registry.fifo(queue=q, name=f"{q}.other")(lambda: None)  # this replica consumes q, not it
    logger = logging.getLogger("pyfiq")
    handler = Keep(level=logging.ERROR)
    logger.addHandler(handler)
    try:
        (failure,) = drain(backend, [q], registry=registry, raise_failures=False)
    finally:
        logger.removeHandler(handler)
    assert failure.reason == "unknown-task" and failure.task == f"{q}.removed"
    (line,) = [r for r in records if "pyfiq.task_dead_lettered" in r.getMessage()]
    fields = line.pyfiq  # type: ignore[attr-defined]
    assert (fields["queue"], fields["stream"], fields["task"], fields["reason"]) == (
        q,
        q,
        f"{q}.removed",
        "unknown-task",
    )
    assert "no replica ran a @fifo function" in fields["error"] and "header" not in fields


def test_eager_mode_keeps_what_a_worker_keeps_order_of_nested_calls_refusals_and_dedup() -> None:
    from pyfiq.testing import eager

    registry, q, ran = Registry(), qname(), []

    @registry.fifo(queue=q, name=f"{q}.child")
    def child(tag: str) -> None:
        ran.append(f"child {tag}")

    @registry.fifo(queue=q, name=f"{q}.parent")
    def parent(tag: str) -> None:
        ran.append(f"parent {tag} start")
        child(tag)  # enqueued behind this task: it runs once this one has ended
        ran.append(f"parent {tag} end")

    with eager(registry=registry):
        parent("a")
        assert ran == ["parent a start", "parent a end", "child a"]
        first = child.send_with_options(args=("d",), dedup_key="once")
        again = child.send_with_options(args=("d",), dedup_key="once")
        assert again.duplicate and again.id == first.id and ran.count("child d") == 1
        with pytest.raises(pyfiq.PayloadTooLargeError):
            child("x" * 2_000_000)
        with pytest.raises(pyfiq.ConfigurationError, match="ends before the task is due"):
            child.send_with_options(args=("e",), delay=10, expires_in=1)
    assert "child e" not in ran and not any(r.startswith("child xx") for r in ran)


def test_a_task_no_function_is_registered_for_fails_the_drain_of_a_memory_backend() -> None:
    """Not a TimeoutError: the memory backend's grace for unknown functions is short."""
    registry, q = Registry(), qname()
    backend = memory_backend(registry=registry)
    sender = Registry()
    sender.configure(backend)
    sender.fifo(queue=q, name=f"{q}.renamed")(lambda: None)()
    registry.fifo(queue=q, name=f"{q}.current")(lambda: None)
    with pytest.raises(TasksFailed, match="unknown-task"):
        drain(backend, [q], registry=registry)
