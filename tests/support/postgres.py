"""A private PostgreSQL server for the tests: ``initdb`` into a directory of its own and
``pg_ctl`` on a free loopback port, never a server that already runs. initdb refuses to run as
root, so as root the server runs as the ``postgres`` user (``runuser -u postgres --``)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from pyfiq_harness.servers import free_port


def postgres_bin() -> Path:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest version."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not versions:
        pytest.fail("PostgreSQL (initdb, pg_ctl) is not installed: run scripts/test.sh, which installs it")
    return Path(versions[-1]).parent


class PostgresServer:
    """``start()`` makes the cluster and starts the server (trust authentication, no fsync: a
    test database); ``stop()`` stops it at once and removes its files."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.port = free_port()
        self.user = "postgres"
        # Not under pytest's directory: its parents are private to root, and the server may run
        # as the postgres user, who must reach its own directory.
        self.directory = Path(tempfile.mkdtemp(prefix="pyfiq-pg-"))
        self.data = self.directory / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            account = pwd.getpwnam("postgres")
            os.chown(self.directory, account.pw_uid, account.pw_gid)

    def _run(self, *cmd: str) -> None:
        result = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}")

    def start(self) -> PostgresServer:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust", "--no-sync")
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.directory / "server.log")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        return self

    def create_database(self) -> str:
        """A new, empty database of the server; its name."""
        import psycopg

        name = f"t{uuid.uuid4().hex[:10]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return name

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
