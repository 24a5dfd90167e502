"""What a replica remembers of tasks it has no function for (a rolling deploy removed or renamed
it, or the replica is older than the producer): since when it has met each one, because its
grace (``unknown_task_grace``) runs from its first meeting here, and when it last said that it
handed each stream back, which it says once per grace period rather than at every hand-back
(about one a second per replica). Both memories are bounded. Must not import redis or do I/O.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any

from .events import Clock

#: At most this many task ids (and as many streams) are remembered per worker.
UNKNOWN_MEMORY = 10_000


class UnknownTasks:
    def __init__(self, clock: Clock, grace: float, lock: AbstractContextManager[Any]) -> None:
        """``lock``: the scheduler's own (its memories are read from the workers' threads)."""
        self.clock, self.grace = clock, grace
        self._lock = lock
        self._since: dict[str, float] = {}
        self._said: dict[str, float] = {}

    def met_for(self, task_id: str) -> float:
        """Seconds since this replica first met ``task_id`` without a function for it."""
        now = self.clock.monotonic()
        with self._lock:
            if len(self._since) > UNKNOWN_MEMORY:
                self._since.clear()
            return now - self._since.setdefault(task_id, now)

    def forget(self, task_id: str) -> None:
        """The task ran or was dead-lettered: its grace starts again at a later meeting."""
        if self._since:
            with self._lock:
                self._since.pop(task_id, None)

    def first_hand_back(self, stream: str) -> bool:
        """Whether this hand-back of ``stream`` is said: the first in a grace period."""
        now = self.clock.monotonic()
        with self._lock:
            if len(self._said) >= UNKNOWN_MEMORY:
                self._said = {s: t for s, t in self._said.items() if now - t < self.grace}
            if now - self._said.get(stream, -math.inf) < self.grace:
                return False
            self._said[stream] = now
            return True
