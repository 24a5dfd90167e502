"""The injector: replica faults (signals, the fault proxy's link faults), Redis restarts and
crashes, and the schedule that runs them on lanes.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Sequence

from .drills import TaskDrills
from .journal import Event
from .profiles import CLOCK_LAG_MS, REPLICA_FAULTS, TASK_FAULTS


class Injector(TaskDrills):
    """Injects faults and journals each one in ``faults.jsonl``."""

    # -- the faults --

    def inject(self, kind: str) -> None:
        try:
            if kind in REPLICA_FAULTS:
                with self.gate.local():
                    name, mid = self._victim()
                    try:
                        getattr(self, "_" + kind.replace("-", "_"))(name, mid)
                    finally:
                        self._release(name)
            elif kind in TASK_FAULTS:
                with self.gate.local():
                    getattr(self, "_" + kind.replace("-", "_"))()
            else:
                with self.gate.exclusive():
                    getattr(self, "_" + kind.replace("-", "_"))()
        except Exception as exc:  # a fault that could not be injected is reported, not hidden
            self.errors.append(f"{kind}: {exc!r}")
            self.echo(f"  ! {kind} failed: {exc!r}")

    def _kill(self, name: str, mid: bool) -> None:
        event = self._base("kill", name, mid)
        self.fleet.kill(name)
        event["t"] = time.time()  # the moment it was certainly dead
        self.fleet.spawn(name)
        # Ready before another fault may pick it: a replica that starts while its link is cut
        # exits at once (see the report of the first soak run), which is a finding of its own,
        # not something every kill should stumble into.
        self.fleet.wait_ready([name])
        event["t_end"] = time.time()
        self.record(event)

    def _stop(self, name: str, mid: bool) -> None:
        event = self._base("stop", name, mid)
        self.fleet.signal(name, signal.SIGSTOP)
        time.sleep(self.p.lease_ttl * 1.5 + self.p.poll_interval)
        self.fleet.signal(name, signal.SIGCONT)
        event["t_end"] = time.time()
        self.record(event)

    def _cut(self, name: str, mid: bool) -> None:
        self._partition("cut", name, mid)

    def _blackhole(self, name: str, mid: bool) -> None:
        self._partition("blackhole", name, mid)

    def _partition(self, kind: str, name: str, mid: bool) -> None:
        """Cut or blackhole one replica's Redis connection past its lease TTL, then heal it."""
        event = self._base(kind, name, mid)
        getattr(self.proxies[name], kind)()
        time.sleep(self.p.lease_ttl * 1.3)
        self.proxies[name].heal()
        event["t_end"] = time.time()
        self.record(event)

    def _delay(self, name: str, mid: bool) -> None:
        seconds = round(self.p.lease_ttl / 10, 3)
        event = self._base("delay", name, mid)
        event["seconds"] = seconds
        self.proxies[name].delay(seconds)
        time.sleep(self.p.lease_ttl * 1.5)
        self.proxies[name].heal()
        event["t_end"] = time.time()
        self.record(event)

    def _slow_reply(self, name: str, mid: bool) -> None:
        """Delay what Redis sends one replica (not what it sends Redis) past the lease TTL: its
        renewals still land, too far apart to keep its leases, and a lease it is granted
        reaches it after the lease may have lapsed. A holder that counts its lease from when
        it sent the request starts nothing on it; one that counts from the reply does, while
        another replica may already run the same queue."""
        seconds = round(self.p.lease_ttl * 2, 3)
        event = self._base("slow-reply", name, mid)
        event["seconds"] = seconds
        self.proxies[name].delay(seconds, direction="replies")
        try:
            time.sleep(self.p.lease_ttl + self.p.poll_interval)  # its leases lapse or move on
            event |= self._outrun(name, seconds)
        finally:
            self.proxies[name].heal()
        time.sleep(seconds)  # replies already held back still arrive late
        event["t_end"] = time.time()
        self.record(event)

    def _outrun(self, name: str, seconds: float) -> Event:
        """Make the slow replica win a claim, and another take the queue over while the slow
        one's reply is still on the way.

        A replica whose replies come late loses every race for a claim, so the others are kept
        busy first: a task on each of their slots that holds until a release file appears.
        Then a long task goes on every other queue; once the slow replica's claim shows up in
        Redis, its lease is left to lapse and the others are released, so one of them takes
        that queue over and runs the task the slow replica is about to start. Only possible
        when the others have fewer slots than there are queues (the slow-reply profile);
        otherwise the delay alone is the fault."""
        slots = sum(1 for n in self.fleet.live_pids().values() if n != name) * self.p.concurrency
        if self.backend is None or not 0 < slots < len(self.queues):
            time.sleep(2 * seconds + self.p.lease_ttl)
            return {"outrun": "not attempted"}
        release = self.path.parent / f"release-{uuid.uuid4().hex[:8]}"
        try:
            gated = [
                self._enqueue_task(q, {"hold": 30.0, "until": str(release)})
                for q in self.rng.sample(self.queues, slots)
            ]
            deadline = time.monotonic() + 5 * self.p.lease_ttl
            for line in gated:
                if self._wait_line(line["task_id"], "start", max(0.0, deadline - time.monotonic())) is None:
                    return {"outrun": "the other replicas did not all get busy"}
            rest = sorted(set(self.queues) - {line["queue"] for line in gated})
            for q in rest:
                self._enqueue_task(q, {"hold": seconds + self.p.lease_ttl})
            assert self.backend is not None
            # A replica whose every reply is late needs several round trips before it claims:
            # the end of the run it was in, a look at the shards, the claim itself, and when its
            # threads need one more pooled connection than before, that connection's handshake
            # (three or four commands, each waiting out the delay: measured up to 12 s).
            placed = time.monotonic()
            deadline = placed + 8 * seconds + self.p.lease_ttl
            claimed = None
            while claimed is None and time.monotonic() < deadline:
                held = [q for q in rest if self.backend.client.exists(self.backend.keys.stream(q).lease)]
                claimed = held[0] if held else None
                time.sleep(0.005)
            if claimed is None:
                return {"outrun": "the slow replica claimed nothing"}
            claimed_at, claim_after = time.time(), round(time.monotonic() - placed, 3)
            time.sleep(self.p.lease_ttl + 0.05)  # its lease lapses
            release.touch()
            time.sleep(seconds)  # its late reply arrives meanwhile
            return {"outrun": "claimed", "claimed": claimed, "claimed_at": claimed_at, "claim_after": claim_after}
        finally:
            release.touch()

    # -- faults that bring their own task or target a queue --

    def _redis(self, kind: str, crash: bool, clock_shift_ms: int | None = None) -> None:
        assert self.redis is not None
        mode = self.redis.appendfsync
        event: Event = {"kind": kind, "target": "redis", "appendfsync": mode, "t": time.time()}
        event["shift_ms"] = self.redis.clock_shift_ms if clock_shift_ms is None else clock_shift_ms
        event["previous_shift_ms"] = self.redis.clock_shift_ms
        self.redis.stop(kill=crash)
        event["t_down"] = time.time()
        time.sleep(0.3)
        if crash:  # the next crash runs under the next fsync policy
            self._aof_index = (self._aof_index + 1) % len(self.aof_modes)
        self.redis.start(self.aof_modes[self._aof_index], clock_shift_ms=clock_shift_ms)
        event["t_end"] = time.time()
        event["next_appendfsync"] = self.redis.appendfsync
        self.record(event)

    def _clock(self) -> None:
        """A graceful Redis restart (the shard counters survive in the AOF) with Redis's wall
        clock set back, or, the next time, true again: fencing tokens must keep rising."""
        assert self.redis is not None
        self._redis("clock", crash=False, clock_shift_ms=CLOCK_LAG_MS if self.redis.clock_shift_ms == 0 else 0)
        # Leases taken, renewed and released on the new clock before anything else happens.
        time.sleep(2 * self.p.lease_ttl)

    def _redis_restart(self) -> None:
        self._redis("redis-restart", crash=False)

    def _redis_crash(self) -> None:
        self._redis("redis-crash", crash=True)

    def _rolling_restart(self) -> None:
        event: Event = {"kind": "rolling-restart", "target": "all", "t": time.time(), "stops": []}
        for name in self.names:
            self._mid_task(name)  # so the stop has a running task to finish and a queue to hand over
            pid = self.fleet.procs[name].pid
            t = time.time()
            rc, took = self.fleet.terminate(name, timeout=max(15.0, self.p.lease_ttl * 5))
            event["stops"].append({"replica": name, "pid": pid, "t": t, "t_exit": t + took, "rc": rc})
            self.fleet.spawn(name)
            self.fleet.wait_ready([name])
        event["t_end"] = time.time()
        self.record(event)

    # -- the schedule --

    def run(self, kinds: Sequence[str], deadline: float) -> None:
        """Inject the fixed schedule (one lane), or random faults of ``kinds`` on
        ``profile.lanes`` lanes until ``deadline`` or ``max_faults``."""
        started = [0]
        lock = threading.Lock()
        fixed = [k for k in (self.p.schedule or ()) if k in kinds]
        weights = dict(self.p.weights)

        def next_kind() -> str | None:
            with lock:
                if started[0] >= self.p.max_faults or time.time() > deadline:
                    return None
                if self.p.schedule is not None:
                    if started[0] >= len(fixed):
                        return None
                    kind = fixed[started[0]]
                else:  # a kind asked for by name but not weighed by the profile: weight 1
                    kind = self.rng.choices(list(kinds), [weights.get(k) or 1.0 for k in kinds])[0]
                started[0] += 1
                return kind

        def lane() -> None:
            while (kind := next_kind()) is not None:
                self.inject(kind)
                for dead in self.fleet.reap():
                    self.echo(f"  ! {dead['replica']} (pid {dead['pid']}) exited unexpectedly: rc={dead['rc']}")
                time.sleep(self.p.gap)

        count = self.p.lanes if self.p.schedule is None else 1
        lanes = [threading.Thread(target=lane, daemon=True) for _ in range(count)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
