"""What the operator's terminal receives from the CLI when the data in Redis is hostile: stream
keys, queue names, error texts, tracebacks, lease holders and replica entries carrying terminal
control sequences (a window title, an erased line, a carriage return, a clipboard write, C1
controls, a right-to-left override). None of them may reach the terminal raw; each shows as a
visible escape. Written the way an older version or anyone with write access to Redis could
store them, since pyfiq itself now refuses such keys at enqueue."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from pyfiq import RedisQueueBackend, ThreadedWorker, fifo
from pyfiq.ops.cli import main
from pyfiq.task import TaskRecord, new_task_id
from tests.support.helpers import unique_prefix, wait_until

#: A title change, an erased line, a carriage return, an OSC 52 clipboard write, a C1 CSI, NEL,
#: DEL, NUL, a line break, a tab (a fake column) and a right-to-left override.
HOSTILE = "c\x1b]0;pwned\x07\x1b[2K\r\x1b]52;c;aGVsbG8=\x07\x9b31m\x85\x7f\x00\n\tfake\u202e"
ERROR = "boom\x1b]0;owned\x07\r\n2026-01-01 00:00:00 [error    ] forged\x1b[2K"
#: The line feed ends the CLI's lines and the tab separates its columns; data carries neither raw.
FORBIDDEN = {chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]} - {"\n", "\t"} | {"\u202e"}


def assert_inert(text: str) -> None:
    """No control character but the CLI's own line feeds and tabs reaches the terminal."""
    found = sorted({f"U+{ord(c):04X}" for c in text if c in FORBIDDEN})
    assert not found, f"raw control characters {found} in {text!r}"


@fifo(queue="hooks-terminal", name="tests.terminal.explode", max_retries=0)
def explode(i: int) -> None:
    raise ValueError(ERROR)


@pytest.fixture
def hostile(redis_server: Any) -> Iterator[RedisQueueBackend]:
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=2, lease_ttl=1.5, poll_interval=0.1)
    failing = f"hooks-terminal#{HOSTILE}"
    backend.enqueue(failing, [(new_task_id(), TaskRecord(explode.name, [1], {}, key=HOSTILE))])
    with ThreadedWorker(backend, queues=["hooks-terminal"]):
        wait_until(lambda: backend.queue_info(failing)["dead"] == 1, message="the task was dead-lettered")
    # A queue named by a hostile stream, with a lease whose holder is hostile too.
    waiting = f"evil\x1b[2K\r#{HOSTILE}"
    backend.enqueue(waiting, [(new_task_id(), TaskRecord("tests.terminal.nothing", [], {}))])
    backend.client.set(backend.keys.stream(waiting).lease, f"7:host\x1b]0;x\x07/{HOSTILE}/n0nce", px=60_000)
    seconds, micros = backend.client.time()
    entry = {
        "host": f"h{HOSTILE}",
        "pid": 1,
        "driver": "threaded\x1b[2K",
        "concurrency": 1,
        "heartbeat_ms": 600_000,
        "held": [failing],
        "seen_ms": seconds * 1000 + micros // 1000,
    }
    backend.client.hset(backend.keys.replicas, f"r{HOSTILE}", json.dumps(entry))
    yield backend
    backend.close()


def run(backend: RedisQueueBackend, *args: str) -> Any:
    result = CliRunner().invoke(main, ["--redis", backend.url, "--prefix", backend.keys.prefix, *args])
    assert result.exit_code == 0, result.output
    assert_inert(result.stdout)
    assert_inert(result.stderr)
    return result


SHOWN = "c\\x1b]0;pwned\\x07\\x1b[2K\\r\\x1b]52;c;aGVsbG8=\\x07\\x9b31m\\x85\\x7f\\x00\\n\\tfake\\u202e"


def test_dlq_list_shows_keys_and_errors_escaped(hostile: RedisQueueBackend) -> None:
    result = run(hostile, "dlq", "list")
    assert result.stdout.split() == ["hooks-terminal", "1"]
    result = run(hostile, "dlq", "list", "hooks-terminal")
    (line,) = result.stdout.splitlines()
    assert f"hooks-terminal#{SHOWN}" in line
    assert "boom\\x1b]0;owned\\x07\\r\\n2026-01-01 00:00:00 [error    ] forged\\x1b[2K" in line


