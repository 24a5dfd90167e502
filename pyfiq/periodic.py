"""Periodic schedules on a registry: ``Registry.periodic`` (``@fifo.periodic``) binds a function
that also runs on a schedule, and ``schedules_of`` tells a worker which schedules to fire. The
schedules' core (rules, ticks, what Redis answers) is ``engine.ticks``."""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, cast

from .engine.keys import stream_name
from .engine.ticks import CatchUp, Schedule, periodic_rule, validate_schedule_name
from .errors import ConfigurationError
from .task import expires_in_ms

if TYPE_CHECKING:
    from .functions import Bind, FifoFunction

P = ParamSpec("P")


class Periodic:
    """What ``Registry`` gets for schedules: it provides ``fifo`` and ``_functions``."""

    _functions: dict[str, FifoFunction[Any, Any]]
    fifo: Callable[..., Bind]

    def periodic(
        self,
        queue: str | None = None,
        *,
        every: float | dt.timedelta | None = None,
        cron: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        catch_up: CatchUp = "once",
        version: int = 0,
        schedule: str | None = None,
        **options: Any,
    ) -> Bind:
        """Bind a function to an ordered queue, as ``fifo`` does (``options`` are ``fifo``'s),
        and run it on a schedule: every tick enqueues exactly one task, fleet-wide, whichever
        and however many workers consuming ``queue`` are alive (each of them fires the
        schedule; Redis lets one of them per tick). Calling the function still enqueues.

        - ``every`` (seconds or a ``timedelta``, ticks aligned to the epoch: ``every=60`` ticks on
          the minute) or ``cron`` (a cron line, in UTC; ``pip install 'pyfiq[cron]'``).
        - ``args`` / ``kwargs``: what each tick's task is called with (checked here).
        - ``catch_up``: ticks that passed while no worker ran the schedule are enqueued
          ``"once"`` (one task, the default), ``"skip"``-ped, or ``"all"`` enqueued, oldest first.
        - ``schedule``: its name in Redis (default: the task name): with its stream, its identity
          across deploys (moved to another queue or key, it is another schedule).
          ``version``: a replica whose definition has a lower version than one Redis has seen
          fires nothing, so bump it with a changed rule and the old replicas of a rolling deploy
          stand down at once.

        While the queue (or the schedule's stream) is paused, ticks enqueue nothing: they are
        counted as skipped, and the first tick after the resume enqueues as usual.
        """
        rule = periodic_rule(every, cron, catch_up, version, schedule)
        bind = self.fifo(queue, **options)
        call_args, call_kwargs = tuple(args), dict(kwargs or {})

        def bind_periodic(func: Callable[P, Any]) -> FifoFunction[P, Any]:
            task = options.get("name") or f"{func.__module__}.{func.__qualname__}"
            name = validate_schedule_name(schedule or task)
            self._check_unique(name, task)
            try:
                inspect.signature(func).bind(*call_args, **call_kwargs)
            except TypeError as exc:
                raise TypeError(f"{task}: {exc}: its ticks could never run; nothing was bound") from None
            binding = bind(func)
            key = binding.key_of(call_args, call_kwargs)
            binding.schedule = Schedule(
                name=name,
                task=binding.name,
                queue=binding.queue,
                stream=stream_name(binding.queue, key),
                rule=rule,
                catch_up=catch_up,
                version=version,
                args=call_args,
                kwargs=call_kwargs,
                key=key,
                expires_in_ms=expires_in_ms(binding.expires_in),
            )
            return binding

        return cast("Bind", bind_periodic)

    def schedules_of(self, queues: Iterable[str] | None) -> list[Schedule]:
        """The schedules of this registry's functions on ``queues`` (None: on every queue)."""
        wanted = None if queues is None else set(queues)
        found = [f.schedule for f in list(self._functions.values()) if f.schedule is not None]
        return [s for s in found if wanted is None or s.queue in wanted]

    def _check_unique(self, name: str, task: str) -> None:
        """Two functions of one registry firing one schedule would share its last tick: refused
        (a function defined again under its own task name takes its schedule over)."""
        for other in list(self._functions.values()):
            if other.schedule is not None and other.schedule.name == name and other.name != task:
                raise ConfigurationError(
                    f"schedule {name!r} is already fired by {other.name!r}: give this one schedule= of its own"
                )
