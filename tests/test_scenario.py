"""The fault-injection scenario runner (pyfiq/runner.py), its proxy (pyfiq/faults.py) and its
checker.

``test_short_profile`` runs the whole short profile: real redis-server with AOF, four replica
processes (threaded and asyncio) each behind its own fault proxy, three producer processes
enqueuing concurrently to the same queues, and every fault kind; then asserts the checker's
verdict and that each fault really happened. The soak profile runs only with PYFIQ_SOAK=1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from pyfiq.faults import FaultProxy
from pyfiq.runner import EXECUTIONS, FAULT_KINDS, FAULTS, PROFILES, run_scenario, verify
from tests.conftest import RedisServer

# -- the proxy ---------------------------------------------------------------------------------


def _client(url: str, timeout: float = 2.0) -> redis.Redis:
    # No redis-py retries: each call shows what the network did to it.
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=None)


def test_proxy_cut_resets_connections_and_refuses_new_ones_until_heal(redis_server: RedisServer) -> None:
    with FaultProxy(redis_server.port) as proxy:
        client = _client(proxy.url)
        assert client.ping() is True
        assert proxy.connections == 1

        proxy.cut()
        assert proxy.connections == 0
        with pytest.raises(redis.ConnectionError):
            client.ping()  # the pooled connection was reset
        fresh = _client(proxy.url)
        with pytest.raises(redis.ConnectionError):
            fresh.ping()  # a new connection is reset as soon as it is accepted
        reply = b"not reset"
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as raw:
                raw.sendall(b"PING\r\n")
                reply = raw.recv(64)
        except (ConnectionResetError, BrokenPipeError):
            reply = b""
        assert reply == b"", "a raw connection got an answer through a cut proxy"
        assert proxy.stats.reset_on_accept >= 2

        proxy.heal()
        assert client.ping() is True  # redis-py reconnects through the healed proxy
        assert fresh.ping() is True
        client.set("faults:cut", "ok")
        assert redis_server.client().get("faults:cut") == b"ok"  # really reached that Redis
        client.close()
        fresh.close()


def test_proxy_blackhole_times_out_and_heal_resets_broken_connections(redis_server: RedisServer) -> None:
    with FaultProxy(redis_server.port) as proxy:
        client = _client(proxy.url, timeout=0.3)
        assert client.ping() is True
        other = _client(proxy.url, timeout=5)
        assert other.ping() is True

        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started >= 0.25
        assert proxy.stats.bytes_dropped > 0

        # A request lost in the blackhole leaves its connection out of step: heal resets it,
        # so the waiting client fails at once instead of reading a stale reply later.
        errors: list[BaseException] = []

        def waiting() -> None:
            try:
                other.ping()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=waiting)
        t.start()
        time.sleep(0.2)
        healed_at = time.monotonic()
        proxy.heal()
        t.join(5)
        assert not t.is_alive()
        assert errors and isinstance(errors[0], redis.ConnectionError)
        assert time.monotonic() - healed_at < 2.0, "the broken connection was not reset on heal"

        assert client.ping() is True
        assert other.ping() is True
        client.close()
        other.close()


def test_proxy_delay_delivers_late_and_in_order(redis_server: RedisServer) -> None:
    with FaultProxy(redis_server.port) as proxy:
        client = _client(proxy.url)
        client.ping()
        proxy.delay(0.15)
        started = time.monotonic()
        pipe = client.pipeline(transaction=False)
        for i in range(50):
            pipe.rpush("faults:delay", i)
        pipe.lrange("faults:delay", 0, -1)
        *_, values = pipe.execute()
        took = time.monotonic() - started
        assert [int(v) for v in values] == list(range(50))
        assert 0.3 <= took < 2.0, took  # 0.15 s each way
        proxy.heal()
        started = time.monotonic()
        client.ping()
        assert time.monotonic() - started < 0.1
        client.delete("faults:delay")
        client.close()


def test_proxy_is_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(1, "10.1.2.3")
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(1, "127.0.0.1", listen_host="0.0.0.0")


# -- the checker -------------------------------------------------------------------------------


def _write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _synthetic_run(tmp_path: Path, *, tamper: str | None = None) -> Path:
    """Two producers interleaving on one queue, one replica running everything in order."""
    run = tmp_path / (tamper or "clean")
    run.mkdir()
    accepted: dict[str, list[dict[str, Any]]] = {"p1": [], "p2": []}
    executions: list[dict[str, Any]] = []
    t = 1000.0
    for n in range(6):
        producer = "p1" if n % 2 == 0 else "p2"
        seq = (1 if producer == "p1" else 2) * 10_000_000 + n
        accepted[producer].append(
            {
                "queue": "scenario-a",
                "seq": seq,
                "task_id": f"t{n}",
                "status": "accepted",
                "order": [int(t * 1e6), n + 1],
                "sent": t - 0.001,
                "t": t,
                "attempts": 1,
                "producer": producer,
            }
        )
        run_ = {"queue": "scenario-a", "seq": seq, "task_id": f"t{n}", "replica": "replica-1", "pid": 10}
        run_ |= {"fence": 5, "deliveries": 1, "attempt": 1}
        executions.append({**run_, "event": "start", "t": t + 0.5})
        executions.append({**run_, "event": "end", "t": t + 0.52})
        t += 0.1
    if tamper == "lost":
        executions = [e for e in executions if not (e["task_id"] == "t3" and e["event"] == "end")]
    elif tamper == "order":
        executions[2]["t"], executions[4]["t"] = executions[4]["t"], executions[2]["t"]
        executions[3]["t"], executions[5]["t"] = executions[5]["t"], executions[3]["t"]
    elif tamper == "rerun":  # a task runs twice with no fault to explain it
        again = {**executions[2], "pid": 11, "replica": "replica-2", "fence": 6, "deliveries": 2}
        executions += [{**again, "t": t + 5}, {**again, "event": "end", "t": t + 5.02}]
    elif tamper == "overlap":  # another process runs the queue meanwhile under an older lease
        other = {**executions[4], "pid": 12, "replica": "replica-3", "fence": 4, "task_id": "x", "seq": 99}
        other["t"] = executions[4]["t"] + 0.005
        executions.append(other)
    for producer, lines in accepted.items():
        _write(run / f"accepted-{producer}.jsonl", lines)
    _write(run / EXECUTIONS, executions)
    return run


@pytest.mark.parametrize(
    ("tamper", "breach"),
    [
        (None, None),
        ("lost", "accepted tasks lost"),
        ("order", "broke acceptance order"),
        ("rerun", "re-executions with no crash or lease loss"),
        ("overlap", "not explained by a lapsed lease"),
    ],
)
def test_checker_finds_each_breach(tmp_path: Path, tamper: str | None, breach: str | None) -> None:
    run = _synthetic_run(tmp_path, tamper=tamper)
    verdict = verify(run, lease_ttl=1.0, poll_interval=0.2)
    assert verdict.stats["producers"] == 2
    assert verdict.stats["producer_interleavings"] == 5
    if breach is None:
        assert verdict.ok, verdict.text()
        assert verdict.stats["first_executions"] == 6
    else:
        assert not verdict.ok
        assert any(breach in b for b in verdict.breaches), verdict.breaches
    # The compose checker's command: its exit status is the verdict.
    proc = subprocess.run(
        [sys.executable, "-m", "pyfiq.runner", "check", "--offline", "--dir", str(run), "--lease-ttl", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == (0 if breach is None else 1), proc.stdout + proc.stderr
    assert ("verdict: PASS" if breach is None else "verdict: FAIL") in proc.stdout


def test_checker_explains_a_rerun_by_a_fault_on_that_replica(tmp_path: Path) -> None:
    run = _synthetic_run(tmp_path, tamper="rerun")
    fault = {"kind": "kill", "target": "replica-1", "pid": 10, "mid_task": False, "t": 1001.5, "t_end": 1001.6}
    _write(run / FAULTS, [fault])
    verdict = verify(run, lease_ttl=1.0, poll_interval=0.2)
    assert verdict.ok, verdict.text()
    assert verdict.stats["reexecutions"] == 1
    assert verdict.stats["reexecutions_by_cause"] == {"kill": 1}


# -- whole scenarios ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_short_profile(tmp_path: Path) -> None:
    """Every fault kind against a live fleet; the checker must find no breach."""
    profile = PROFILES["short"]
    started = time.monotonic()
    result = run_scenario(profile, run_dir=tmp_path / "run", seed=3, echo=lambda line: None)
    wall = time.monotonic() - started
    verdict = result.verdict
    stats = verdict.stats
    print(verdict.text())
    assert verdict.ok, verdict.text()
    assert wall < 80, f"the short profile took {wall:.1f}s"

    faults = stats["faults"]
    for kind in FAULT_KINDS:
        assert faults.get(kind, 0) >= 1, f"fault {kind} never happened: {faults}"
    assert faults["graceful-stop"] == profile.replicas, "the rolling restart did not stop every replica"
    redis_faults = {(r["kind"], r["appendfsync"]) for r in stats["redis_losses"]}
    assert {("redis-restart", "everysec"), ("redis-crash", "everysec"), ("redis-crash", "always")} <= redis_faults
    assert stats["producers"] == profile.producers
    assert stats["producer_interleavings"] > 0, "producers never enqueued to one queue concurrently"
    assert stats["accepted"] > 500

    assert stats["lost"] == 0
    assert stats["order_violations"] == 0
    assert stats["overlaps_unexplained"] == 0
    assert stats["reexecutions_unexplained"] == 0
    assert stats["first_executions"] == stats["accepted"]
    # Replica faults landed mid-task, and each interrupted task ran again first.
    assert stats["faults_mid_task"] >= 3
    assert stats["interrupted_rerun_first"] >= 3
    assert stats["reexecutions"] >= stats["interrupted_rerun_first"]
    # Takeover waits out the lease (it cannot be faster than a heartbeat short of the TTL),
    # and stays within TTL + poll + slack; a graceful stop hands over at once.
    assert profile.lease_ttl * 0.7 <= stats["takeover_median"] <= stats["takeover_max"] <= stats["takeover_bound"]
    # (measured only where the stopped replica's queue had a next task waiting at the stop)
    assert stats["handoff_max"] is None or stats["handoff_max"] < profile.lease_ttl / 2
    assert stats["throughput_tasks_per_s"] > 20
    assert (result.run_dir / "verdict.json").exists()


@pytest.mark.soak
@pytest.mark.skipif(os.environ.get("PYFIQ_SOAK") != "1", reason="soak test: set PYFIQ_SOAK=1 (30 minutes)")
@pytest.mark.timeout(int(float(os.environ.get("PYFIQ_SOAK_SECONDS", "1800"))) + 600)
def test_soak_profile(tmp_path: Path) -> None:
    """The soak profile: random faults on two lanes for PYFIQ_SOAK_SECONDS (default 1800 s)."""
    profile = PROFILES["soak"]
    seconds = float(os.environ.get("PYFIQ_SOAK_SECONDS", profile.duration))
    result = run_scenario(dataclasses.replace(profile, duration=seconds), run_dir=tmp_path / "soak")
    verdict = result.verdict
    print(verdict.text())
    assert verdict.ok, verdict.text()
    faults = verdict.stats["faults"]
    assert sum(faults.values()) >= seconds / 3, faults
    for kind in ("kill", "stop", "cut", "blackhole"):
        assert faults.get(kind, 0) >= 1, faults
    assert verdict.stats["lost"] == 0
