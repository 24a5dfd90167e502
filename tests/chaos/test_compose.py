"""docker-compose.yml, validated without a Docker engine.

The file is parsed with PyYAML and checked for what ``docker compose up --scale app=5`` needs:
the services, their healthchecks and depends_on conditions, no fixed container name or host
port on the scalable app, and commands that exist: each one's ``--help`` runs in a subprocess,
its arguments are parsed by the very click command the image runs, and the app's command is
the one the process-based scenario runner builds (``pyfiq_harness.fleet.replica_argv``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from pyfiq.ops.cli import main as pyfiq_cli
from pyfiq.ops.scenario_tasks import QUEUES
from pyfiq_harness.cli import cli as runner_cli
from pyfiq_harness.fleet import replica_argv
from tests.support.servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENTRY_POINTS: dict[tuple[str, ...], click.Group] = {
    ("python", "-m", "pyfiq"): pyfiq_cli,
    ("python", "-m", "pyfiq_harness"): runner_cli,
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    assert isinstance(command, list), "use the exec form: no shell between the signal and the process"
    return [str(c) for c in command]


def _split(command: list[str]) -> tuple[click.Group, str, list[str]]:
    """(click group, subcommand, its arguments) of a ``python -m ...`` command."""
    for prefix, group in ENTRY_POINTS.items():
        if tuple(command[: len(prefix)]) == prefix:
            sub, *args = command[len(prefix) :]
            return group, sub, args
    raise AssertionError(f"not a pyfiq entry point: {command}")


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_services_and_scalable_app(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "app", "producer", "checker"}
    app = services["app"]
    for key in ("container_name", "ports", "hostname"):
        assert key not in app, f"app sets {key}: `docker compose up --scale app=5` would clash"
    assert app["deploy"]["replicas"] == 3
    assert app["restart"] == "unless-stopped"
    assert app["stop_signal"] == "SIGTERM", "the first SIGTERM is pyfiq's graceful hand-off"
    for name, service in services.items():
        if "ports" in service:
            for port in service["ports"]:
                assert ":" not in str(port), f"{name} publishes a fixed host port {port}"
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            assert source in declared, f"{name} mounts undeclared volume {source}"


def test_redis_runs_with_aof_and_a_healthcheck(services: dict[str, Any]) -> None:
    redis_service = services["redis"]
    command = _command(redis_service)
    assert command[0] == "redis-server"
    assert _option(command, "--appendonly") == "yes"
    assert _option(command, "--appendfsync") in ("everysec", "always")
    assert redis_service["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "/data" in " ".join(redis_service["volumes"])


def test_depends_on_conditions(services: dict[str, Any]) -> None:
    expected = {
        "app": {"redis": "service_healthy"},
        "producer": {"redis": "service_healthy", "app": "service_healthy"},
        "checker": {"redis": "service_healthy", "app": "service_healthy", "producer": "service_completed_successfully"},
    }
    for name, deps in expected.items():
        got = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert got == deps, name
    # service_healthy needs a healthcheck on the service waited for.
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, it has no healthcheck"
    # One-shot services end; the checker's exit status is the verdict.
    for name in ("producer", "checker"):
        assert services[name]["restart"] == "no"
        assert "deploy" not in services[name]


def test_build_is_the_example_image_installing_pyfiq_with_pip(services: dict[str, Any]) -> None:
    for name in ("app", "producer", "checker"):
        build = services[name]["build"]
        assert (ROOT / build["context"]).resolve() == ROOT
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile == ROOT / "examples" / "compose" / "Dockerfile"
        assert services[name]["image"] == services["app"]["image"]
        env = services[name]["environment"]
        assert env["PYFIQ_REDIS_URL"] == "redis://redis:6379/0"
        assert env["PYFIQ_JOURNAL"].startswith("/journal/")
        assert "journal:/journal" in services[name]["volumes"]
    text = (ROOT / "examples" / "compose" / "Dockerfile").read_text()
    assert "pip install ." in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"


def test_commands_exist_and_parse(services: dict[str, Any]) -> None:
    commands = {name: _command(services[name]) for name in ("app", "producer", "checker")}
    commands["app healthcheck"] = [str(c) for c in services["app"]["healthcheck"]["test"][1:]]
    assert services["app"]["healthcheck"]["test"][0] == "CMD"
    for name, command in commands.items():
        group, sub, args = _split(command)
        assert sub in group.commands, f"{name}: no subcommand {sub!r}"
        # The arguments parse and convert with the very command the image runs...
        group.commands[sub].make_context(sub, list(args))
        # ...and the entry point answers --help as a process.
        argv = [sys.executable, *command[1 : command.index(sub) + 1], "--help"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{name}: {argv} failed:\n{proc.stderr}"
        assert "Usage:" in proc.stdout


def test_app_runs_what_the_scenario_runner_runs(services: dict[str, Any]) -> None:
    command = _command(services["app"])
    args = _split(command)[2]
    built = replica_argv(
        "redis://ignored",
        prefix=_option(args, "--prefix"),
        shards=int(_option(args, "--shards")),
        queues=list(QUEUES),
        lease_ttl=float(_option(args, "--lease-ttl")),
        poll_interval=float(_option(args, "--poll-interval")),
        max_deliveries=int(_option(args, "--max-deliveries")),
        concurrency=int(_option(args, "--concurrency")),
        driver=_option(args, "--driver"),
    )
    i = built.index("--redis")
    del built[i : i + 2]  # compose gives the URL through PYFIQ_REDIS_URL
    assert ["python", *built[1:]] == command

    producer = _split(_command(services["producer"]))[2]
    checker = _split(_command(services["checker"]))[2]
    for option in ("--prefix", "--shards"):
        assert _option(producer, option) == _option(checker, option) == _option(args, option)
    assert _option(producer, "--queues") == _option(args, "--queues")
    assert _option(checker, "--lease-ttl") == _option(args, "--lease-ttl")
    assert _option(checker, "--poll-interval") == _option(args, "--poll-interval")
    assert _option(producer, "--dir") == _option(checker, "--dir") == "/journal"


def test_app_healthcheck_tells_a_live_replica_from_anything_else(redis_server: RedisServer, tmp_path: Path) -> None:
    """The healthcheck command really runs: healthy for a replica process, unhealthy otherwise."""
    replica = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyfiq",
            "worker",
            "pyfiq_harness.replica",
            "--redis",
            redis_server.url,
            "--prefix",
            "health-check",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def health(pid: int, url: str = redis_server.url) -> int:
            argv = [sys.executable, "-m", "pyfiq_harness", "health", "--redis", url, "--pid", str(pid)]
            return subprocess.run(argv, capture_output=True, timeout=60).returncode

        deadline = time.monotonic() + 20
        while health(replica.pid) != 0:
            assert time.monotonic() < deadline, "a running replica never looked healthy"
            time.sleep(0.2)
        assert health(replica.pid, "redis://127.0.0.1:1/0") == 1, "Redis unreachable must be unhealthy"
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert health(sleeper.pid) == 1, "a process that is not a replica must be unhealthy"
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        replica.kill()
        replica.wait(10)
    assert health(replica.pid) == 1, "a dead replica must be unhealthy"
