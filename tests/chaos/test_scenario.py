"""The fault-injection scenario runner (the harness distribution, ``pyfiq_harness``), its proxy
(``pyfiq_harness.proxy``) and its checker.

``test_short_profile`` runs the whole short profile: real redis-server with AOF, four replica
processes (threaded and asyncio) each behind its own fault proxy, three producer processes
enqueuing concurrently to the same queues, and the classic fault kinds; then asserts the
checker's verdict and that each fault really happened. The ``test_drill_*`` tests run one
newer fault kind each (vandal entries, replies slower than the lease, an asyncio stop that
times out in a live process, a task holding the GIL, a Redis clock set back) on a small
fleet; ``test_drill_operator`` an operator's skip, pause and requeue to the front against holders
with tasks taken ahead, and a worker stop that times out beside a SIGKILL. Every run's producers
delay a share of their tasks, and its replicas run a periodic schedule (their checks are in
``test_schedule_checks.py``). The soak profile runs only with PYFIQ_SOAK=1.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from pyfiq.ops.scenario_tasks import hold_gil
from pyfiq_harness.journal import DEAD_LETTERS, EXECUTIONS, FAULTS, read_lines
from pyfiq_harness.profiles import PROFILES
from pyfiq_harness.proxy import FaultProxy
from pyfiq_harness.scenario import Result, run_scenario
from pyfiq_harness.verdict import verify
from tests.support.servers import RedisServer

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


def fastest_ping(client: redis.Redis) -> float:
    took = []
    for _ in range(3):
        started = time.monotonic()
        client.ping()
        took.append(time.monotonic() - started)
    return min(took)


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
        # The fastest of three pings: one can stall on a loaded machine, a delay slows all three.
        assert fastest_ping(client) < 0.3
        client.delete("faults:delay")
        client.close()


def test_proxy_can_delay_replies_only(redis_server: RedisServer) -> None:
    """A reply-only delay: the command reaches Redis (and takes effect) at once, its reply
    comes late, as for a replica whose lease is granted long before it hears so."""
    with FaultProxy(redis_server.port) as proxy:
        client = _client(proxy.url, timeout=5)
        client.ping()
        direct = redis_server.client()
        direct.delete("faults:late")
        proxy.delay(0.6, direction="replies")
        assert proxy.delays == {"requests": 0.0, "replies": 0.6}
        done = threading.Event()
        started = time.monotonic()
        t = threading.Thread(target=lambda: (client.set("faults:late", "1"), done.set()))
        t.start()
        deadline = time.monotonic() + 0.4
        while direct.get("faults:late") is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert direct.get("faults:late") == b"1", "the request itself was held back"
        assert not done.is_set(), "the reply was not held back"
        t.join(5)
        assert done.is_set() and time.monotonic() - started >= 0.55
        proxy.heal()
        assert fastest_ping(client) < 0.6
        direct.delete("faults:late")
        direct.close()
        client.close()


def test_gil_hold_starves_every_other_thread() -> None:
    """The gil fault's task: while it runs, no other thread of the process (a heartbeat) does."""
    hold_gil(0.05)  # measure the rate first, outside the window below
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.002)

    t = threading.Thread(target=tick)
    t.start()
    time.sleep(0.05)
    started = time.monotonic()
    hold_gil(0.6)
    ended = time.monotonic()
    time.sleep(0.05)
    stop.set()
    t.join()
    # The hold's length follows a rate measured once; a CPU that speeds up later (frequency
    # scaling) shortens it. What matters is that nothing else ran while it lasted.
    assert ended - started >= 0.3
    inside = [x for x in ticks if started + 0.02 < x < ended - 0.02]
    assert inside == [], f"another thread ran {len(inside)} times while the GIL was held"


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
        [sys.executable, "-m", "pyfiq_harness", "check", "--offline", "--dir", str(run), "--lease-ttl", "1"],
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


