"""The operator CLI through click's runner, against a real redis-server holding tasks in several
states: pending, dead-lettered on several keyed streams, paused."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from click.testing import CliRunner

import pyfiq
from pyfiq import RedisQueueBackend, fifo
from pyfiq.ops.cli import main
from pyfiq.task import TaskRecord, new_task_id
from tests.support.helpers import unique_prefix


@pytest.fixture
def deployment(redis_server: Any) -> Any:
    """8 shards (not the default 16, so a tool must read the layout), a keyed queue with dead
    letters on two streams and pending work on a third, and a plain queue."""
    backend = RedisQueueBackend(redis_server.url, prefix=unique_prefix(), shards=8, lease_ttl=1.5)
    pyfiq.configure(backend)
    ids: dict[str, list[str]] = {}
    for key in ("c-1", "c-2"):
        ids[key] = [new_task_id() for _ in range(2)]
        backend.enqueue(f"hooks#{key}", [(i, TaskRecord("app.deliver", [key], {})) for i in ids[key]], expires_in=0.001)
    backend.enqueue("hooks#c-3", [(new_task_id(), TaskRecord("app.deliver", ["c-3"], {}))])
    backend.enqueue("billing", [(new_task_id(), TaskRecord("app.charge", [1], {}))])
    time.sleep(0.01)  # past the 1 ms deadlines
    for key in ("c-1", "c-2"):  # a claim dead-letters the expired tasks
        stream = f"hooks#{key}"
        backend.call(backend.ops.acquire(stream, 5))
    yield backend, ids
    backend.close()


def run(backend: RedisQueueBackend, *args: str, input: str | None = None) -> Any:
    # --redis and --prefix at group level, no --shards: the layout is read from Redis.
    return CliRunner().invoke(
        main, ["--redis", backend.url, "--prefix", backend.keys.prefix, *args], input=input, catch_exceptions=False
    )


def test_dlq_list_covers_every_stream_of_a_keyed_queue(deployment: Any) -> None:
    backend, ids = deployment
    result = run(backend, "dlq", "list")
    assert result.exit_code == 0 and result.output.split() == ["hooks", "4"]
    result = run(backend, "dlq", "list", "hooks", "--json")
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert sorted(r["task_id"] for r in rows) == sorted(ids["c-1"] + ids["c-2"])
    assert {r["reason"] for r in rows} == {"expired"} and {r["stream"] for r in rows} == {"hooks#c-1", "hooks#c-2"}
    result = run(backend, "dlq", "list", "hooks", "--stream", "c-2", "--json")
    assert sorted(json.loads(line)["task_id"] for line in result.output.splitlines()) == sorted(ids["c-2"])


def test_dlq_show_and_a_wrong_id_or_queue_fail_clearly(deployment: Any) -> None:
    backend, ids = deployment
    result = run(backend, "dlq", "show", "hooks", ids["c-2"][1])
    assert result.exit_code == 0 and "reason: expired" in result.output and "hooks#c-2" in result.output
    result = run(backend, "dlq", "show", "hooks", "f" * 32)
    assert result.exit_code == 1 and f"no dead letter {'f' * 32} in hooks" in result.output
    result = run(backend, "dlq", "requeue", "nosuchqueue")
    assert result.exit_code == 1 and "unknown queue 'nosuchqueue'" in result.output
    result = run(backend, "dlq", "requeue", "billing")
    assert result.exit_code == 1 and "no dead letters for billing" in result.output
    result = run(backend, "dlq", "requeue", "hooks", "--task-id", "f" * 32)
    assert result.exit_code == 1 and "no dead letter" in result.output


def test_dlq_requeue_count_takes_the_oldest_of_the_queue_or_of_each_stream(deployment: Any) -> None:
    """--count N is the N oldest dead letters of the queue, whatever stream holds them (c-1's
    died first here); --per-stream makes it N of each."""
    backend, _ = deployment
    result = run(backend, "dlq", "requeue", "hooks", "--count", "1")
    assert result.exit_code == 0 and result.output.strip().endswith("requeued 1"), result.output
    assert [backend.queue_info(f"hooks#{k}")["dead"] for k in ("c-1", "c-2")] == [1, 2]
    assert backend.queue_info("hooks#c-1")["pending"] == 1
    result = run(backend, "dlq", "requeue", "hooks", "--count", "1", "--per-stream")
    assert result.exit_code == 0 and result.output.strip().endswith("requeued 2"), result.output
    assert [backend.queue_info(f"hooks#{k}")["dead"] for k in ("c-1", "c-2")] == [0, 1]
    result = run(backend, "dlq", "requeue", "hooks", "--count", "0")
    assert result.exit_code == 2, "a count below one is refused, not read as 'all'"


def test_dlq_requeue_and_purge_work_on_the_whole_queue(deployment: Any) -> None:
    backend, _ = deployment
    result = run(backend, "dlq", "requeue", "hooks", "--stream", "c-1")
    assert result.exit_code == 0 and result.output.strip().endswith("requeued 2")
    assert backend.queue_info("hooks#c-1")["pending"] == 2 and backend.queue_info("hooks#c-2")["dead"] == 2
    result = run(backend, "dlq", "purge", "hooks", input="n\n")
    assert "Delete 2 dead letters of hooks (" in result.output and backend.queue_info("hooks#c-2")["dead"] == 2
    result = run(backend, "dlq", "purge", "hooks", "--yes")
    assert result.exit_code == 0 and "deleted 2" in result.output and backend.dead_letter_streams() == []


def test_status_per_queue_and_per_stream(deployment: Any) -> None:
    backend, _ = deployment
    backend.pause("billing")
    result = run(backend, "status", "--json")
    rows = {r["queue"]: r for r in map(json.loads, result.output.splitlines())}
    assert rows["hooks"]["dead"] == 4 and rows["hooks"]["pending"] == 1 and rows["hooks"]["streams"] == 3
    assert rows["billing"]["paused"] and rows["billing"]["pending"] == 1
    assert rows["billing"]["oldest_age_s"] is not None and rows["billing"]["oldest_age_s"] >= 0
    result = run(backend, "status", "hooks", "--streams")
    assert result.exit_code == 0 and "hooks#c-3" in result.output and "billing" not in result.output


def test_tools_read_the_shard_layout_instead_of_guessing(deployment: Any) -> None:
    backend, _ = deployment
    # With the default 16 shards a tool would look for hooks#c-1 in another shard and miss it.
    result = run(backend, "status", "--json")
    assert {json.loads(line)["queue"] for line in result.output.splitlines()} == {"hooks", "billing"}


def test_an_unreachable_redis_is_one_line_and_a_non_zero_exit() -> None:
    result = CliRunner().invoke(main, ["--redis", "redis://:hunter2@127.0.0.1:1/0", "status"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Error: " in result.output
    assert "hunter2" not in result.output


def test_every_error_line_names_the_server_it_asked_and_says_when_it_was_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pyfiq.ops import cli

    result = CliRunner().invoke(main, ["--redis", "redis://:hunter2@127.0.0.1:1/0", "dlq", "list", "billing"])
    assert result.exit_code == 1 and "[Redis at redis://:***@127.0.0.1:1/0]" in result.output, result.output
    assert "default" not in result.output
    # Nothing given: the default is asked, and the line says so (a free port stands for it here).
    monkeypatch.delenv("PYFIQ_REDIS_URL", raising=False)
    monkeypatch.setattr(cli, "DEFAULT_URL", "redis://127.0.0.1:1/0")
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "[Redis at redis://127.0.0.1:1/0]" in result.output
    assert "neither --redis nor $PYFIQ_REDIS_URL was given" in result.output


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and pyfiq.__version__ in result.output


def test_an_enqueue_through_fifo_shows_up(deployment: Any) -> None:
    backend, _ = deployment

    @fifo(queue="shown", name="tests.cli.shown")
    def shown() -> None:
        pass

    shown()
    result = run(backend, "status", "shown", "--json")
    (row,) = map(json.loads, result.output.splitlines())
    assert row["queue"] == "shown" and row["pending"] == 1


# -- names Redis has never seen ------------------------------------------------------------------


def run_with_password(backend: RedisQueueBackend, port: int, *args: str) -> Any:
    """The test server's default user has no password, so any password is accepted: the URL
    carries one only to show it never appears in the message."""
    url = f"redis://default:hunter2-secret@127.0.0.1:{port}/0"
    return CliRunner().invoke(main, ["--redis", url, "--prefix", backend.keys.prefix, *args])


@pytest.mark.parametrize(
    "args",
    [
        ["status", "nosuch"],
        ["status", "nosuch", "--streams"],
        ["queue", "pause", "nosuch"],
        ["queue", "resume", "nosuch"],
        ["queue", "skip", "nosuch"],
        ["dlq", "list", "nosuch"],
        ["dlq", "show", "nosuch", "f" * 32],
        ["dlq", "requeue", "nosuch"],
        ["dlq", "purge", "nosuch", "--yes"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_an_unknown_queue_is_one_line_naming_it_and_the_server_and_a_non_zero_exit(
    deployment: Any, redis_server: Any, args: list[str]
) -> None:
    backend, _ = deployment
    result = run_with_password(backend, redis_server.port, *args)
    assert result.exit_code == 1 and result.stdout == "", result.output
    (line,) = result.stderr.splitlines()
    assert "unknown queue 'nosuch'" in line and f"redis://default:***@127.0.0.1:{redis_server.port}/0" in line
    assert "hunter2-secret" not in result.output
    assert backend.paused() == [], "nothing was paused"


@pytest.mark.parametrize(
    "args",
    [
        ["queue", "pause", "hooks", "--stream", "c-9"],
        ["queue", "resume", "hooks", "--stream", "c-9"],
        ["queue", "skip", "hooks#c-9"],
        ["dlq", "list", "hooks", "--stream", "c-9"],
        ["dlq", "requeue", "hooks", "--stream", "c-9"],
        ["dlq", "purge", "hooks", "--stream", "c-9", "--yes"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_an_unknown_stream_of_a_known_queue_is_an_error(deployment: Any, redis_server: Any, args: list[str]) -> None:
    backend, _ = deployment
    result = run_with_password(backend, redis_server.port, *args)
    assert result.exit_code == 1 and result.stdout == "", result.output
    (line,) = result.stderr.splitlines()
    assert "unknown stream 'hooks#c-9'" in line and f"127.0.0.1:{redis_server.port}" in line
    assert backend.paused() == []


def test_force_pauses_a_queue_before_its_first_task(deployment: Any) -> None:
    backend, _ = deployment
    result = run(backend, "queue", "pause", "fresh", "--force")
    assert result.exit_code == 0 and "paused fresh" in result.output and backend.paused() == ["fresh"]
    result = run(backend, "queue", "pause", "hooks", "--stream", "c-9", "--force")
    assert result.exit_code == 0 and "hooks#c-9" in backend.paused()
    # A paused queue is one Redis knows: resuming it needs no --force.
    result = run(backend, "queue", "resume", "fresh")
    assert result.exit_code == 0 and backend.paused() == ["hooks#c-9"]
    result = run(backend, "status", "fresh")
    assert result.exit_code == 1 and "unknown queue 'fresh'" in result.output


def test_a_queue_that_ran_and_drained_is_still_known(deployment: Any) -> None:
    from pyfiq.testing import drain

    backend, _ = deployment

    @fifo(queue="drained", name="tests.cli.drained")
    def drained() -> None:
        pass

    drained()
    drain(backend, ["drained"])
    assert "drained" not in {s.split("#")[0] for s in backend.active_streams()}
    result = run(backend, "status", "drained", "--json")
    assert result.exit_code == 0, result.output
    (row,) = map(json.loads, result.output.splitlines())
    assert row["queue"] == "drained" and row["pending"] == 0 and row["streams"] == 0
    result = run(backend, "queue", "pause", "drained")
    assert result.exit_code == 0 and backend.paused() == ["drained"]
