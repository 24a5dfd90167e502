"""A dead letter's error text and traceback are stored bounded, whatever a task raises: the
message keeps its start, the traceback its end and its frames, and the record says how long
each was."""

from __future__ import annotations

import json
from typing import Any

from click.testing import CliRunner

from pyfiq import RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.ops.cli import main
from tests.support.helpers import unique_prefix, wait_until

MEGABYTE = 1_000_000
#: The stored bounds (docs/guide/retries.md): the message's first 4,000 characters, the traceback's last 16,000.
ERROR_LIMIT, TRACEBACK_LIMIT = 4_000, 16_000


def _inner_frame_of_the_task(size: int) -> None:
    raise ValueError("head-of-the-message " + "x" * size + " tail-of-the-message")


@fifo(queue="huge-errors", name="tests.dead_letter_bounds.explode", max_retries=0)
def explode(size: int) -> None:
    try:
        _inner_frame_of_the_task(size)
    except ValueError as exc:
        raise RuntimeError("y" * size) from exc


def test_a_one_megabyte_failure_is_stored_bounded_saying_how_long_it_was(redis_server: Any) -> None:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=2, lease_ttl=1.5, poll_interval=0.1)
    handle = explode.send_with_options(args=(MEGABYTE,), backend=backend)
    with ThreadedWorker(backend, queues=["huge-errors"]):
        wait_until(lambda: backend.queue_info("huge-errors")["dead"] == 1, message="the task was dead-lettered")
    (raw,) = backend.client.zrange(backend.keys.stream("huge-errors").dead, 0, -1)
    header_line = raw.partition(b"\n")[0]
    assert len(header_line) < ERROR_LIMIT + TRACEBACK_LIMIT + 2_000, len(header_line)
    assert len(raw) < 40_000, "the record (header and the task entry) is bounded"
    header = json.loads(header_line)
    assert header["error_length"] == MEGABYTE and len(header["error"]) <= ERROR_LIMIT + 100
    assert header["error"].startswith("y" * 100) and "[truncated " in header["error"]
    assert header["traceback_length"] > 2 * MEGABYTE
    tb = header["traceback"]
    assert len(tb) <= TRACEBACK_LIMIT + 100 and "[truncated " in tb
    # The end of the traceback is kept, and its frames survive the huge messages inside it.
    assert tb.rstrip().splitlines()[-1].startswith("RuntimeError: yyy")
    assert "in _inner_frame_of_the_task" in tb and "in explode" in tb
    assert "The above exception was the direct cause of the following exception" in tb
    result = CliRunner().invoke(
        main, ["--redis", backend.url, "--prefix", backend.keys.prefix, "dlq", "show", "huge-errors", handle.id]
    )
    assert result.exit_code == 0 and len(result.output) < 40_000 and "[truncated " in result.output
    backend.close()


def test_an_ordinary_failure_is_stored_whole() -> None:
    from pyfiq.engine.outcomes import dead_letter_header

    try:
        _inner_frame_of_the_task(10)
    except ValueError as exc:
        header = json.loads(dead_letter_header("exhausted", replica="r", deliveries=1, error=exc))
    assert header["error"] == "head-of-the-message xxxxxxxxxx tail-of-the-message"
    assert "error_length" not in header and "traceback_length" not in header
    assert header["traceback"].startswith("Traceback (most recent call last):\n")
    assert header["traceback"].endswith("ValueError: head-of-the-message xxxxxxxxxx tail-of-the-message\n")