def _journal_run(
    tmp_path: Path,
    executions: list[dict[str, Any]],
    faults: Sequence[dict[str, Any]] = (),
    *,
    accepted: list[dict[str, Any]] | None = None,
) -> Path:
    """A run directory from explicit lines: one queue, tasks #0..#n accepted in order at t=1000."""
    run = tmp_path / "run"
    run.mkdir()
    seqs = sorted({e["seq"] for e in executions})
    if accepted is None:
        accepted = [
            {"queue": "scenario-a", "seq": s, "task_id": f"t{s}", "status": "accepted", "order": [int(1e9) + i, i + 1]}
            | {"sent": 1000.0 + i / 1000, "t": 1000.0 + i / 1000, "attempts": 1, "producer": "p1"}
            for i, s in enumerate(seqs)
        ]
    _write(run / "accepted-p1.jsonl", accepted)
    _write(run / EXECUTIONS, executions)
    if faults:
        _write(run / FAULTS, list(faults))
    return run


def _runs(*spec: tuple[str, int, int, str, float, float]) -> list[dict[str, Any]]:
    """(replica, pid, fence, seq, start, end) -> start and end lines on scenario-a."""
    lines = []
    for replica, pid, fence, seq, start, end in spec:
        base = {"queue": "scenario-a", "seq": seq, "task_id": f"t{seq}", "replica": replica, "pid": pid}
        base |= {"fence": fence, "deliveries": 1, "attempt": 1}
        lines += [{**base, "event": "start", "t": start}, {**base, "event": "end", "t": end}]
    return lines


def test_checker_flags_a_start_on_a_lapsed_lease_unless_the_process_was_frozen(tmp_path: Path) -> None:
    # replica-2 took the queue over (fence 7) and ran #1; replica-1 then starts #1 under its
    # older lease (fence 6) while replica-2 runs #2: a reply that came too late.
    executions = _runs(
        ("replica-1", 10, 5, 0, 1001.0, 1001.1),
        ("replica-2", 11, 7, 1, 1003.0, 1003.1),
        ("replica-2", 11, 7, 2, 1003.2, 1004.0),
        ("replica-1", 10, 6, 1, 1003.5, 1003.6),
    )
    slow = {"kind": "slow-reply", "target": "replica-1", "pid": 10, "t": 1001.5, "t_end": 1005.0, "seconds": 2.0}
    verdict = verify(_journal_run(tmp_path, executions, [slow]), lease_ttl=1.0, poll_interval=0.2)
    assert not verdict.ok
    assert any("fencing token lower than one already started" in b for b in verdict.breaches), verdict.breaches
    assert any("not explained by a lapsed lease" in b for b in verdict.breaches), verdict.breaches
    assert verdict.stats["stale_starts"] == 1

    # The same lines after a SIGSTOP of replica-1: a frozen process cannot check its lease.
    stop = {"kind": "stop", "target": "replica-1", "pid": 10, "mid_task": False, "t": 1001.5, "t_end": 1003.4}
    other = tmp_path / "stopped"
    other.mkdir()
    verdict = verify(_journal_run(other, executions, [stop]), lease_ttl=1.0, poll_interval=0.2)
    assert verdict.ok, verdict.text()
    assert verdict.stats["stale_starts_after_a_pause"] == 1


def test_checker_flags_a_lease_given_up_under_a_task_still_running_after_a_stop(tmp_path: Path) -> None:
    executions = _runs(
        ("replica-1", 10, 5, 0, 1001.0, 1003.5),  # the slow sync task, still running after stop()
        ("replica-2", 11, 6, 0, 1001.4, 1003.9),  # redelivered while it runs
    )
    drill = {"kind": "async-stop", "target": "replica-1", "pid": 10, "mid_task": True, "t": 1001.05}
    drill |= {"queue": "scenario-a", "seq": 0, "task_id": "t0", "hold": 2.5, "t_exit": 1005.0, "t_end": 1005.5}
    verdict = verify(_journal_run(tmp_path, executions, [drill]), lease_ttl=1.0, poll_interval=0.2)
    assert not verdict.ok
    assert any("the lease was given up under a running task" in b for b in verdict.breaches), verdict.breaches

    # Held until the task ended, then redelivered: what a stop that times out must do.
    later = tmp_path / "later"
    later.mkdir()
    executions = _runs(("replica-1", 10, 5, 0, 1001.0, 1003.5), ("replica-2", 11, 6, 0, 1003.6, 1003.7))
    verdict = verify(_journal_run(later, executions, [drill]), lease_ttl=1.0, poll_interval=0.2)
    assert verdict.ok, verdict.text()
    assert verdict.stats["reexecutions_by_cause"] == {"async-stop": 1}


