"""The checkers of delayed and periodic tasks: Redis holds a delayed task until its due time and
no task starts before it (nor a tick's task before its tick), and each tick of the replicas'
schedule is enqueued once, runs, and none is missing.

Every Redis time here (a due time, a tick, an enqueue's stamp) is put on this machine's clock by
``RunFacts.clock``, and compared with the replicas' journal times to the microsecond. That
takes the replicas and Redis to read one wall clock, which the runner guarantees by starting
them all on this machine (a ``clock`` fault shifts Redis's alone, by a known offset).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pyfiq.engine.ticks import FAILURE_BACKOFF

from .facts import Finding, RunFacts, due_reached
from .journal import Event, _max, _median
from .profiles import EVERYSEC_WINDOW, REDIS_FAULTS, TAKEOVER_SLACK

#: A journal time is a float of seconds: read back in µs it may be one off.
JOURNAL_US = 1
#: How late a tick's task may be enqueued, on top of its interval: a replica's longest back-off
#: after failed calls (Redis down; jittered by up to a fifth) and slack for a busy machine.
TICK_LATENESS = FAILURE_BACKOFF[-1] * 1.2 + TAKEOVER_SLACK


def check_delayed_tasks(run: RunFacts) -> Finding:
    """Each delayed task Redis accepted was held as scheduled, due at its enqueue's Redis time
    plus its delay; and no run of one started before Redis's clock reached its due time."""
    finding = Finding()
    unscheduled: list[Event] = []
    misdated: list[str] = []
    early: list[tuple[Event, Event, int]] = []
    waits: list[float] = []
    unknown = started = 0
    for e in run.accepted.delayed:
        if e["status"] == "accepted" and e.get("scheduled") != "scheduled":
            unscheduled.append(e)
            continue
        starts = [x for x in run.executions.by_task.get(e["task_id"], ()) if x["event"] == "start"]
        # Counted whether or not its due time was read: a task that ran has started.
        started += bool(starts)
        due = e.get("due")
        if due is None:
            unknown += 1  # a retry whose first attempt's reply was lost: Redis's due time unread
            continue
        misdated += _misdated(e, int(due), starts)
        reached_us, _ = due_reached(e, run.clock)
        early += [(e, x, reached_us) for x in starts if _us(x["t"]) + JOURNAL_US < reached_us]
        if starts:
            waits.append(starts[0]["t"] - reached_us / 1e6)
    if unscheduled:
        e = unscheduled[0]
        finding.breaches.append(
            f"{len(unscheduled)} delayed tasks were not held as scheduled right after their enqueue, e.g. "
            f"{e['queue']} #{e['seq']} (delay {e['delay_ms']} ms): its status in the enqueue's transaction "
            f"said {e.get('scheduled')!r}"
        )
    if misdated:
        finding.breaches.append(
            f"{len(misdated)} delayed tasks are due at another time than their enqueue's plus their delay, e.g. "
            + "; ".join(misdated[:3])
        )
    if early:
        e, x, reached_us = early[0]
        finding.breaches.append(
            f"{len(early)} runs of delayed tasks started before Redis's clock reached their due time, e.g. "
            f"{e['queue']} #{e['seq']} on {x['replica']} at {x['t']:.6f}, {(reached_us - _us(x['t'])) / 1000:.3f} ms "
            f"before its due time {e['due']} (Redis ms)"
        )
    finding.figures = {
        "delayed": len(run.accepted.delayed),
        "delayed_started": started,
        "delayed_place_unknown": sum(1 for e in run.accepted.unsure if "delay_ms" in e),
        "delayed_due_unknown": unknown,
        "delayed_early_starts": len(early),
        "delayed_wait_max": _max(waits),
        "delayed_wait_median": _median(waits),
    }
    return finding


def _misdated(e: Event, due: int, starts: list[Event]) -> list[str]:
    """What is wrong with delayed acceptance ``e``'s due time (none: nothing): it must be the
    enqueue's Redis ms plus the delay. That ms lies between the two TIME readings of the
    enqueue's transaction, and is exactly the stamp in the task's entry, which its runs journal."""
    where = f"{e['queue']} #{e['seq']} due {due}"
    shift = int(e.get("redis_clock_shift_ms", 0)) * 1000  # the readings were put on this machine's clock
    if "order_from" in e:
        low = (int(e["order_from"]) + shift) // 1000 + int(e["delay_ms"])
        high = (int(e["order"][0]) + shift) // 1000 + int(e["delay_ms"])
        if not low <= due <= high:
            return [f"{where}, not within [{low}, {high}] (Redis's clock around the enqueue plus {e['delay_ms']} ms)"]
    stamp = next((int(x["enqueued_ms"]) for x in starts if "enqueued_ms" in x), None)
    if stamp is not None and stamp + int(e["delay_ms"]) != due:
        return [f"{where}, enqueued at {stamp} + {e['delay_ms']} ms"]
    return []


