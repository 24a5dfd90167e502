"""pyfiq.contrib.django in a real Django project (tests/contrib/django_project), on SQLite and on
a private PostgreSQL server: enqueue on commit (sent at the commit, in call order, never after a
rollback or a savepoint's rollback, loud when Redis is down at the commit), ``manage.py
pyfiq_worker`` as a real process, and the embedded worker (in the serving processes of gunicorn
--preload, never in ``migrate``).

The Django side runs in processes of its own (``manage.py`` of the test project), so Django's
settings never reach the rest of the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from pyfiq import RedisQueueBackend
from pyfiq_harness.servers import free_port
from tests.support.helpers import lines_until, wait_until
from tests.support.postgres import PostgresServer
from tests.support.servers import RedisServer

PROJECT = Path(__file__).parent / "django_project"


@dataclass
class Site:
    """The test project on one database, with a Redis key prefix of its own."""

    redis_url: str
    db: str
    directory: Path
    prefix: str = field(default_factory=lambda: f"dj{uuid.uuid4().hex[:8]}")
    pyfiq: dict[str, Any] = field(default_factory=dict)
    log: bool = False

    def env(self, **pyfiq: Any) -> dict[str, str]:
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "djsite.settings",
            "TEST_DB": self.db,
            "TEST_OTHER_DB": str(self.directory / "other.sqlite3"),
            "TEST_REDIS": self.redis_url,
            "TEST_PREFIX": self.prefix,
            "TEST_PYFIQ": json.dumps({**self.pyfiq, **pyfiq}),
            "TEST_LOG": "1" if self.log else "",
        }

    def manage(self, *args: str, timeout: float = 60, **pyfiq: Any) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=PROJECT,
            env=self.env(**pyfiq),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"manage.py {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def popen(self, *cmd: str, **pyfiq: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(cmd, cwd=PROJECT, env=self.env(**pyfiq), stderr=subprocess.PIPE, text=True)

    def journal(self) -> list[dict[str, Any]]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return [json.loads(e) for e in client.lrange(f"{self.prefix}:journal", 0, -1)]
        finally:
            client.close()

    def backend(self) -> RedisQueueBackend:
        return RedisQueueBackend(self.redis_url, prefix=self.prefix, shards=4)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()


def sqlite_site(redis_server: RedisServer, directory: Path) -> Site:
    return Site(redis_server.url, f"sqlite:{directory / 'db.sqlite3'}", directory)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def site(request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Site:
    directory = tmp_path_factory.mktemp(f"django-{request.param}")
    if request.param == "sqlite":
        made = sqlite_site(redis_server, directory)
    else:
        pg: PostgresServer = request.getfixturevalue("postgres")
        made = Site(redis_server.url, f"postgres:127.0.0.1:{pg.port}:{pg.create_database()}:{pg.user}", directory)
    made.manage("migrate", "-v0")
    made.manage("migrate", "-v0", "--database", "other")
    return made


@dataclass
class Run:
    results: dict[str, Any]
    journal: list[dict[str, Any]]
    worker_exit: int
    worker_log: list[str]


@pytest.fixture(scope="module")
def run(site: Site) -> Run:
    """A ``manage.py pyfiq_worker`` process runs the ``orders`` queue while ``manage.py
    scenarios`` runs every scenario; then the worker gets SIGTERM."""
    worker = site.popen(sys.executable, "manage.py", "pyfiq_worker", "--log-format", "json", "--concurrency", "1")
    try:
        started = lines_until(worker, "ready")
        results = json.loads(site.manage("scenarios").stdout)
        labels = {"commit", "early", "eager", "drained"}
        wait_until(lambda: labels <= {e["label"] for e in site.journal()}, message="the record tasks ran")
        worker.send_signal(signal.SIGTERM)
        stopped = lines_until(worker, "pyfiq.worker_stopped", timeout=15)
        code = worker.wait(15)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    return Run(results, site.journal(), code, started + stopped)


def entry(run: Run, label: str) -> dict[str, Any]:
    (found,) = [e for e in run.journal if e["label"] == label]
    return found


def test_a_task_called_in_a_transaction_is_sent_at_its_commit_and_finds_its_row(run: Run) -> None:
    commit = run.results["commit"]
    assert commit["state_inside"] == "unknown", "not sent while the transaction was open"
    ran = entry(run, "commit")
    assert ran["id"] == commit["id"] and ran["order"] == commit["order"]
    assert ran["found"] is True, "the worker read the row the transaction committed"
    # The control: sent at once (on_commit=False), the same task ran before the commit and
    # did not find its row; so the check above can fail.
    assert entry(run, "early")["found"] is False


def test_a_rolled_back_transaction_sends_nothing(run: Run) -> None:
    rollback = run.results["rollback"]
    assert rollback["held"] == [rollback["after"]], "only the call made after the rollback was sent"


def test_a_call_under_a_savepoint_that_rolls_back_is_dropped_while_the_outer_commits(run: Run) -> None:
    savepoints = run.results["savepoints"]
    assert savepoints["before_commit"] == []
    assert savepoints["held"] == savepoints["expected"], "the released savepoint's call kept its place"


def test_calls_are_sent_in_call_order_one_round_trip_per_stream(run: Run) -> None:
    order = run.results["order"]
    assert order["held_one"] == order["one"], "201 calls (enqueue_many among them) in call order"
    assert order["held_other"] == order["other"]
    assert order["round_trips_of_one_commit"] == [201, 3], "one script call per stream at the commit"
    assert order["held_two"] == order["two"], "two transactions, one after the other"


def test_outside_a_transaction_a_call_is_sent_at_once_and_on_commit_false_opts_out(run: Run) -> None:
    autocommit = run.results["autocommit"]
    assert autocommit["state"] == "pending"
    assert autocommit["held_inside"] == [autocommit["id"], autocommit["opted_out"]]


def test_a_call_under_set_autocommit_false_raises_and_on_commit_false_sends_at_once(run: Run) -> None:
    manual = run.results["manual_transaction"]
    assert "atomic" in manual["error"] or "on_commit" in manual["error"], manual
    assert manual["held"] == [manual["now"]], "only the call sent at once is in Redis"


def test_delay_counts_from_the_commit_and_dedup_is_matched_at_the_commit(run: Run) -> None:
    result = run.results["from_the_commit"]
    assert "crashed" not in result, result
    # Sent at the commit, after leaving_at: due a second after that, not after the call.
    assert result["due"] >= result["leaving_at"] + 1000, result
    assert result["leaving_at"] - result["called_at"] >= 500, "the commit came well after the call"
    assert result["again"] != result["first"], "the handle names the id the call made"
    assert result["held_dedup"] == [result["first"]], "Redis kept the first task only"


def test_redis_down_at_the_commit_raises_from_the_commit_naming_every_task(run: Run) -> None:
    down = run.results["redis_down"]
    assert down["committed"] is True, "the data is committed: Redis and the database do not commit together"
    assert down["partial"] is True, down
    assert "IS committed" in down["message"]
    for task_id in down["ids"]:
        assert task_id in down["message"], "every task the commit could not send is named"
    third = down["ids"][2]
    assert third in down["unsent"], "the later batch (another savepoint), which Django does not run, too"


def test_a_call_waits_for_every_database_in_a_transaction(run: Run) -> None:
    two = run.results["two_databases"]
    assert two["after_other_commit"] == [], "the default database's transaction was still open"
    assert two["sent_after_both"] == [two["both"]]
    assert two["held"] == [two["both"]], "rolled back on the other database: never sent"


def test_another_applications_callback_raising_first_leaves_the_tasks_unsent_and_its_error_shown(run: Run) -> None:
    result = run.results["foreign_callback"]
    assert result["error"] == "another application's callback", result
    assert result["held"] == [], "Django ran no callback after the one that raised"
    assert result["partial"] == "PartialEnqueueError", result
    assert result["first"] in result["unsent"] and result["later"] in result["unsent"], result
    assert result["later"] in result["message"], "the task behind the other callback is named too"


def test_an_async_enqueue_follows_its_own_threads_transaction(run: Run) -> None:
    result = run.results["asynchronous"]
    assert result["held_while_open"] == [result["async"]], "the event loop's thread has no transaction"
    assert result["held"] == [result["async"], result["sync"]], "the sync call waited for its commit"


def test_eager_runs_at_the_call_and_drain_runs_what_a_commit_sent(run: Run) -> None:
    helpers = run.results["testing_helpers"]
    assert helpers["ran"] == ["eager", "inside:0"], helpers
    assert helpers["deferrer"] == "CommitDeferrer", "the helpers left the integration in place"
    assert entry(run, "eager")["found"] is True
    drained = entry(run, "drained")
    assert drained["found"] is True and drained["replica"] != entry(run, "commit")["replica"]


def test_captured_on_commit_callbacks_send_each_time_as_in_a_django_testcase(run: Run) -> None:
    case = run.results["test_case"]
    assert case["first"] == [case["a"]]
    assert case["second"] == [case["a"], case["b"]], "a call after a captured commit is sent by the next"


def test_manage_py_pyfiq_worker_runs_the_tasks_and_stops_cleanly_on_sigterm(run: Run, site: Site) -> None:
    (started,) = [json.loads(line) for line in run.worker_log if "pyfiq.worker_started" in line]
    assert started["prefix"] == site.prefix and started["queues"] == "orders", "settings.PYFIQ's defaults"
    assert started["concurrency"] == 1, "the command line's option over CONCURRENCY"
    assert entry(run, "commit")["replica"] == started["replica"]
    assert any("pyfiq.worker_stopped" in line for line in run.worker_log)
    assert run.worker_exit == 0


def test_a_worker_thread_gets_a_fresh_database_connection_for_each_task(run: Run, site: Site) -> None:
    if not site.db.startswith("postgres"):
        return  # SQLite has no server process to tell connections apart
    by_thread: dict[int, list[int]] = {}
    for e in run.journal:
        if e["replica"] != "eager" and e["db_pid"] is not None and e["pid"] != os.getpid():
            by_thread.setdefault(e["thread"], []).append(e["db_pid"])
    pairs = [pids for pids in by_thread.values() if len(pids) > 1]
    assert pairs, by_thread
    assert all(len(set(pids)) == len(pids) for pids in pairs), "CONN_MAX_AGE=0: closed after each task"


def test_the_embedded_worker_starts_in_a_serving_process_never_in_migrate(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    site = sqlite_site(redis_server, tmp_path)
    site.pyfiq = {"EMBEDDED_WORKER": True}
    state = json.loads(site.manage("probe").stdout)
    assert state["after_migrate"] == {"configured": True, "replica": None, "threads": []}
    served = state["after_request"]
    assert served["replica"] is not None and "pyfiq-dispatch" in served["threads"], "the control: it can start"
    assert state["stopped"] is True


def test_an_embedded_worker_that_cannot_start_is_logged_once_and_the_request_is_served(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    site = sqlite_site(redis_server, tmp_path)
    site.log = True
    wrong = redis_server.url.replace("redis://", "redis://nobody:s3cret@")
    probe = site.manage("probe", EMBEDDED_WORKER=True, URL=wrong)
    assert "s3cret" not in probe.stdout + probe.stderr, "the password shows nowhere"
    state = json.loads(probe.stdout)
    assert state["after_request"]["replica"] is None and "nobody:***@" in state["backend"]
    (failed,) = [line for line in probe.stderr.splitlines() if "pyfiq.embedded_worker_failed" in line]
    assert "refused pyfiq" in failed and "nobody:***@" in failed


def test_under_gunicorn_preload_each_serving_process_runs_its_own_worker_and_the_master_none(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    site = sqlite_site(redis_server, tmp_path)
    site.pyfiq = {"EMBEDDED_WORKER": True}
    site.manage("migrate", "-v0")
    backend = site.backend()
    try:
        port = free_port()
        server = site.popen(
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "djsite.wsgi:application",
        )
        try:
            lines_until(server, "Booting worker", timeout=20)
            answers = []
            for i in range(6):
                wait_until(lambda: _port_open(port), message="gunicorn listens")
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/order?label=g{i}", timeout=10) as response:
                    answers.append(json.loads(response.read()))
            wait_until(lambda: len([e for e in site.journal() if e["label"].startswith("g")]) == 6, message="ran")
            served_by = {a["pid"] for a in answers}
            assert server.pid not in served_by
            for a in answers:
                assert f":{a['pid']}:" in a["replica"], "the worker of the process that served the request"
            ran = [e for e in site.journal() if e["label"].startswith("g")]
            assert all(e["found"] for e in ran) and {e["pid"] for e in ran} <= served_by
            registered = lambda: {r["pid"] for r in backend.replicas(include_silent=True)}  # noqa: E731
            wait_until(lambda: served_by <= registered(), message="the serving processes' heartbeats")
            assert server.pid not in registered(), "no worker in the pre-fork master, which started first"
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(20) == 0
    finally:
        backend.close()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