def _dead(queue: str, reason: str, raw: bytes, seq: int | None = None) -> dict[str, Any]:
    header = json.dumps({"reason": reason}).encode()
    return {"queue": queue, "reason": reason, "seq": seq, "raw": (header + b"\n" + raw).hex()}


@pytest.mark.parametrize(
    ("filed", "breach"),
    [
        ("undecodable", None),
        ("poison", "not as undecodable"),
        (None, "not in the dead letters"),
    ],
)
def test_checker_requires_each_vandal_entry_dead_lettered_as_undecodable(
    tmp_path: Path, filed: str | None, breach: str | None
) -> None:
    entries = [b"vandal-x", b"\xff\xfe\x00vandal", b"0" * 32 + b"|zz|0|{}"]
    vandal = {"kind": "vandal", "target": "scenario-a", "t": 1001.5, "t_end": 1001.5}
    vandal["entries"] = [e.hex() for e in entries]
    executions = _runs(("replica-1", 10, 5, 0, 1001.0, 1001.1), ("replica-1", 10, 5, 1, 1001.6, 1001.7))
    accepted = [
        {"queue": "scenario-a", "seq": s, "task_id": f"t{s}", "status": "accepted", "order": [int(t * 1e6), s + 1]}
        | {"sent": t, "t": t, "attempts": 1, "producer": "p1"}
        for s, t in ((0, 1000.9), (1, 1001.55))
    ]
    run = _journal_run(tmp_path, executions, [vandal], accepted=accepted)
    dead = [_dead("scenario-a", filed, e) for e in entries] if filed else []
    verdict = verify(run, lease_ttl=1.0, poll_interval=0.2, dead_letters=dead)
    assert verdict.stats["vandal_entries"] == 3
    assert verdict.stats["vandal_stall_max"] == pytest.approx(0.05, abs=0.01)
    if breach is None:
        assert verdict.ok, verdict.text()
    else:
        assert any(breach in b for b in verdict.breaches), verdict.breaches


@pytest.mark.parametrize(("reason", "ok"), [("lease-lost", True), ("poison", False), (None, False)])
def test_checker_requires_a_gil_holding_task_dead_lettered_but_not_as_poison(
    tmp_path: Path, reason: str | None, ok: bool
) -> None:
    # Each run froze its process past the lease; the next holder ran it again meanwhile.
    executions = _runs(("replica-1", 10, 5, 0, 1001.0, 1003.5), ("replica-2", 11, 6, 0, 1002.1, 1004.6))
    gil = {"kind": "gil", "target": "scenario-a", "t": 1000.9, "t_end": 1005.0, "seconds": 2.5}
    gil |= {"seq": 0, "task_id": "t0"}
    run = _journal_run(tmp_path, executions, [gil])
    dead = [_dead("scenario-a", reason, b"t0", seq=0)] if reason else []
    verdict = verify(run, lease_ttl=1.0, poll_interval=0.2, dead_letters=dead)
    assert verdict.ok is ok, verdict.text()
    # The re-run and the overlap are explained by the freeze itself.
    assert verdict.stats["reexecutions_unexplained"] == 0
    assert verdict.stats["overlaps_unexplained"] == 0


def test_checker_orders_acceptances_stamped_by_a_redis_clock_set_back(tmp_path: Path) -> None:
    # Redis restarted at t=1002 with its clock 3 s behind: later acceptances carry smaller
    # Redis times, which must not read as an order violation.
    accepted = []
    for i, t in enumerate((1001.0, 1001.5, 1003.0, 1003.5)):
        redis_t = t - (3.0 if t > 1002 else 0.0)
        accepted.append(
            {
                "queue": "scenario-a",
                "seq": i,
                "task_id": f"t{i}",
                "status": "accepted",
                "order": [int(redis_t * 1e6), i + 1],
            }
            | {"sent": t - 0.001, "t": t, "attempts": 1, "producer": "p1"}
        )
    executions = _runs(*(("replica-1", 10, 5 + i, i, 1004.0 + i / 10, 1004.05 + i / 10) for i in range(4)))
    clock = {"kind": "clock", "target": "redis", "appendfsync": "everysec", "t": 1002.0, "t_down": 1002.1}
    clock |= {"t_end": 1002.4, "shift_ms": -3000, "previous_shift_ms": 0}
    verdict = verify(_journal_run(tmp_path, executions, [clock], accepted=accepted), lease_ttl=1.0, poll_interval=0.2)
    assert verdict.ok, verdict.text()

    # A token that went backwards after that restart is flagged.
    back = tmp_path / "back"
    back.mkdir()
    executions[-2]["fence"] = executions[-1]["fence"] = 2
    verdict = verify(_journal_run(back, executions, [clock], accepted=accepted), lease_ttl=1.0, poll_interval=0.2)
    assert any("fencing token lower than one already started" in b for b in verdict.breaches), verdict.breaches


