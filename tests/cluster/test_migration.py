"""Cluster topology changes under load, judged by the scenario checker: a slot migration (the
slot of a busy shard's hash tag moved to another primary, key by key, as ``redis-cli --cluster
reshard`` does) and a manual ``CLUSTER FAILOVER`` run on a replica.

Worker processes of both drivers (``pyfiq --cluster worker pyfiq.ops.scenario_tasks``; replica-2
runs the AsyncWorker) journal every execution; a producer enqueues to keyed streams every few
milliseconds and records each enqueue Redis acknowledged; ``pyfiq.ops.scenario_tasks.check`` judges
the journal. Neither change may lose anything: a migration moves every key, and a manual
failover waits for the replica to catch up before it swaps roles. So, unlike a SIGKILLed
primary (``test_failover.py``), no loss at all is allowed.

A third test holds one stream's keys split between the two nodes for 1.5 s: its enqueue meets
TRYAGAIN past the point where redis-py gives up (``ClusterError: TTL exhausted.``), and must go on
retrying until the move ends.

Every test puts the cluster back as it found it (the slot moved back, the roles swapped back),
since all the cluster tests share one. Each prints its figures (``pytest -s``); docs/verification.md
quotes them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from pyfiq import RedisQueueBackend, Settings
from pyfiq.engine.keys import stream_name
from pyfiq.ops.scenario_tasks import QUEUES, STEPS, Report, check, read_journal
from pyfiq_harness.servers import Node
from pyfiq_harness.topologies import Cluster
from tests.cluster.test_failover import TopologyFleet
from tests.support.helpers import ProducerLoop, unique_prefix, wait_until
from tests.workers.test_processes import MAX_DELIVERIES, POLL, SHARDS, TTL

QUEUE = QUEUES[0]
#: Keyed streams of ``QUEUE`` the producer feeds, round-robin.
KEYS = [f"k{i}" for i in range(8)]
HOLD = 0.01


@dataclass
class KeyedProducer(ProducerLoop):
    """Enqueues ``seq`` 0, 1, ... round-robin to the keyed streams of ``QUEUE``; ``accepted``
    holds, per stream and in order, what Redis acknowledged, with the time its reply came."""

    backend: RedisQueueBackend
    accepted: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted = {stream_name(QUEUE, k): [] for k in KEYS}
        self._loop()

    def step(self, seq: int) -> None:
        key = KEYS[seq % len(KEYS)]
        handle = STEPS[QUEUE].send_with_options(args=(seq,), kwargs={"hold": HOLD}, key=key, backend=self.backend)
        self.accepted[handle.stream].append((seq, time.monotonic()))


@dataclass
class Outcome:
    report: Report
    accepted: dict[str, list[tuple[int, float]]]
    errors: list[BaseException]
    seconds: float

    def after(self, moment: float, streams: list[str]) -> int:
        """Enqueues acknowledged after ``moment`` to ``streams``."""
        return sum(1 for s in streams for _, t in self.accepted[s] if t > moment)

    def figures(self) -> str:
        total = sum(map(len, self.accepted.values()))
        return (
            f"accepted {total} on {len(self.accepted)} streams in {self.seconds:.1f} s, producer errors "
            f"{len(self.errors)}; " + "; ".join(self.report.lines())
        )


@pytest.fixture(autouse=True)
def _cluster_intact(redis_cluster: Cluster) -> None:
    """Both tests start from a stable cluster (a test before may have left it recovering)."""
    redis_cluster.wait_ready(60)


def _under_load(
    cluster: Cluster,
    tmp_path: Path,
    backend: RedisQueueBackend,
    change: Callable[[], None],
    fed: list[str] | None = None,
) -> Outcome:
    """Three worker processes (threaded, asyncio, threaded) and the producer; ``change()`` runs
    after 1.5 s of load, and the load goes on 1.5 s after it, and until the streams ``fed``
    have had more than 30 enqueues since the change (up to 15 s: a slow machine's producer
    may take longer). Returns once every stream's last acknowledged task has run, with the
    checker's report."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    fleet = TopologyFleet(
        cluster.url, backend.keys.prefix, [QUEUE], tmp_path / "journal.jsonl", logdir,
        lease_ttl=TTL, connect=["--cluster"], worker_extra=[],
    )  # fmt: skip
    started = time.monotonic()
    try:
        fleet.start(3)
        with KeyedProducer(backend) as producer:
            time.sleep(1.5)
            change()
            changed = time.monotonic()
            time.sleep(1.5)
            while fed and time.monotonic() < changed + 15:
                if sum(1 for st in fed for _, t in list(producer.accepted.get(st, ())) if t > changed) > 30:
                    break
                time.sleep(0.1)
        accepted = {s: [seq for seq, _ in acks] for s, acks in producer.accepted.items()}
        try:
            wait_until(lambda: _ran(fleet.journal, accepted), timeout=30, interval=0.1, message="every task run")
        except BaseException:
            print(*(backend.queue_info(s) for s in accepted), fleet.diagnostics(), sep="\n")
            raise
        time.sleep(0.3)  # a late duplicate, if any, still gets into the journal
        journal = read_journal(fleet.journal)
    finally:
        fleet.close()
    return Outcome(check(journal, accepted), producer.accepted, producer.errors, time.monotonic() - started)


