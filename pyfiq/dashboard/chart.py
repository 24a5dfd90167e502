"""The queue page's history chart: tasks that succeeded and failed per minute over the last hour
(``admin.history``), laid out here as bars for an inline SVG that ``_history.html`` draws.

Drawn on the server: no chart library, no script, nothing fetched from elsewhere, so the page
keeps its Content-Security-Policy (inline SVG in the HTML is part of the page, and its colours
come from the dashboard's own stylesheet). The numbers behind it are on the page as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from ..backend.views import QueueHistory

#: The drawing's own units (the SVG scales to the width it is given): the plot, and room for
#: the scale on the left and the time labels below.
WIDTH, HEIGHT = 640, 150
LEFT, BOTTOM, TOP = 40, 20, 8
#: Horizontal room of one minute given to the space between two bars.
GAP = 0.2


@dataclass(frozen=True)
class Bar:
    """One minute: where its bar stands, its two stacked parts (succeeded below, failed above)."""

    label: str
    succeeded: int
    failed: int
    x: float
    width: float
    ok_y: float
    ok_height: float
    failed_y: float
    failed_height: float


@dataclass(frozen=True)
class Figure:
    """What ``_history.html`` draws: the bars, the top of the scale and the totals."""

    bars: list[Bar]
    top: int
    busiest: int
    succeeded: int
    failed: int
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom: float = HEIGHT - BOTTOM
    plot_top: int = TOP


def nice_top(value: int) -> int:
    """The scale's top: the smallest of 1, 2, 5, 10, 20, 50... at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1
    power = int(10 ** (len(str(value)) - 1))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def minute_label(start_ms: int) -> str:
    return datetime.fromtimestamp(start_ms / 1000, tz=timezone.utc).strftime("%H:%M")


def figure(history: QueueHistory) -> Figure:
    """The bars of ``history``, one per minute, oldest on the left, on a scale from 0 to a round
    number at or above the busiest minute."""
    minutes = history.minutes()
    busiest = max((ok + failed for _, ok, failed in minutes), default=0)
    top = nice_top(busiest)
    plot = HEIGHT - BOTTOM - TOP
    step = (WIDTH - LEFT) / max(1, len(minutes))
    bars = []
    for i, (start, ok, failed) in enumerate(minutes):
        ok_height = plot * ok / top
        failed_height = plot * failed / top
        base = HEIGHT - BOTTOM
        bars.append(
            Bar(
                label=minute_label(start),
                succeeded=ok,
                failed=failed,
                x=round(LEFT + i * step + step * GAP / 2, 2),
                width=round(step * (1 - GAP), 2),
                ok_y=round(base - ok_height, 2),
                ok_height=round(ok_height, 2),
                failed_y=round(base - ok_height - failed_height, 2),
                failed_height=round(failed_height, 2),
            )
        )
    return Figure(bars, top, busiest, sum(history.succeeded), sum(history.failed))