def _lines(
    queue: str, *spec: tuple[str, int, int, int, float, float | None], fail: bool = False
) -> list[dict[str, Any]]:
    """(replica, pid, fence, seq, start, end or None: killed) -> journal lines on ``queue``;
    ``fail``: the run ends in a failure instead."""
    lines = []
    for replica, pid, fence, seq, start, end in spec:
        base = {"queue": queue, "seq": seq, "task_id": f"{queue}-t{seq}", "replica": replica, "pid": pid}
        base |= {"fence": fence, "deliveries": 1, "attempt": 1}
        lines.append({**base, "event": "start", "t": start})
        if end is not None:
            lines.append({**base, "event": "fail" if fail else "end", "t": end})
    return lines


def _accepted(queue: str, seqs: Sequence[int], at: float = 1000.0) -> list[dict[str, Any]]:
    return [
        {
            "queue": queue,
            "seq": s,
            "task_id": f"{queue}-t{s}",
            "status": "accepted",
            "order": [int(at * 1e6) + i, i + 1],
        }
        | {"sent": at + i / 1000, "t": at + i / 1000, "attempts": 1, "producer": "p1"}
        for i, s in enumerate(seqs)
    ]


def _verify(run: Path, **kwargs: Any) -> Any:
    return verify(run, lease_ttl=1.0, poll_interval=0.2, **kwargs)


Q = "scenario-a"


def _skip_run(
    tmp_path: Path, name: str, *, skipped: int = 0, holder_runs_ahead: bool = False, wait: float = 0.02
) -> Path:
    """replica-1 runs head #0 (fence 5) and is skipped at 1001.5; replica-2 takes the stream over
    (fence 6) ``wait`` seconds later and runs #1..#3 while the skipped head still runs on until
    1003."""
    t = 1001.5 + wait
    executions = _lines(
        Q,
        ("replica-1", 10, 5, 0, 1001.0, 1003.0),
        ("replica-2", 11, 6, 1, t, t + 0.08),
        ("replica-2", 11, 6, 2, t + 0.08, t + 0.18),
        ("replica-2", 11, 6, 3, t + 0.18, t + 0.28),
    )
    if holder_runs_ahead:  # the old holder also starts #2, which it had taken ahead
        executions += _lines(Q, ("replica-1", 10, 5, 2, t + 0.13, t + 0.23))
    skip = {"kind": "skip", "target": Q, "holder": "replica-1", "pid": 10, "t": 1001.5, "t_returned": 1001.51}
    skip |= {"head_task_id": f"{Q}-t0", "head_seq": 0, "skipped_task_id": f"{Q}-t{skipped}", "behind": []}
    skip |= {"t_release": 1002.9, "t_end": 1003.1}
    run = tmp_path / name
    run.mkdir()
    _write(run / "accepted-p1.jsonl", _accepted(Q, range(4)))
    _write(run / EXECUTIONS, executions)
    _write(run / FAULTS, [skip])
    return run