def check_ticks(run: RunFacts) -> Finding:
    """The replicas' periodic schedule: one task id per tick; every tick Redis moved past was
    enqueued and its task ran (or waited in the stream when every replica had stopped), none
    missing from the first to the last, and Redis's count of tick tasks agrees; ticks ran
    through the whole run; their tasks first ran in tick order, each aligned to the interval,
    and none was enqueued, or started, before Redis's clock reached its tick."""
    ticks = run.ticks
    if not ticks.present:
        return Finding(figures={"ticks": 0})
    every = ticks.every_ms or 1000
    ids = ticks.ids()
    first_start: dict[int, float] = {}
    for e in ticks.starts:
        first_start.setdefault(int(e["tick"]), e["t"])
    finding = Finding()
    twice, excused = _twice(run, ids, first_start, finding)
    record = ticks.record or {}
    last = record.get("last") if record.get("last") is not None else max(ids, default=None)
    missing = _unaccounted(run, every, ids, last, finding)
    finding.breaches += _outside_window(run, every, ids, last)
    finding.breaches += _tick_order(ticks.starts)
    early = _early_ticks(run, finding)
    lags = [t0 - run.clock.reached(t)[0] / 1e6 for t, t0 in first_start.items()]
    finding.figures = {
        "ticks": len(ticks.ran),
        "tick_tasks": sum(len(i) for i in ids.values()),
        "ticks_fired_by_redis": record.get("fired"),
        "ticks_skipped_by_redis": record.get("skipped"),
        "ticks_twice": twice - excused,
        "ticks_twice_lost_to_redis_durability": excused,
        "ticks_missing": missing,
        "ticks_left_at_end": sum(len(i) for i in ticks.left.values()),
        "tick_early_starts": early,
        "tick_lag_max": _max(lags),
        "tick_lag_median": _median(lags),
    }
    return finding


def _twice(run: RunFacts, ids: dict[int, set[str]], first_start: dict[int, float], finding: Finding) -> tuple[int, int]:
    """Ticks with more than one task id, and how many of them a crash excuses (``_lost_enqueue``);
    the others are breaches."""
    lossy = _lossy_crashes(run)
    twice = {t: sorted(i) for t, i in ids.items() if len(i) > 1}
    excused = {t for t in twice if _lost_enqueue(run, lossy, t, first_start.get(t, math.inf))}
    breached = sorted(set(twice) - excused)
    for t in breached[:3]:
        finding.breaches.append(f"tick {t} was enqueued twice: task ids {', '.join(twice[t])}")
    if len(breached) > 3:
        finding.breaches.append(f"{len(breached)} ticks in all were enqueued twice")
    return len(twice), len(excused)


def _unaccounted(run: RunFacts, every: int, ids: dict[int, set[str]], last: int | None, finding: Finding) -> int:
    """Every tick from the first to the last Redis moved past has a task that ran to its end (or
    was left in the stream, or dead-lettered), each aligned to the interval, and Redis's count
    of the tasks it fired is the count of their ids (at least, after a crash that may have lost
    a fired task that had run: the count went back with it). Returns how many are missing."""
    ticks = run.ticks
    owed = range(min(ids), int(last) + 1, every) if ids and last is not None else range(0)
    missing = [t for t in owed if t not in ids]
    if missing:
        finding.breaches.append(
            f"{len(missing)} ticks between the first ({owed.start}) and the last ({last}) were never enqueued "
            f"or never ran, e.g. {missing[:5]}"
        )
    unaligned = sorted(t for t in ids if t % every)
    if unaligned:
        finding.breaches.append(
            f"{len(unaligned)} ticks are not aligned to the {every} ms interval, e.g. {unaligned[:3]}"
        )
    unfinished = [
        t for t, i in ticks.ran.items() if not i & ticks.ended and t not in ticks.left and t not in ticks.dead
    ]
    if unfinished:
        finding.breaches.append(
            f"{len(unfinished)} ticks' tasks started but never ended, nor were they left in the stream, e.g. "
            f"{sorted(unfinished)[:3]}"
        )
    known = sum(len(i) for i in ids.values())
    fired = (ticks.record or {}).get("fired")
    if fired is not None and (known < fired if _lossy_crashes(run) else known != fired):
        finding.breaches.append(
            f"Redis counted {fired} tick tasks enqueued, the journal and the stream hold {known} (run, left in "
            "the stream at the end, dead-lettered)"
        )
    return len(missing)