def _ran(journal: Path, accepted: dict[str, list[int]]) -> bool:
    if not journal.exists():
        return False
    ended = {(e["queue"], e["seq"]) for e in read_journal(journal) if e["event"] == "end"}
    return all((s, seq) in ended for s, seqs in accepted.items() for seq in seqs)


def _judge(outcome: Outcome) -> None:
    report = outcome.report
    assert outcome.errors == [], outcome.errors[:3]
    assert report.lost == {}, f"acknowledged tasks lost: {report.lost}"
    assert not report.order_violations, report.order_violations
    assert not report.overlaps_unexplained, report.overlaps_unexplained[:3]
    assert sum(map(len, outcome.accepted.values())) > 300


def _settings() -> Settings:
    return Settings(prefix=unique_prefix(), shards=SHARDS, lease_ttl=TTL, poll_interval=POLL,
                    max_deliveries=MAX_DELIVERIES)  # fmt: skip


def _busiest_shard(backend: RedisQueueBackend) -> tuple[int, list[str]]:
    """The shard holding the most of the producer's streams, and those streams."""
    by_shard: dict[int, list[str]] = {}
    for k in KEYS:
        stream = stream_name(QUEUE, k)
        by_shard.setdefault(backend.keys.stream(stream).shard, []).append(stream)
    shard = max(by_shard, key=lambda s: len(by_shard[s]))
    return shard, by_shard[shard]


def _keyslot(node: Node, key: str) -> int:
    c = node.client()
    try:
        return int(c.cluster("keyslot", key))
    finally:
        c.close()