def test_checker_allows_only_the_skipped_head_to_run_on_after_a_skip(tmp_path: Path) -> None:
    dead = [_dead(Q, "operator", b"t0", seq=0)]
    verdict = _verify(_skip_run(tmp_path, "ok"), dead_letters=dead)
    assert verdict.ok, verdict.text()
    assert verdict.stats["skips"] == 1 and verdict.stats["skip_overlaps"] == 0
    assert verdict.stats["overlaps_explained_by_fencing"] == 0, "the skipped execution no longer counts"

    # The old holder starts a task it had taken ahead while the new holder runs it: a breach
    # even though the new holder's fencing token is the higher one.
    verdict = _verify(_skip_run(tmp_path, "twice", holder_runs_ahead=True), dead_letters=dead)
    assert any("overlapping runs of a stream after a skip" in b for b in verdict.breaches), verdict.breaches

    # The stream waited out the lease instead of moving on at once.
    verdict = _verify(_skip_run(tmp_path, "late", wait=1.5), dead_letters=dead)
    assert any("should have let go at once" in b for b in verdict.breaches), verdict.breaches

    # The skip dead-lettered a task other than the one the holder ran.
    verdict = _verify(_skip_run(tmp_path, "wrong", skipped=1), dead_letters=[_dead(Q, "operator", b"t1", seq=1)])
    assert any("not the head" in b for b in verdict.breaches), verdict.breaches


def _pause_run(tmp_path: Path, name: str, late: float, faults: Sequence[dict[str, Any]] = ()) -> Path:
    """#0 and #1 run, the queue is paused at 1001.3 (pause() returns at 1001.35) and resumed at
    1002.5; #2 starts at ``late``."""
    executions = _lines(
        Q,
        ("replica-1", 10, 5, 0, 1001.0, 1001.2),
        ("replica-1", 10, 5, 1, 1001.2, 1001.3),
        ("replica-1", 10, 5, 2, late, late + 0.1),
    )
    pause = {"kind": "pause", "target": Q, "t": 1001.3, "t_returned": 1001.35, "t_resume": 1002.5, "t_end": 1002.8}
    pause |= {"holder": "replica-1", "pid": 10, "confirmed": ["replica-1"], "ended": [], "unconfirmed": []}
    run = tmp_path / name
    run.mkdir()
    _write(run / "accepted-p1.jsonl", _accepted(Q, range(3)))
    _write(run / EXECUTIONS, executions)
    _write(run / FAULTS, [pause, *faults])
    return run


def test_checker_flags_a_start_between_pause_returning_and_resume(tmp_path: Path) -> None:
    verdict = _verify(_pause_run(tmp_path, "ok", late=1002.6))
    assert verdict.ok, verdict.text()
    assert verdict.stats["pauses"] == 1 and verdict.stats["pause_holders_confirmed"] == 1

    verdict = _verify(_pause_run(tmp_path, "late", late=1001.8))
    assert any("started while their queue was paused" in b for b in verdict.breaches), verdict.breaches

    # A start while pause() has not returned yet is allowed: the holder had not confirmed.
    verdict = _verify(_pause_run(tmp_path, "during", late=1001.32))
    assert verdict.ok, verdict.text()

    # A process frozen whole (SIGSTOP) right before is the one excuse.
    stop = {"kind": "stop", "target": "replica-1", "pid": 10, "mid_task": False, "t": 1001.41, "t_end": 1001.75}
    verdict = _verify(_pause_run(tmp_path, "frozen", late=1001.8, faults=[stop]))
    assert verdict.ok, verdict.text()
    assert verdict.stats["starts_while_paused_after_a_freeze"] == 1


def _requeue_run(tmp_path: Path, name: str, after: Sequence[tuple[int, float]], pending: int = 4) -> Path:
    """#0..#2 fail and are dead-lettered; #3 starts before the requeue (taken ahead), #4.. are
    pending; the requeue to the front happens at 1001.0. ``after``: (seq, start) of the runs
    that follow, each 0.05 s long."""
    stream = f"{Q}#requeue-x"
    executions = _lines(
        stream, *(("replica-1", 10, 5, s, 1000.1 + s / 10, 1000.15 + s / 10) for s in range(3)), fail=True
    )
    executions += _lines(stream, ("replica-1", 10, 5, 3, 1000.95, 1001.05))
    executions += _lines(stream, *(("replica-1", 10, 5, s, t, t + 0.05) for s, t in after))
    requeue = {"kind": "requeue-front", "target": stream, "t": 1001.0, "count": 3, "moved": 3, "t_returned": 1001.01}
    requeue |= {"task_ids": [f"{stream}-t{s}" for s in range(3)], "t_end": 1003.0}
    run = tmp_path / name
    run.mkdir()
    _write(run / "accepted-p1.jsonl", _accepted(stream, range(4 + pending)))
    _write(run / EXECUTIONS, executions)
    _write(run / FAULTS, [requeue])
    return run