def test_dlq_list_json_keeps_the_exact_data_escaped_by_the_encoder(hostile: RedisQueueBackend) -> None:
    result = run(hostile, "dlq", "list", "hooks-terminal", "--json")
    (row,) = map(json.loads, result.stdout.splitlines())
    assert row["stream"] == f"hooks-terminal#{HOSTILE}" and row["error"] == ERROR


def test_dlq_show_escapes_every_field_and_keeps_only_the_tracebacks_own_lines(hostile: RedisQueueBackend) -> None:
    (letter,) = hostile.dead_letters(f"hooks-terminal#{HOSTILE}")
    result = run(hostile, "dlq", "show", "hooks-terminal", str(letter.task_id))
    lines = result.stdout.splitlines()
    assert f"stream: hooks-terminal#{SHOWN}" in lines
    assert any(line.startswith("error: builtins.ValueError: boom\\x1b]0;owned\\x07\\r\\n2026") for line in lines)
    traceback = lines[lines.index("traceback:") + 1 :]
    assert traceback[0] == "  Traceback (most recent call last):"
    # Every line of the traceback is indented: none can pass for a field or a line of its own.
    assert traceback and all(line.startswith("  ") for line in traceback), traceback
    assert any("forged\\x1b[2K" in line for line in traceback)


def test_status_shows_queue_names_streams_and_holders_escaped(hostile: RedisQueueBackend) -> None:
    result = run(hostile, "status")
    assert "evil\\x1b[2K\\r\t" in result.stdout
    result = run(hostile, "status", "--streams")
    row = next(line for line in result.stdout.splitlines() if line.startswith("evil"))
    assert row.startswith(f"evil\\x1b[2K\\r#{SHOWN}\t") and len(row.split("\t")) == 11
    assert "host\\x1b]0;x\\x07/" in row
    result = run(hostile, "status", "--streams", "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert f"evil\x1b[2K\r#{HOSTILE}" in {r["stream"] for r in rows}


def test_replicas_shows_registry_entries_escaped(hostile: RedisQueueBackend) -> None:
    result = run(hostile, "replicas")
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("rc")]
    assert row.startswith(f"r{SHOWN}\th{SHOWN}\t1\tthreaded\\x1b[2K\t")
    assert row.endswith(f"hooks-terminal#{SHOWN}") and len(row.split("\t")) == 7


def test_what_an_operator_acts_on_is_echoed_escaped(hostile: RedisQueueBackend) -> None:
    waiting = f"evil\x1b[2K\r#{HOSTILE}"
    result = run(hostile, "queue", "skip", waiting)
    assert result.stdout.startswith("dead-lettered ")
    result = run(hostile, "dlq", "requeue", "hooks-terminal", "--stream", HOSTILE)
    assert result.stdout.strip() == "requeued 1"
    result = CliRunner().invoke(main, ["--redis", hostile.url, "--prefix", hostile.keys.prefix, "status", "x\x1b[2K"])
    assert result.exit_code != 0 and "x\\x1b[2K" in result.stderr
    assert_inert(result.stderr)


def test_schedules_list_shows_a_hostile_record_escaped(hostile: RedisQueueBackend) -> None:
    """A schedule record anyone could write: its name (in the shard's index), rule, stream and
    the replica that fired it last, each carrying control sequences."""
    keys = hostile.keys
    name = f"s{HOSTILE}"
    shard = keys.shard_of("hooks-terminal")
    hostile.client.sadd(keys.schedules(shard), name)
    hostile.client.hset(
        keys.schedule_record(shard, name),
        mapping={"rule": f"every{HOSTILE}", "stream": f"hooks-terminal#{HOSTILE}", "by": f"r{HOSTILE}", "last": 1},
    )
    result = run(hostile, "schedules", "list")
    assert_inert(result.stdout)
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("s")]
    assert row.startswith(f"s{SHOWN}\thooks-terminal\tevery{SHOWN}\t") and len(row.split("\t")) == 12
    result = run(hostile, "schedules", "list", "--json")
    assert_inert(result.stdout)
    assert json.loads(result.stdout)["fired_by"] == f"r{HOSTILE}"