def _early_ticks(run: RunFacts, finding: Finding) -> int:
    """No tick's task was enqueued before Redis's clock reached the tick (the tick script refuses
    a tick still ahead of its clock, and stamps the task with that clock), nor started before.
    Returns how many runs started early."""
    starts = run.ticks.starts
    fired_early = sorted(
        {int(e["tick"]) for e in starts if "enqueued_ms" in e and int(e["enqueued_ms"]) < int(e["tick"])}
    )
    if fired_early:
        finding.breaches.append(
            f"{len(fired_early)} ticks' tasks were enqueued before Redis's clock reached the tick, "
            f"e.g. {fired_early[:3]}"
        )
    early = [(e, r) for e in starts if _us(e["t"]) + JOURNAL_US < (r := run.clock.reached(int(e["tick"]))[0])]
    if early:
        e, reached_us = early[0]
        finding.breaches.append(
            f"{len(early)} runs of tick tasks started before Redis's clock reached their tick, e.g. tick "
            f"{e['tick']} on {e['replica']} {(reached_us - _us(e['t'])) / 1000:.3f} ms early"
        )
    return len(early)


def _lossy_crashes(run: RunFacts) -> list[Event]:
    """Redis crashes that may have lost the writes of their last second (appendfsync=everysec)."""
    return [f for f in run.faults if f["kind"] == "redis-crash" and f.get("appendfsync") == "everysec"]


def _lost_enqueue(run: RunFacts, lossy: list[Event], tick: int, first_start: float) -> bool:
    """Whether a crash can have lost the enqueue of ``tick``'s first task, and with it the
    schedule's move past the tick (one script, one transaction in the AOF): the replicas then
    fire the tick again, under another task id. Redis's documented durability limit, as for a
    lost task (``check_lost_tasks``): the enqueue came after Redis's clock reached the tick and
    before its task first started, within ``EVERYSEC_WINDOW`` of the crash."""
    since = run.clock.reached(tick)[0] / 1e6
    return any(since <= float(f["t_down"]) <= first_start + EVERYSEC_WINDOW for f in lossy)


def _outside_window(run: RunFacts, every: int, ids: dict[int, set[str]], last: int | None) -> list[str]:
    """The schedule ran from when the fleet was ready until the queues drained: its first tick
    and its last are each within ``every`` + ``TICK_LATENESS`` of those, and no tick due that
    long before the drain was still waiting in the stream after it. A Redis clock set back
    delays ticks by as much (the new clock reads again the ticks its predecessor passed)."""
    window = run.ticks.window
    if window is None or not ids or last is None:
        return []
    ready, drained = window
    late = every / 1000 + TICK_LATENESS + _set_back_s(run)
    out = []
    first, due_first = min(ids), run.clock.latest_tick(ready + late, every)
    if first > due_first:
        out.append(f"the schedule's first tick was {first}, later than {due_first}: it did not start with the fleet")
    due_last = run.clock.latest_tick(drained - late, every)
    if last < due_last:
        out.append(f"the schedule's last tick was {last}, earlier than {due_last}: it stopped before the run's end")
    stale = sorted(t for t in run.ticks.left if run.clock.reached(t)[0] / 1e6 < drained - late)
    if stale:
        out.append(
            f"{len(stale)} ticks due more than {late:.1f}s before the queues drained were still waiting in the "
            f"stream at the end, e.g. {stale[:3]}"
        )
    return out


def _set_back_s(run: RunFacts) -> float:
    """The largest step back of Redis's clock at a restart, in seconds."""
    return max(
        (
            max(0, int(f.get("previous_shift_ms", 0)) - int(f.get("shift_ms", 0))) / 1000
            for f in run.faults
            if f["kind"] in REDIS_FAULTS
        ),
        default=0.0,
    )


def _tick_order(starts: Iterable[Event]) -> list[str]:
    """Tick tasks first ran in the order of their ticks: one stream, enqueued tick after tick."""
    seen: set[int] = set()
    top: Event | None = None
    for e in starts:
        tick = int(e["tick"])
        if tick in seen:
            continue
        seen.add(tick)
        if top is not None and tick < int(top["tick"]):
            return [f"tick {tick} first ran at {e['t']:.3f}, after tick {top['tick']}: ticks ran out of order"]
        top = e
    return []


def _us(t: float) -> int:
    return round(t * 1e6)