def test_checker_holds_requeued_tasks_to_their_order_and_to_the_front(tmp_path: Path) -> None:
    in_order = [(0, 1001.1), (1, 1001.2), (2, 1001.3), (4, 1001.4), (5, 1001.5), (6, 1001.6), (7, 1001.7)]
    verdict = _verify(_requeue_run(tmp_path, "ok", in_order))
    assert verdict.ok, verdict.text()
    assert verdict.stats["reexecutions_by_cause"] == {"requeue-front": 3}
    assert verdict.stats["requeue_pending_ran_after"] == 4

    swapped = [(0, 1001.1), (2, 1001.2), (1, 1001.3), (4, 1001.4), (5, 1001.5), (6, 1001.6), (7, 1001.7)]
    verdict = _verify(_requeue_run(tmp_path, "swapped", swapped))
    assert any("out of their original order" in b for b in verdict.breaches), verdict.breaches

    between = [(0, 1001.1), (4, 1001.15), (1, 1001.2), (2, 1001.3), (5, 1001.5), (6, 1001.6), (7, 1001.7)]
    verdict = _verify(_requeue_run(tmp_path, "between", between))
    assert any("in the middle of the requeued ones" in b for b in verdict.breaches), verdict.breaches

    # Requeued to the back: all the pending work, more than any holder takes ahead, ran first.
    pending = 40
    back = [(s, 1001.1 + s / 100) for s in range(4, 4 + pending)] + [(s, 1002.0 + s / 10) for s in range(3)]
    verdict = _verify(_requeue_run(tmp_path, "back", back, pending=pending))
    assert any("started before the requeued ones" in b for b in verdict.breaches), verdict.breaches


def _stop_kill_run(tmp_path: Path, name: str, *, rerun_at: float, clean: bool = False) -> Path:
    """replica-1's worker is stopped at 1000.8 while it runs #0 of scenario-b until 1002.0;
    replica-2, killed at 1001.2 while it runs #0 of scenario-a, which replica-3 runs again at
    ``rerun_at``."""
    executions = _lines("scenario-b", ("replica-1", 10, 4, 0, 1000.5, 1002.0))
    executions += _lines(Q, ("replica-2", 11, 5, 0, 1001.0, None), ("replica-3", 12, 7, 0, rerun_at, rerun_at + 0.1))
    stopped = {"replica": "replica-1", "pid": 10, "t": 1000.8, "t_stopped": 1001.1, "clean": clean, "t_exit": 1003.0}
    stopped |= {"queue": "scenario-b", "seq": 0, "task_id": "scenario-b-t0", "rc": 0}
    fault = {"kind": "stop-kill", "target": "replica-2", "pid": 11, "mid_task": True, "t": 1001.2, "t_end": 1002.4}
    fault |= {"queue": Q, "seq": 0, "task_id": f"{Q}-t0", "polled_by_stopped": True, "stopped": stopped}
    run = tmp_path / name
    run.mkdir()
    _write(run / "accepted-p1.jsonl", _accepted(Q, [0]) + _accepted("scenario-b", [0]))
    _write(run / EXECUTIONS, executions)
    _write(run / FAULTS, [fault])
    return run


def test_checker_bounds_the_takeover_after_a_kill_beside_a_timed_out_stop(tmp_path: Path) -> None:
    verdict = _verify(_stop_kill_run(tmp_path, "ok", rerun_at=1002.3))
    assert verdict.ok, verdict.text()
    assert verdict.stats["takeover_by_kind"]["stop-kill"]["n"] == 1
    assert verdict.stats["reexecutions_by_cause"] == {"stop-kill": 1}

    verdict = _verify(_stop_kill_run(tmp_path, "slow", rerun_at=1004.6))
    assert any("takeover after stop-kill of replica-2 took 3.40s" in b for b in verdict.breaches), verdict.breaches

    verdict = _verify(_stop_kill_run(tmp_path, "clean", rerun_at=1002.3, clean=True))
    assert any("said it was clean" in b for b in verdict.breaches), verdict.breaches


