"""A stream key or an error text cannot forge lines in a worker's text log: every record stays
one line, its control characters escaped, both in the records pyfiq hands to the host's logging
(the message of each ``pyfiq`` record) and in the text the ``pyfiq worker`` command writes,
tracebacks included. The structured ``pyfiq`` attribute keeps the exact values."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from pyfiq import RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.task import TaskRecord, new_task_id
from tests.support.helpers import unique_prefix, wait_until

FORGED = "\n2026-01-01 00:00:00 [error    ] pyfiq.task_succeeded queue=billing\r\x1b[2K\x1b]0;owned\x07\x9b\x85"
KEY = f"c-1{FORGED}"
RAW = {chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]}


def assert_one_clean_line(text: str) -> None:
    found = sorted({f"U+{ord(c):04X}" for c in text if c in RAW})
    assert not found, f"raw control characters {found} in {text!r}"


@fifo(queue="forge-inproc", name="tests.forging.fail", max_retries=0)
def fail(text: str) -> None:
    raise ValueError(text)


def test_every_pyfiq_record_is_one_line_with_its_values_escaped(redis_server: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="pyfiq")
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=2, lease_ttl=1.5, poll_interval=0.1)
    stream = f"forge-inproc#{KEY}"
    backend.enqueue(stream, [(new_task_id(), TaskRecord(fail.name, [f"bad{FORGED}"], {}, key=KEY))])
    with ThreadedWorker(backend, queues=["forge-inproc"]):
        wait_until(lambda: backend.queue_info(stream)["dead"] == 1, message="the task was dead-lettered")
    backend.close()
    mine = [r for r in caplog.records if "forge-inproc" in str(getattr(r, "pyfiq", ""))]
    assert {r.getMessage().split()[0] for r in mine} >= {"pyfiq.lease_acquired", "pyfiq.task_dead_lettered"}
    for record in mine:
        assert_one_clean_line(record.getMessage())
    dead = next(r for r in mine if r.getMessage().startswith("pyfiq.task_dead_lettered"))
    shown = (
        "\\n2026-01-01 00:00:00 [error    ] pyfiq.task_succeeded queue=billing\\r\\x1b[2K\\x1b]0;owned\\x07\\x9b\\x85"
    )
    assert f"stream=forge-inproc#c-1{shown} " in dead.getMessage()
    assert f"error=ValueError: bad{shown}" in dead.getMessage()
    # The structured attribute is for handlers that encode it (JSON): it keeps the data exact.
    assert dead.pyfiq["stream"] == stream


WORKER_MODULE = """
from pyfiq import fifo


def complain(exc, task, binding):
    raise RuntimeError(f"on_error failed too: {exc}")


@fifo(queue="forge", name="forge.fail", max_retries=0, on_error=complain)
def fail(text):
    raise ValueError(text)
"""

#: How the worker command starts a record: a timestamp, then the level.
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def test_the_worker_commands_text_log_keeps_each_record_on_its_own_line(redis_server: Any, tmp_path: Path) -> None:
    (tmp_path / "forgemod.py").write_text(textwrap.dedent(WORKER_MODULE))
    prefix = unique_prefix()
    backend = RedisQueueBackend(redis_server.url, prefix=prefix, shards=2)
    stream = f"forge#{KEY}"
    backend.enqueue(stream, [(new_task_id(), TaskRecord("forge.fail", [f"bad{FORGED}"], {}, key=KEY))])
    args = ["worker", "forgemod", "--redis", redis_server.url, "--prefix", prefix, "--shards", "2"]
    args += ["--log-level", "debug", "--poll-interval", "0.1", "--lease-ttl", "1.5"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "pyfiq", *args], cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: backend.queue_info(stream)["dead"] == 1, timeout=30, message="the task was dead-lettered")
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
        backend.close()
    text = err.decode()
    assert "\r" not in text
    lines = text.splitlines()
    for line in lines:
        assert_one_clean_line(line)
        assert RECORD_START.match(line) or re.match(r"^replica \S+ ready$", line), line
    assert not any(line.startswith("2026-01-01") for line in lines)
    dead = [line for line in lines if " pyfiq.task_dead_lettered " in line]
    assert len(dead) == 1 and "2026-01-01 00:00:00 [error    ]" in dead[0]
    # A record with a traceback (a callback that raised) is one line too, its breaks escaped.
    (callback,) = [line for line in lines if " pyfiq.callback_failed " in line]
    assert "\\nTraceback (most recent call last):\\n" in callback
    assert "RuntimeError: on_error failed too: bad\\n2026-01-01 00:00:00 [error    ]" in callback
