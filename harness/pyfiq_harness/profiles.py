"""The fault kinds and the run profiles (short, soak, the one-fault drills)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

#: Faults on one replica, chosen (mid-task if possible) by the injector.
REPLICA_FAULTS = ("kill", "stop", "cut", "blackhole", "delay", "slow-reply")
NETWORK_FAULTS = ("cut", "blackhole", "delay", "slow-reply")
#: Faults that restart Redis (``clock``: with its wall clock shifted).
REDIS_FAULTS = ("redis-restart", "redis-crash", "clock")
#: An operator's actions against a live holder with tasks taken ahead (``backend.skip``,
#: ``pause``/``resume``, ``requeue_dead_letters(front=True)``), each on a queue of its own.
OPERATOR_FAULTS = ("skip", "pause", "requeue-front")
#: Faults that pick their own target: a queue (``vandal``, the operator's) or whichever replica
#: runs the task they enqueue (``async-stop``, ``gil``, ``stop-kill``).
TASK_FAULTS = ("vandal", "async-stop", "gil", "stop-kill", *OPERATOR_FAULTS)
FAULT_KINDS = (*REPLICA_FAULTS, *REDIS_FAULTS, *TASK_FAULTS, "rolling-restart")
#: Faults after which another replica must take the victim's queues over (lease lapse);
#: ``stop-kill`` is a SIGKILL right after another replica's stop timed out.
TAKEOVER_FAULTS = ("kill", "stop", "cut", "blackhole", "stop-kill")
#: Whole-process freezes (SIGSTOP; a task holding the GIL, derived from the journal): the one
#: excuse for starting a task on a lease that lapsed meanwhile, since no check made before the
#: freeze can see it coming.
PAUSE_FAULTS = ("stop", "gil-hold")
#: Faults that can explain a lost lease or acknowledgement (hence a re-execution).
EXPLAINING_FAULTS = (*REPLICA_FAULTS, *REDIS_FAULTS, "async-stop", "gil-hold", "stop-kill")
#: How far back each ``clock`` fault sets Redis's wall clock (they alternate with a true clock).
CLOCK_LAG_MS = -3000
#: Slack on top of lease TTL + poll interval for a takeover on a busy 2-core machine.
TAKEOVER_SLACK = 2.0
#: Window of writes before a Redis crash that appendfsync=everysec may lose (Redis docs: 1 s,
#: up to 2 s when a background fsync is slow).
EVERYSEC_WINDOW = 2.0
#: Producer name of the tasks the injector enqueues for its own faults.
INJECTOR = "injector"
#: Long tasks a ``stop-kill`` places, at most, until one runs on a replica with a share of the
#: safety poll: the fleet picks who runs a task, and in runs of the drill about half did.
LONG_TASK_ATTEMPTS = 10


# -- profiles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Sizes, timings and the fault schedule of one run."""

    name: str
    replicas: int
    queues: int
    producers: int
    #: Enqueues per second of each producer (all queues together).
    rate: float
    #: Seconds each task sleeps (simulated I/O).
    hold: float
    lease_ttl: float
    poll_interval: float
    concurrency: int
    #: A fixed fault schedule, or None for random faults until ``duration`` / ``max_faults``.
    schedule: tuple[str, ...] | None
    duration: float
    max_faults: int
    #: Seconds between one fault ending and the next starting (per lane).
    gap: float
    #: Faults injected concurrently (on different replicas; Redis faults and rolling restarts
    #: always run alone).
    lanes: int = 1
    drain_timeout: float = 30.0
    max_deliveries: int = 10
    #: Replica drivers: ``threaded``, ``asyncio``, or ``mixed`` (alternating).
    driver: str = "mixed"
    shards: int = 4
    #: Every this-many-th task fails its first attempt (a retry in place).
    fail_every: int = 97
    #: The share of producer tasks enqueued with a delay (``producers.MIN_DELAY``-``MAX_DELAY`` s).
    delayed: float = 0.2
    #: Seconds between the ticks of the periodic schedule every replica runs on a queue of its
    #: own (``pyfiq.ops.scenario_tasks.TICK_QUEUE``); 0: none.
    tick_every: float = 1.0
    #: Relative weights of random faults; a kind missing here is left out of the random mix
    #: unless asked for by name.
    weights: tuple[tuple[str, float], ...] = (
        ("kill", 3.0),
        ("stop", 2.0),
        ("cut", 2.0),
        ("blackhole", 2.0),
        ("delay", 1.0),
        ("slow-reply", 1.0),
        ("vandal", 0.5),
        ("async-stop", 0.3),
        ("redis-restart", 0.3),
        ("redis-crash", 0.3),
        ("clock", 0.2),
        ("rolling-restart", 0.1),
    )