def test_checker_charges_a_lost_acceptance_to_the_restart_that_took_redis_down_after_it(tmp_path: Path) -> None:
    """A crash is journaled before its SIGKILL is sent: an acceptance that comes back in
    between is still Redis's last write (lost to appendfsync=everysec), and a graceful restart
    that follows is not charged with it."""
    executions = _lines(Q, ("replica-1", 10, 5, 0, 1000.5, 1000.6))
    accepted = _accepted(Q, [0], at=1000.0) + _accepted(Q, [1], at=1001.005)
    crash = {"kind": "redis-crash", "target": "redis", "appendfsync": "everysec", "t": 1001.0, "t_down": 1001.1}
    crash |= {"t_end": 1001.4, "shift_ms": 0, "previous_shift_ms": 0}
    clock = {"kind": "clock", "target": "redis", "appendfsync": "always", "t": 1002.0, "t_down": 1002.1}
    clock |= {"t_end": 1002.4, "shift_ms": -3000, "previous_shift_ms": 0}
    verdict = _verify(_journal_run(tmp_path, executions, [crash, clock], accepted=accepted))
    assert verdict.ok, verdict.text()
    assert verdict.stats["lost_to_redis_durability"] == 1
    assert [r["lost_tasks"] for r in verdict.stats["redis_losses"]] == [1, 0]


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
    assert profile.schedule is not None
    for kind in profile.schedule:
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
    # A share of the producers' tasks were delayed, and the replicas ran their periodic schedule
    # through every fault: no run before its due time (its tick), no tick twice or missing.
    assert stats["delayed"] > 100 and stats["delayed_started"] == stats["delayed"]
    assert stats["delayed_early_starts"] == stats["tick_early_starts"] == 0
    assert stats["ticks"] >= 15 and stats["ticks_missing"] == stats["ticks_twice"] == 0
    assert (result.run_dir / "verdict.json").exists()


def _drill(tmp_path: Path, kind: str) -> Result:
    profile = PROFILES[kind]
    started = time.monotonic()
    result = run_scenario(profile, run_dir=tmp_path / kind, seed=5, echo=lambda line: None)
    print(result.verdict.text())
    assert result.verdict.stats["faults"].get(kind) == len(profile.schedule or ()), result.verdict.stats["faults"]
    assert time.monotonic() - started < 60
    return result


@pytest.mark.timeout(120)
def test_drill_operator(tmp_path: Path) -> None:
    """An operator's actions against holders with tasks taken ahead, then a worker stop that
    times out beside a SIGKILL: two skips of a running head (one ending right after the skip,
    one running on), a pause and a resume, a requeue to the front in one step and one in
    pages, and a stop with a 0.3 s timeout followed by a kill on a shard the stopped replica
    polled. The checker finds no breach, and each fault did what it is meant to."""
    profile = PROFILES["operator"]
    started = time.monotonic()
    result = run_scenario(profile, run_dir=tmp_path / "operator", seed=5, echo=lambda line: None)
    verdict = result.verdict
    print(verdict.text())
    assert verdict.ok, verdict.text()
    assert time.monotonic() - started < 60
    stats = verdict.stats
    assert stats["faults"] == {"skip": 2, "pause": 1, "requeue-front": 2, "stop-kill": 1}
    faults = read_lines(result.run_dir / FAULTS)
    for skip in (f for f in faults if f["kind"] == "skip"):
        assert skip["skipped_task_id"] == skip["head_task_id"]
    assert stats["skip_overlaps"] == 0
    (pause,) = (f for f in faults if f["kind"] == "pause")
    assert (pause["confirmed"] or pause["ended"]) and not pause["unconfirmed"], pause
    assert stats["starts_while_paused"] == 0
    assert stats["requeues_paged"] == 1
    assert stats["requeue_pending_ran_after"] > 0, "no pending work was left to prove the requeue went to the front"
    assert stats["reexecutions_by_cause"].get("requeue-front") == stats["requeued_tasks"]
    (stop_kill,) = (f for f in faults if f["kind"] == "stop-kill")
    assert stop_kill["stopped"]["clean"] is False, "the stop did not time out mid-task"
    assert stop_kill["polled_by_stopped"], "the killed replica's queue was not on a shard the stopped one polled"
    assert stats["takeover_by_kind"]["stop-kill"]["max"] <= stats["takeover_bound"]


