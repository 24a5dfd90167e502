"""Connecting to Redis as production runs it: TLS with a client certificate, a unix socket, a
primary found through Sentinel, and a user with only the ACL docs/deployment.md gives. Each server
here is started by the test on free ports (certificates made with openssl), and the backend's
representative behaviour set (``tests/support/smoke.py``) runs over it, on both drivers."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from pyfiq import AccessDeniedError, BackendUnavailableError, RedisQueueBackend, fifo
from pyfiq.backend.connect import ACL_COMMANDS, acl_rules
from pyfiq.ops.cli import main
from pyfiq_harness.servers import Node, free_ports, wait_for
from pyfiq_harness.topologies import Sentinels, TLSFiles
from tests.support.helpers import unique_prefix
from tests.support.smoke import run_smoke, smoke_settings

DEPLOYMENT = Path(__file__).parents[2] / "docs" / "deployment.md"
LUA = Path(__file__).parents[2] / "pyfiq" / "engine" / "lua"
PASSWORD = "acl-pw-never-shown"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TLSFiles, int]]:
    """A redis-server that speaks only TLS and requires a client certificate."""
    files = TLSFiles(tmp_path_factory.mktemp("tls")).make()
    [port] = free_ports(1)
    node = Node(files.dir / "data", 0, [*files.server_args(port), "--save", "", "--appendonly", "no"]).start()
    probe = redis.Redis(host="127.0.0.1", port=port, ssl=True, **files.client_options())  # type: ignore[arg-type]
    wait_for(lambda: bool(probe.ping()), 15, "the TLS redis-server")
    probe.close()
    yield files, port
    node.stop(kill=True)


def test_tls_with_a_client_certificate_runs_the_behaviour_set_on_both_drivers(tls: tuple[TLSFiles, int]) -> None:
    files, port = tls
    url = f"rediss://127.0.0.1:{port}/0"
    backend = RedisQueueBackend(url, prefix=unique_prefix(), redis_options=files.client_options(), **smoke_settings())
    assert repr(backend) == f"RedisQueueBackend('{url}')"
    run_smoke(backend)
    backend.close()


def test_tls_without_the_client_certificate_is_refused_quickly(tls: tuple[TLSFiles, int]) -> None:
    files, port = tls
    backend = RedisQueueBackend(f"rediss://127.0.0.1:{port}/0", redis_options={"ssl_ca_certs": str(files.ca)})
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        backend.ping()
    # redis-py's own retries made a refused handshake take seconds; pyfiq sends it once.
    assert time.monotonic() - started < 2.0


def test_the_cli_takes_tls_files_at_group_level(tls: tuple[TLSFiles, int]) -> None:
    files, port = tls
    prefix = unique_prefix()
    url = f"rediss://127.0.0.1:{port}/0"
    tls_args = ["--tls-ca", str(files.ca), "--tls-cert", str(files.client_cert), "--tls-key", str(files.client_key)]
    result = CliRunner().invoke(
        main, ["--redis", url, "--prefix", prefix, *tls_args, "queue", "pause", "tls-q", "--force"]
    )
    assert result.exit_code == 0, result.output
    backend = RedisQueueBackend(url, prefix=prefix, redis_options=files.client_options())
    assert backend.paused() == ["tls-q"]
    refused = CliRunner().invoke(main, ["--redis", url, "--prefix", prefix, "--tls-ca", str(files.ca), "status"])
    assert refused.exit_code != 0


@pytest.fixture
def unix_socket() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="pyfiq-"))  # a socket path is limited to ~100 bytes
    sock = directory / "redis.sock"
    node = Node(directory, 0, ["--unixsocket", str(sock), "--unixsocketperm", "700", "--save", ""]).start()
    wait_for(lambda: bool(redis.Redis(unix_socket_path=str(sock)).ping()), 15, "the unix-socket redis-server")
    yield sock
    node.stop(kill=True)
    shutil.rmtree(directory, ignore_errors=True)


def test_a_unix_socket_url_runs_the_behaviour_set_on_both_drivers(unix_socket: Path) -> None:
    backend = RedisQueueBackend(f"unix://{unix_socket}?db=2", prefix=unique_prefix(), **smoke_settings())
    run_smoke(backend)
    assert backend.client.connection_pool.connection_kwargs["db"] == 2
    backend.close()


# -- Sentinel -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sentinels]:
    group = Sentinels(tmp_path_factory.mktemp("sentinel")).start()
    yield group
    group.stop()


def test_from_sentinel_runs_the_behaviour_set_on_both_drivers(sentinels: Sentinels) -> None:
    backend = RedisQueueBackend.from_sentinel(
        sentinels.addresses, Sentinels.SERVICE, prefix=unique_prefix(), **smoke_settings()
    )
    hosts = ",".join(f"127.0.0.1:{p}" for _, p in sentinels.addresses)
    assert repr(backend) == f"RedisQueueBackend('sentinel://{hosts}/mymaster')"
    run_smoke(backend)
    backend.close()


def test_the_cli_finds_the_primary_through_sentinel(sentinels: Sentinels) -> None:
    prefix = unique_prefix()
    given = [a for _, p in sentinels.addresses for a in ("--sentinel", f"127.0.0.1:{p}")]
    # The URL's host is not used with --sentinel: only its credentials, database and scheme.
    args = ["--redis", "redis://ignored.invalid:1/0", "--prefix", prefix, *given, "queue", "pause", "s-q", "--force"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    primary = redis.Redis(port=sentinels.primary_port())
    assert primary.smembers(f"{prefix}:{{s0}}:paused") == {b"s-q"}
    both = CliRunner().invoke(main, ["--cluster", *given, "status"])
    assert both.exit_code != 0 and "exclude each other" in both.output


# -- the minimal ACL ------------------------------------------------------------------------


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A redis-server whose default user is off; user ``app`` has exactly ``acl_rules``."""
    [port] = free_ports(1)
    prefix = unique_prefix()
    node = Node(tmp_path / "acl", port, ["--save", "", "--appendonly", "no"]).start()
    admin = node.client()
    wait_for(lambda: bool(admin.ping()), 15, "the ACL redis-server")
    admin.execute_command("ACL", "SETUSER", "app", "on", f">{PASSWORD}", *acl_rules(prefix).split())
    admin.execute_command("ACL", "SETUSER", "admin", "on", ">admin-pw", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    yield port, prefix
    node.stop(kill=True)


def test_a_user_with_exactly_the_documented_acl_runs_the_behaviour_set(acl_server: tuple[int, str]) -> None:
    port, prefix = acl_server
    backend = RedisQueueBackend(f"redis://app:{PASSWORD}@127.0.0.1:{port}/0", prefix=prefix, **smoke_settings())
    run_smoke(backend)
    admin = redis.Redis(port=port, username="admin", password="admin-pw")
    denied = [e for e in admin.acl_log() if e.get("username") == "app"]
    assert denied == [], f"the ACL refused pyfiq something: {denied}"
    backend.close()


def test_a_wrong_password_fails_at_once_without_showing_it(acl_server: tuple[int, str]) -> None:
    port, prefix = acl_server

    @fifo(queue="acl-q", name="acl.q")
    def noop() -> None: ...

    backend = RedisQueueBackend(f"redis://app:wrong-{PASSWORD}@127.0.0.1:{port}/0", prefix=prefix)
    started = time.monotonic()
    with pytest.raises(AccessDeniedError) as caught:
        backend.enqueue("acl-q", [])
    assert time.monotonic() - started < 2.0, "never retried"
    assert PASSWORD not in str(caught.value) and f"127.0.0.1:{port}" in str(caught.value)


def test_a_missing_permission_fails_at_once_with_a_clear_error(acl_server: tuple[int, str]) -> None:
    port, _ = acl_server
    # The right password, but a prefix outside the user's key pattern.
    backend = RedisQueueBackend(f"redis://app:{PASSWORD}@127.0.0.1:{port}/0", prefix=f"other{uuid.uuid4().hex[:6]}")

    @fifo(queue="acl-q2", name="acl.q2")
    def noop() -> None: ...

    import pyfiq

    pyfiq.configure(backend)
    started = time.monotonic()
    with pytest.raises(AccessDeniedError, match=r"refused pyfiq.*permission") as caught:
        noop()
    assert time.monotonic() - started < 2.0
    assert PASSWORD not in str(caught.value)


def test_the_acl_names_every_command_the_scripts_run_and_the_docs_show_it() -> None:
    used = {m.lower() for f in LUA.glob("*.lua") for m in re.findall(r"redis\.p?call\('([A-Za-z]+)'", f.read_text())}
    assert used <= set(ACL_COMMANDS), (
        f"add to ACL_COMMANDS (and docs/deployment.md): {sorted(used - set(ACL_COMMANDS))}"
    )
    page = " ".join(DEPLOYMENT.read_text().replace("\\\n", " ").split())
    assert acl_rules("pyfiq") in page


def test_messages_and_reprs_of_cluster_and_sentinel_backends_show_no_password() -> None:
    with pytest.raises(BackendUnavailableError) as caught:
        RedisQueueBackend(f"redis://app:{PASSWORD}@127.0.0.1:{free_ports(1)[0]}/0", cluster=True)
    assert PASSWORD not in str(caught.value) and "app:***@127.0.0.1" in str(caught.value)
    sentinel = RedisQueueBackend.from_sentinel(
        [f"127.0.0.1:{free_ports(1)[0]}"], "svc", redis_options={"password": PASSWORD}
    )
    assert PASSWORD not in repr(sentinel) and PASSWORD not in sentinel.address


def test_a_database_the_server_does_not_have_is_a_configuration_error_naming_it(redis_server: Any) -> None:
    import pyfiq
    from pyfiq import ConfigurationError

    backend = RedisQueueBackend(f"{redis_server.url.rsplit('/', 1)[0]}/99")
    registry = pyfiq.Registry()
    registry.configure(backend)

    @registry.fifo(queue="db99", name="db99.t")
    def t() -> None: ...

    with pytest.raises(ConfigurationError, match=r"has no database 99") as caught:
        t()
    assert "'databases' setting" in str(caught.value)
    backend.close()
    query = RedisQueueBackend(f"{redis_server.url.rsplit('/', 1)[0]}/0?db=98")  # the query wins, as in redis-py
    registry.configure(query)
    with pytest.raises(ConfigurationError, match=r"has no database 98"):
        t()
    query.close()


def test_a_refused_password_is_said_in_one_sentence() -> None:
    from pyfiq.backend import failures

    said = failures.translate(
        redis.AuthenticationError("invalid username-password pair or user is disabled."), "redis://:***@h:1/0"
    )
    assert isinstance(said, AccessDeniedError)
    assert "disabled. Check the password" in str(said) and ".." not in str(said)