PROFILES: dict[str, Profile] = {
    "short": Profile(
        name="short",
        replicas=4,
        queues=4,
        producers=3,
        rate=25.0,
        hold=0.02,
        lease_ttl=1.0,
        poll_interval=0.2,
        concurrency=2,
        schedule=(
            "kill",
            "stop",
            "cut",
            "blackhole",
            "redis-restart",
            "kill",
            "delay",
            "redis-crash",
            "stop",
            "rolling-restart",
            "redis-crash",
        ),
        duration=45.0,
        max_faults=11,
        gap=0.8,
    ),
    "soak": Profile(
        name="soak",
        replicas=6,
        queues=8,
        producers=4,
        rate=15.0,
        hold=0.02,
        lease_ttl=1.0,
        poll_interval=0.2,
        concurrency=2,
        schedule=None,
        duration=1800.0,
        max_faults=5000,
        gap=0.3,
        lanes=2,
        drain_timeout=90.0,
        # The GIL drill too: each one freezes a replica for 2.5 TTLs, so it stays rare. A paged
        # requeue fills and empties 500+ dead letters: rarer than the other operator actions.
        weights=(
            *Profile.weights,
            ("gil", 0.05),
            ("skip", 0.3),
            ("pause", 0.3),
            ("requeue-front", 0.15),
            ("stop-kill", 0.2),
        ),
    ),
}


def _drill(kind: str, count: int, **changes: Any) -> Profile:
    """A short run of one fault kind, ``count`` times, on a small fleet (the per-fault tests)."""
    base = Profile(
        name=kind,
        replicas=3,
        queues=2,
        producers=1,
        rate=24.0,
        hold=0.02,
        lease_ttl=1.0,
        poll_interval=0.2,
        concurrency=2,
        schedule=(kind,) * count,
        duration=60.0,
        max_faults=count,
        gap=0.5,
        drain_timeout=20.0,
    )
    return replace(base, **changes)


PROFILES.update(
    {
        "vandal": _drill("vandal", 3),
        # More queues than the other replicas have slots, so the drill can keep them all busy;
        # few producer tasks, so the long task it places is what the slow replica is handed.
        "slow-reply": _drill("slow-reply", 1, queues=4, concurrency=1, rate=6.0),
        # Every replica asyncio, so the first slow task lands on one.
        "async-stop": _drill("async-stop", 1, driver="asyncio"),
        # Few deliveries: a task miscounted as a consumer death turns poison quickly.
        "gil": _drill("gil", 1, max_deliveries=4),
        "clock": _drill("clock", 3, replicas=2),
        # Each operator action against a holder with tasks taken ahead (a skip whose head ends
        # at once and one whose head runs on, a requeue in one step and one in pages: the
        # injector alternates them), then a worker stop that times out and a SIGKILL elsewhere.
        # Queues on every shard, so that the stop finds one on a shard the stopped replica
        # polled, with a few to spare while it looks for a replica with such a share.
        "operator": _drill(
            "operator", 6, queues=6, schedule=("skip", "skip", "pause", "requeue-front", "requeue-front", "stop-kill")
        ),
    }
)
