"""The run's files: their names, JSON lines appended and read back, and the tail of the
execution journal that the injector follows while replicas write it.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Event = dict[str, Any]

EXECUTIONS = "executions.jsonl"
FAULTS = "faults.jsonl"
DEAD_LETTERS = "dead-letters.jsonl"
#: What the runner found of the replicas' periodic schedule (``scenario.Scenario.collect``).
TICKS = "ticks.json"
ACCEPTED_GLOB = "accepted-*.jsonl"
#: Sequence numbers of one producer run: ``producer number * SEQ_BLOCK + n``.
SEQ_BLOCK = 10_000_000


def append_line(path: Path, line: dict[str, Any]) -> None:
    """Append one JSON line with one O_APPEND write: concurrent writers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[Event]:
    """A JSON-lines file, skipping a last line still being written."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.split(b"\n"):
        if raw.strip():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(raw))
    return out


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _max(values: Sequence[float]) -> float | None:
    return round(max(values), 3) if values else None


class JournalTail:
    """Follows the execution journal while replicas write it: open runs per process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.open: dict[tuple[int, str, int], Event] = {}
        self.ends = 0
        self.starts = 0
        #: Every line of the tasks a fault follows (``watch``), in journal order.
        self.watched: dict[str, list[Event]] = {}

    def watch(self, task_id: str) -> None:
        self.watched.setdefault(task_id, [])

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            if not raw.strip():
                continue
            e = json.loads(raw)
            if e["task_id"] in self.watched:
                self.watched[e["task_id"]].append(e)
            key = (e["pid"], e["task_id"], e["attempt"])
            if e["event"] == "start":
                self.starts += 1
                self.open[key] = e
            else:
                self.ends += e["event"] == "end"
                self.open.pop(key, None)

    def open_runs(self) -> list[Event]:
        return sorted(self.open.values(), key=lambda e: e["t"])