def _count_keys(node: Node, slot: int) -> int:
    c = node.client()
    try:
        return int(c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
    finally:
        c.close()


def _redirections(cluster: Cluster, node: Node) -> dict[str, int]:
    stats = cluster.errorstats(node)
    return {code: stats.get(code, 0) for code in ("MOVED", "ASK", "TRYAGAIN")}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


def test_a_busy_shards_slot_migrated_under_load_loses_nothing_and_keeps_order(
    redis_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = redis_cluster
    backend = RedisQueueBackend(cluster.url, _settings(), cluster=True)
    shard, streams = _busiest_shard(backend)
    pending = backend.keys.stream(streams[0]).pending
    slot = key_slot(pending.encode())
    source = cluster.slot_owner(slot)
    assert _keyslot(source, pending) == slot
    target = next(n for n in cluster.primaries_now() if n is not source)
    before = {n: _redirections(cluster, n) for n in (source, target)}
    moved: dict[str, Any] = {}

    def migrate() -> None:
        began = time.monotonic()
        # A key at a time over about a second (the slot also holds what earlier tests left
        # under the same hash tag): every client meets ASK meanwhile, and TRYAGAIN for the
        # scripts whose keys the two nodes share out.
        moved["keys"] = cluster.move_slot(slot, target, batch=1, over=1.0)
        moved["at"], moved["took"] = time.monotonic(), time.monotonic() - began
        moved["owner"] = cluster.slot_owner(slot)

    try:
        outcome = _under_load(cluster, tmp_path, backend, migrate, fed=streams)
        on_target, on_source = _count_keys(target, slot), _count_keys(source, slot)
        met = {n.port: _delta(b, _redirections(cluster, n)) for n, b in before.items()}
    finally:
        backend.close()
        _give_back(cluster, slot, source, target)
    print(
        f"\nslot {slot} (shard {shard}, {len(streams)} of {len(KEYS)} streams) moved {source.port} -> "
        f"{target.port}: {moved['keys']} keys in {moved['took']:.2f} s; redirections answered {met}; "
        f"{outcome.after(moved['at'], streams)} enqueues to its streams after the move; {outcome.figures()}"
    )
    assert moved["owner"] is target, "the slot is served by the target primary"
    assert moved["keys"] > 0 and on_target > 0 and on_source == 0
    assert cluster.slot_owner(slot) is source, "the slot was given back"
    # The clients did meet the migration: the old owner redirected them while it was under way
    # and after it.
    assert met[source.port]["ASK"] + met[source.port]["MOVED"] > 0, met
    assert outcome.after(moved["at"], streams) > 30, "the migrated streams kept being fed after the move"
    _judge(outcome)


def _give_back(cluster: Cluster, slot: int, source: Node, target: Node) -> None:
    """The slot back on ``source``, whatever state a test left it in (a move half done is
    finished first, so no key stays behind): other tests share the cluster."""
    cluster.move_slot(slot, target)
    cluster.move_slot(slot, source, batch=100)
    cluster.wait_ready(30)


def test_an_enqueue_held_back_by_tryagain_past_redis_pys_own_retries_waits_for_the_move_to_end(
    redis_cluster: Cluster,
) -> None:
    """A stream's keys split between two nodes mid-migration: its scripts meet TRYAGAIN until
    the move ends. redis-py tries 16 times (about 0.4 s) and gives up with ``ClusterError("TTL
    exhausted.")``; the enqueue must keep retrying for ``enqueue_timeout`` instead of failing."""
    cluster = redis_cluster
    backend = RedisQueueBackend(cluster.url, _settings(), cluster=True)
    stream = stream_name(QUEUE, "held")
    keys = backend.keys.stream(stream)
    first = STEPS[QUEUE].send_with_options(args=(0,), key="held", backend=backend)
    slot = key_slot(keys.pending.encode())
    source = cluster.slot_owner(slot)
    target = next(n for n in cluster.primaries_now() if n is not source)
    tryagain = cluster.errorstats(source).get("TRYAGAIN", 0)
    result: dict[str, Any] = {}

    def send() -> None:
        began = time.monotonic()
        try:
            result["handle"] = STEPS[QUEUE].send_with_options(args=(1,), key="held", backend=backend)
        except Exception as exc:
            result["error"] = exc
        result["took"] = time.monotonic() - began

    sender = threading.Thread(target=send, daemon=True)
    try:
        cluster.begin_move(slot, target)
        cluster.migrate(source, target, [keys.pending])  # only this key moved: the stream is split
        sender.start()
        time.sleep(1.5)  # well past redis-py's own attempts
        result["waiting"] = sender.is_alive()
        cluster.move_slot(slot, target)
        sender.join(10)
        met = cluster.errorstats(source).get("TRYAGAIN", 0) - tryagain
        info = backend.queue_info(stream)
    finally:
        backend.close()
        _give_back(cluster, slot, source, target)
    print(f"\nthe enqueue met TRYAGAIN {met} times and returned after {result.get('took', -1):.2f} s")
    assert "error" not in result, result.get("error")
    assert result["waiting"], "the enqueue was still waiting when the move ended"
    assert met >= 16, "the enqueue met more TRYAGAIN replies than redis-py retries on its own"
    assert result["took"] >= 1.5 and not result["handle"].duplicate
    assert result["handle"].id != first.id and info["pending"] == 2


def _manual_failover(replica: Node) -> None:
    c = replica.client()
    try:
        assert c.execute_command("CLUSTER", "FAILOVER") in (b"OK", "OK", True)
    finally:
        c.close()


def test_a_manual_cluster_failover_under_load_loses_nothing_and_keeps_order(
    redis_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = redis_cluster
    backend = RedisQueueBackend(cluster.url, _settings(), cluster=True)
    _, streams = _busiest_shard(backend)
    slot = key_slot(backend.keys.stream(streams[0]).pending.encode())
    primary = cluster.slot_owner(slot)
    replica = cluster.replica_of(primary)
    before = _redirections(cluster, primary)
    swapped: dict[str, float] = {}

    def failover() -> None:
        began = time.monotonic()
        _manual_failover(replica)
        wait_until(lambda: cluster.role(replica) == "master" and cluster.role(primary) == "slave", timeout=15,
                   interval=0.05, message="the replica promoted and its primary demoted")  # fmt: skip
        swapped["at"], swapped["took"] = time.monotonic(), time.monotonic() - began
        wait_until(lambda: cluster.slot_owner(slot) is replica, timeout=15, message="every node sees the new owner")

    try:
        outcome = _under_load(cluster, tmp_path, backend, failover)
        owner_after = cluster.slot_owner(slot)
        met = _delta(before, _redirections(cluster, primary))
    finally:
        backend.close()
        if cluster.role(primary) == "slave":
            cluster.wait_ready(30)
            _manual_failover(primary)  # roles back as they were: other tests share the cluster
            wait_until(lambda: cluster.slot_owner(slot) is primary, timeout=15, message="the roles swapped back")
        cluster.wait_ready(30)
    print(
        f"\nmanual failover of {primary.port} to {replica.port} (slot {slot}, {len(streams)} streams): roles "
        f"swapped in {swapped['took']:.2f} s; redirections the old primary answered {met}; "
        f"{outcome.after(swapped['at'], streams)} enqueues to its streams after; {outcome.figures()}"
    )
    assert owner_after is replica, "the promoted replica serves the slot"
    assert cluster.slot_owner(slot) is primary, "the roles were swapped back"
    assert met["MOVED"] > 0, "clients were redirected away from the demoted primary"
    assert outcome.after(swapped["at"], streams) > 30
    _judge(outcome)
