"""Flask: ``PyfiqExtension`` reads ``app.config`` (refusing what cannot work), runs an embedded
worker from the first request a process serves (never in a CLI command), and ``flask pyfiq
worker`` is ``pyfiq worker`` configured by the app, run here as a real process."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from pyfiq import RedisQueueBackend, Registry
from pyfiq.contrib.flask import PyfiqExtension, read_config
from pyfiq.errors import ConfigurationError
from pyfiq_harness.servers import popen
from tests.contrib.apps.steps import read_journal
from tests.support.frameworks import APP_SETTINGS, APPS, app_env, per_stream, python
from tests.support.helpers import FAST, unique_prefix, wait_until


@pytest.mark.parametrize(
    ("config", "refusal"),
    [
        ({"PYFIQ_URL": "redis://h", "PYFIQ_LEASETTL": 3}, "PYFIQ_LEASETTL (did you mean PYFIQ_LEASE_TTL?)"),
        ({"PYFIQ_URL": "redis://h", "PYFIQ_WORKERS": "embedded"}, "did you mean PYFIQ_WORKER?"),
        ({}, "set PYFIQ_URL"),
        ({"PYFIQ_URL": "redis://h", "PYFIQ_WORKER": "threads"}, "PYFIQ_WORKER must be None"),
        ({"PYFIQ_URL": "redis://h", "PYFIQ_QUEUES": "billing"}, "PYFIQ_QUEUES must be a list"),
        ({"PYFIQ_URL": "redis://h", "PYFIQ_CONCURRENCY": 0}, "PYFIQ_CONCURRENCY must be"),
        ({"PYFIQ_URL": "redis://h", "PYFIQ_STOP_TIMEOUT": -1}, "PYFIQ_STOP_TIMEOUT must be"),
        ({"PYFIQ_URL": "redis://h", "PYFIQ_LEASE_TTL": "5"}, "lease_ttl must be a number of seconds"),
        ({"PYFIQ_URL": "redis://h", "PYFIQ_BACKEND": RedisQueueBackend("redis://h")}, "drop PYFIQ_URL"),
        ({"PYFIQ_BACKEND": "redis://h"}, "PYFIQ_BACKEND must be a RedisQueueBackend"),
    ],
)
def test_what_app_config_gets_wrong_is_refused_naming_the_key(config: dict[str, Any], refusal: str) -> None:
    app = Flask(__name__)
    app.config.update(config)
    with pytest.raises(ConfigurationError, match=re.escape(refusal)):
        PyfiqExtension(app, registry=Registry())


def test_settings_come_from_the_keys_and_a_given_backend_keeps_its_redis() -> None:
    state = read_config({"PYFIQ_URL": "redis://h:1/2", "PYFIQ_PREFIX": "shop", "PYFIQ_LEASE_TTL": 9.0}, Registry())
    assert (state.backend.settings.prefix, state.backend.settings.lease_ttl, state.embedded) == ("shop", 9.0, None)
    given = RedisQueueBackend("memory://flask-given")
    state = read_config({"PYFIQ_BACKEND": given, "PYFIQ_PREFIX": "other"}, Registry())
    assert state.backend.url == given.url and state.backend.settings.prefix == "other"


@pytest.fixture
def flask_app(redis_server: Any) -> Iterator[tuple[Flask, PyfiqExtension, list[tuple[str, int]]]]:
    prefix, registry, ran = unique_prefix(), Registry(), []
    app = Flask(__name__)
    app.config.update(PYFIQ_URL=redis_server.url, PYFIQ_PREFIX=prefix, PYFIQ_WORKER="embedded", PYFIQ_CONCURRENCY=2)
    app.config.update({f"PYFIQ_{k.upper()}": v for k, v in FAST.items()})
    ext = PyfiqExtension(app, registry=registry)

    @registry.fifo(queue="orders", name="flask.tests.ship", key=lambda order, step: order)
    def ship(order: str, step: int) -> None:
        ran.append((order, step))

    @app.post("/orders/<order>/<int:step>")
    def post(order: str, step: int) -> dict[str, str]:
        return {"task": ship(order, step).id}

    yield app, ext, ran
    assert ext.stop_worker(5, app=app)
    ext.state(app).backend.close()


def test_the_first_request_starts_the_embedded_worker_and_cli_commands_do_not(
    flask_app: tuple[Flask, PyfiqExtension, list[tuple[str, int]]],
) -> None:
    app, ext, ran = flask_app
    result = app.test_cli_runner().invoke(args=["pyfiq", "worker", "--help"])
    assert result.exit_code == 0, result.output
    prefix = app.config["PYFIQ_PREFIX"]
    assert f"[default: {prefix}]" in result.output, "the app's configuration is the command's defaults"
    with app.app_context():
        assert ext.worker is None, "no worker runs before a request: not for --help, not for a command"
    client = app.test_client()
    for step in range(8):
        for order in ("o-1", "o-2"):
            assert client.post(f"/orders/{order}/{step}").status_code == 200
    with app.app_context():
        running = ext.worker
        assert running is not None and running.healthy
        assert ext.start_worker() is running, "started once per process"
    wait_until(lambda: len(ran) == 16, message="the 16 tasks")
    assert per_stream([(o, s, 0) for o, s in ran]) == {"o-1": list(range(8)), "o-2": list(range(8))}


def test_without_the_embedded_mode_no_worker_runs_in_the_web_process(redis_server: Any) -> None:
    app = Flask(__name__)
    app.config.update(PYFIQ_URL=redis_server.url, PYFIQ_PREFIX=unique_prefix())
    ext = PyfiqExtension(app, registry=Registry())
    app.test_client().get("/")
    assert ext.worker is None
    with pytest.raises(ConfigurationError, match='PYFIQ_WORKER = "embedded"'):
        ext.start_worker()
    assert ext.stop_worker()
    ext.backend.close()
    with pytest.raises(ConfigurationError, match="call init_app"):
        PyfiqExtension(registry=Registry()).state()


def test_flask_pyfiq_worker_runs_the_apps_tasks_and_stops_on_sigterm(redis_server: Any, tmp_path: Path) -> None:
    prefix = unique_prefix()
    argv = [python(), "-m", "flask", "--app", "flask_app", "pyfiq", "worker", "--concurrency", "3"]
    proc = popen(argv, cwd=APPS, env=app_env(redis_server.url, prefix), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline()]
        while "ready" not in lines[-1] and lines[-1] and len(lines) < 20:
            lines.append(proc.stderr.readline())
        (started,) = [line for line in lines if "pyfiq.worker_started" in line]
        # The prefix comes from the app's config, the concurrency from the command line.
        assert f"prefix={prefix}" in started and "concurrency=3" in started, started
        registry = Registry()
        backend = RedisQueueBackend(redis_server.url, prefix=prefix, **APP_SETTINGS)  # type: ignore[arg-type]
        registry.configure(backend)
        step = registry.fifo(queue="jobs", name="apps.step", key=lambda stream, seq: stream)(lambda stream, seq: None)
        for stream in ("a", "b", "c"):
            step.enqueue_many([(stream, seq) for seq in range(10)])
        wait_until(lambda: len(read_journal(redis_server.url, prefix)) == 30, message="the 30 steps")
        rows = read_journal(redis_server.url, prefix)
        assert per_stream(rows) == {s: list(range(10)) for s in "abc"}
        assert {pid for _, _, pid in rows} == {proc.pid}
        proc.send_signal(signal.SIGTERM)
        tail = proc.stderr.read()
        assert proc.wait(10) == 0
        assert "pyfiq.worker_stopping signal=SIGTERM" in tail and "clean=True" in tail, tail
        backend.close()
    finally:
        proc.kill()
        proc.wait(5)
