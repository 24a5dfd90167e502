"""Redis topologies started from the one ``redis-server`` binary, on free loopback ports: a
Redis Cluster (primaries with one replica each), a primary with replicas, a Sentinel-managed
primary with a replica and three sentinels, and a TLS server whose certificates are made here
with openssl.

Each owns its processes and directories and stops them all; nothing here touches a server it
did not start."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, cast

import redis

from .servers import Node, command, free_ports, wait_for


class Cluster:
    """A Redis Cluster of ``primaries`` primaries with one replica each, created with
    ``redis-cli --cluster create``. Ready means every node says ``cluster_state:ok`` and every
    replica's link to its primary is up."""

    def __init__(self, directory: Path, primaries: int = 3, node_timeout_ms: int = 2000) -> None:
        ports = free_ports(primaries * 2, bus=True)
        self.nodes = [
            Node(
                directory / str(p),
                p,
                [
                    "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf",
                    "--cluster-node-timeout", str(node_timeout_ms), "--save", "", "--appendonly", "no",
                ],
            )
            for p in ports
        ]  # fmt: skip
        self.primaries = primaries

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            wait_for(node.answers, 15, f"cluster node {node.port}")
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_ready()
        return self

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            for node in self.live():
                c = node.client()
                try:
                    if c.cluster("info")["cluster_state"] != "ok":
                        return False
                    info = c.info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        return False
                finally:
                    c.close()
            return True

        wait_for(ready, timeout, "the cluster to be ready")

    def primary_of(self, key: str) -> Node:
        """The node serving ``key``'s slot now."""
        c = self.live()[0].client()
        try:
            slot = int(c.cluster("keyslot", key))
            for start, end, primary, *_ in command(c, "CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        finally:
            c.close()
        raise RuntimeError(f"no node serves {key!r}")

    def replica_of(self, primary: Node) -> Node:
        """The live node replicating ``primary`` now."""
        c = primary.client()
        try:
            info = c.info("replication")
        finally:
            c.close()
        ports = {int(v["port"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)}
        return next(n for n in self.live() if n.port in ports)

    def role(self, node: Node) -> str:
        c = node.client()
        try:
            return str(c.info("replication")["role"])
        finally:
            c.close()

    def node_id(self, node: Node) -> str:
        c = node.client()
        try:
            return str(command(c, "CLUSTER", "MYID").decode())
        finally:
            c.close()

    def primaries_now(self) -> list[Node]:
        """The live nodes serving as primaries now (a failover swaps roles)."""
        return [n for n in self.live() if self.role(n) == "master"]

    def slot_owner(self, slot: int, timeout: float = 15) -> Node:
        """The primary every live node agrees serves ``slot`` (``CLUSTER NODES``), once they
        agree (gossip spreads a change within a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._agreed_owner(slot)
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def _agreed_owner(self, slot: int) -> Node:
        owners = set()
        for node in self.live():
            c = node.client()
            try:
                listing = command(c, "CLUSTER", "NODES")
            finally:
                c.close()
            text = listing.decode() if isinstance(listing, bytes) else str(listing)
            for line in text.splitlines():
                fields = line.split()
                if "master" not in fields[2]:
                    continue
                for spec in fields[8:]:
                    if spec.startswith("["):
                        continue  # a slot being migrated or imported: not ownership
                    start, _, end = spec.partition("-")
                    if int(start) <= slot <= int(end or start):
                        owners.add(int(fields[1].split(":")[1].split("@")[0]))
        if len(owners) != 1:
            raise redis.RedisError(f"the nodes do not agree on who serves slot {slot}: {sorted(owners)}")
        port = owners.pop()
        return next(n for n in self.nodes if n.port == port)

    def _setslot(self, node: Node, slot: int, *args: str) -> None:
        c = node.client()
        try:
            command(c, "CLUSTER", "SETSLOT", slot, *args)
        finally:
            c.close()

    def begin_move(self, slot: int, target: Node) -> Node:
        """Mark ``slot`` ``IMPORTING`` on ``target`` and ``MIGRATING`` on its owner, which is
        returned: from now on the owner answers ``ASK`` for keys it no longer has, and
        ``TRYAGAIN`` for a command whose keys the two nodes share out."""
        source = self.slot_owner(slot)
        self._setslot(target, slot, "IMPORTING", self.node_id(source))
        self._setslot(source, slot, "MIGRATING", self.node_id(target))
        return source

    def migrate(self, source: Node, target: Node, keys: list[str] | list[bytes]) -> None:
        c = source.client()
        try:
            command(c, "MIGRATE", "127.0.0.1", target.port, "", 0, 1000, "KEYS", *keys)
        finally:
            c.close()

    def move_slot(self, slot: int, target: Node, *, batch: int = 10, over: float = 0.0) -> int:
        """Move ``slot`` to the primary ``target`` as ``redis-cli --cluster reshard`` does:
        ``begin_move``, ``MIGRATE`` of its keys ``batch`` at a time (spread over about ``over``
        seconds, however many keys the slot holds, so clients meet ``ASK`` meanwhile), then
        ``SETSLOT NODE`` on every primary. Returns the number of keys moved. Finishes a move
        ``begin_move`` started; a slot already on ``target`` is only made stable again (what a
        half-done move back leaves behind)."""
        if self.slot_owner(slot) is target:
            for node in self.primaries_now():
                self._setslot(node, slot, "STABLE")
            return 0
        source = self.begin_move(slot, target)
        target_id = self.node_id(target)
        moved = 0
        c = source.client()
        try:
            batches = -(-int(command(c, "CLUSTER", "COUNTKEYSINSLOT", slot)) // batch)
            pause = over / max(1, batches)
            while keys := command(c, "CLUSTER", "GETKEYSINSLOT", slot, batch):
                self.migrate(source, target, keys)
                moved += len(keys)
                time.sleep(pause)
        finally:
            c.close()
        # The target first, then the source (redis-cli's order): no moment where neither node
        # claims the slot; then the other primaries, rather than waiting for gossip.
        for node in [target, source, *(n for n in self.primaries_now() if n not in (source, target))]:
            self._setslot(node, slot, "NODE", target_id)
        wait_for(lambda: self.slot_owner(slot, timeout=0) is target, 15, f"every node to see slot {slot} moved")
        return moved

    def errorstats(self, node: Node) -> dict[str, int]:
        """``INFO errorstats`` counts by error code (``MOVED``, ``ASK``, ``TRYAGAIN``...)."""
        c = node.client()
        try:
            info = c.info("errorstats")
        finally:
            c.close()
        return {k.removeprefix("errorstat_"): int(v["count"]) for k, v in info.items()}

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(kill=True)


class Replicated:
    """A primary and ``replicas`` replicas of it, without Sentinel: what durable mode waits on."""

    def __init__(self, directory: Path, replicas: int = 1) -> None:
        ports = free_ports(1 + replicas)
        # Redis delays a replica's first full sync by 5 s by default, waiting for others to join.
        plain = ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        self.primary = Node(directory / "primary", ports[0], plain)
        self.replicas = [
            Node(directory / f"replica-{p}", p, [*plain, "--replicaof", "127.0.0.1", str(ports[0])]) for p in ports[1:]
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.primary.port}/0"

    def start(self) -> Replicated:
        for node in (self.primary, *self.replicas):
            node.start()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        def linked() -> bool:
            for node in self.replicas:
                c = node.client()
                try:
                    if c.info("replication").get("master_link_status") != "up":
                        return False
                finally:
                    c.close()
            return True

        wait_for(linked, timeout, "every replica linked to the primary")

    def stop(self) -> None:
        for node in (self.primary, *self.replicas):
            if node.alive:
                node.resume()
            node.stop(kill=True)


class Sentinels:
    """One primary, one replica and three sentinels (quorum 2) watching them as ``mymaster``.
    Ready means every sentinel knows the replica and the two other sentinels, so a failover
    can be voted on at once."""

    SERVICE = "mymaster"

    def __init__(self, directory: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        data_ports = free_ports(2)
        plain = ["--save", "", "--appendonly", "no"]
        self.primary = Node(directory / "primary", data_ports[0], plain)
        self.replica = Node(
            directory / "replica", data_ports[1], [*plain, "--replicaof", "127.0.0.1", str(data_ports[0])]
        )
        self.sentinels = []
        for port in free_ports(3):
            d = directory / f"sentinel-{port}"
            d.mkdir(parents=True)
            conf = d / "sentinel.conf"
            conf.write_text(
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {data_ports[0]} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} {down_after_ms}\n"
                f"sentinel failover-timeout {self.SERVICE} {failover_timeout_ms}\n"
            )
            self.sentinels.append(Node(d, port, ["--sentinel"], config=conf))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def start(self) -> Sentinels:
        for node in (self.primary, self.replica, *self.sentinels):
            node.start()
        self.wait_ready()
        return self

    def master(self) -> dict[str, Any]:
        c = self.sentinels[0].client()
        try:
            return dict(cast("dict[str, Any]", c.sentinel_master(self.SERVICE)))
        finally:
            c.close()

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            for s in self.sentinels:
                c = s.client()
                try:
                    m = cast("dict[str, Any]", c.sentinel_master(self.SERVICE))
                    if m["num-other-sentinels"] != 2 or m["num-slaves"] < 1 or "s_down" in m["flags"]:
                        return False
                finally:
                    c.close()
            r = self.replica.client()
            try:
                return bool(r.info("replication").get("master_link_status") == "up")
            finally:
                r.close()

        wait_for(ready, timeout, "the sentinels to know the primary, its replica and each other")

    def primary_port(self) -> int:
        return int(self.master()["port"])

    def stop(self) -> None:
        for node in (*self.sentinels, self.primary, self.replica):
            node.stop(kill=True)


class TLSFiles:
    """A CA, a server certificate for 127.0.0.1 (in its subjectAltName, which redis-py checks)
    and a client certificate, made with openssl."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca, self.ca_key = self.dir / "ca.crt", self.dir / "ca.key"
        self.server_cert, self.server_key = self.dir / "server.crt", self.dir / "server.key"
        self.client_cert, self.client_key = self.dir / "client.crt", self.dir / "client.key"

    def make(self) -> TLSFiles:
        self._openssl(
            "req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2",
            "-keyout", self.ca_key, "-out", self.ca, "-subj", "/CN=pyfiq test CA",
        )  # fmt: skip
        self._sign("server", self.server_cert, self.server_key, "subjectAltName=IP:127.0.0.1")
        self._sign("client", self.client_cert, self.client_key, "extendedKeyUsage=clientAuth")
        return self

    @staticmethod
    def _openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    def _sign(self, name: str, cert: Path, key: Path, extension: str) -> None:
        csr, ext = self.dir / f"{name}.csr", self.dir / f"{name}.ext"
        ext.write_text(extension + "\n")
        self._openssl(
            "req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", key, "-out", csr, "-subj", f"/CN=pyfiq {name}"
        )
        self._openssl(
            "x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext,
        )  # fmt: skip

    def server_args(self, port: int) -> list[str]:
        return [
            "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.server_cert),
            "--tls-key-file", str(self.server_key), "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes",
        ]  # fmt: skip

    def client_options(self) -> dict[str, Any]:
        files = {"ssl_ca_certs": self.ca, "ssl_certfile": self.client_cert, "ssl_keyfile": self.client_key}
        return {k: str(v) for k, v in files.items()}