@pytest.mark.timeout(90)
def test_drill_vandal(tmp_path: Path) -> None:
    """Malformed entries pushed into live queues: each dead-lettered as undecodable with its
    raw bytes, nothing accepted lost or reordered, and the queues went on past them."""
    result = _drill(tmp_path, "vandal")
    verdict = result.verdict
    assert verdict.ok, verdict.text()
    assert verdict.stats["vandal_entries"] == 9
    assert verdict.stats["vandal_stall_max"] is not None
    dead = read_lines(result.run_dir / DEAD_LETTERS)
    assert sum(d["reason"] == "undecodable" for d in dead) >= 9


@pytest.mark.timeout(150)
def test_drill_slow_reply(tmp_path: Path) -> None:
    """Replies to one replica held back past the lease TTL while it is granted a lease: it
    must not start a task on it, so no run of the queue overlaps another. Which replica wins a
    claim is up to the scheduler of a busy machine: a run where the slow one won none proves
    nothing, so the drill is repeated (at most three times) until it has."""
    for attempt in range(3):
        result = _drill(tmp_path / f"attempt-{attempt}", "slow-reply")
        (fault,) = read_lines(result.run_dir / FAULTS)
        if fault["outrun"] == "claimed":
            break
    assert fault["outrun"] == "claimed", f"the slow replica never won a claim in 3 runs: {fault}"
    assert result.verdict.ok, result.verdict.text()
    assert result.verdict.stats["stale_starts"] == 0


@pytest.mark.timeout(90)
def test_drill_async_stop(tmp_path: Path) -> None:
    """``await worker.stop(timeout=0.3)`` while a sync task runs in a thread of a process that
    lives on: no other replica may start on that queue before the task ends."""
    result = _drill(tmp_path, "async-stop")
    (fault,) = read_lines(result.run_dir / FAULTS)
    log = (result.run_dir / "logs").glob(f"{fault['target']}.*.log")
    assert any("pyfiq_harness.replica.stop_drill" in p.read_text() and "clean=False" in p.read_text() for p in log), (
        "the stop did not time out mid-task"
    )
    assert result.verdict.ok, result.verdict.text()


@pytest.mark.timeout(90)
def test_drill_gil(tmp_path: Path) -> None:
    """A task holding the GIL for 2.5 TTLs: dead-lettered for outliving its lease, not
    re-run on every take-over until it counts as poison, and no replica dies of it."""
    result = _drill(tmp_path, "gil")
    verdict = result.verdict
    assert verdict.ok, verdict.text()
    (reasons,) = verdict.stats["gil_tasks_dead_lettered_as"].values()
    assert reasons and "poison" not in reasons


@pytest.mark.timeout(90)
def test_drill_clock(tmp_path: Path) -> None:
    """Redis restarted with its wall clock 3 s behind, then right again, then behind: the
    fencing tokens tasks see keep rising (the shard counters survive in the AOF)."""
    result = _drill(tmp_path, "clock")
    verdict = result.verdict
    assert verdict.ok, verdict.text()
    assert verdict.stats["stale_starts"] == 0
    # Delayed tasks and ticks are judged on Redis's clock, shifted or not.
    assert verdict.stats["delayed_started"] > 0 and verdict.stats["ticks"] > 0
    shifts = [f["shift_ms"] for f in read_lines(result.run_dir / FAULTS)]
    assert shifts == [-3000, 0, -3000]
    # Tasks ran under each clock.
    journal = read_lines(result.run_dir / EXECUTIONS)
    clock_faults = read_lines(result.run_dir / FAULTS)
    for f, nxt in zip(clock_faults, [*clock_faults[1:], {"t": float("inf")}], strict=True):
        assert any(f["t_end"] < e["t"] < nxt["t"] for e in journal if e["event"] == "start"), f


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
    kinds = ("kill", "stop", "cut", "blackhole", "slow-reply", "vandal", "skip", "pause", "requeue-front", "stop-kill")
    for kind in kinds:
        assert faults.get(kind, 0) >= 1, faults
    assert verdict.stats["lost"] == 0
