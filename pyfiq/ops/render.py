"""Presentation of what the operator tools read: dead letters as plain data, one JSON line per
row, and a task's traceback without the frames of the machinery around it."""

from __future__ import annotations

import json
import re
from typing import Any

from ..task import DeadLetter

#: A frame: its "File" line, then its indented lines (the source line, and the markers under it
#: that Python 3.11+ adds).
_FRAME = re.compile(r'^  File "([^"]+)", line \d+, in .*\n(?:    .*\n)*', re.M)
#: Frames of the machinery that runs a task: pyfiq, tenacity, and the thread pool pyfiq hands a
#: plain function to.
_MACHINERY = ("/pyfiq/", "/tenacity/", "/concurrent/futures/")


def task_traceback(text: str) -> str:
    """A task's traceback without the frames of the machinery around the task's own."""

    def keep(m: re.Match[str]) -> str:
        path = m.group(1).replace("\\", "/")
        return "" if any(part in path for part in _MACHINERY) else m.group(0)

    return _FRAME.sub(keep, text)


def dead_letter_dict(d: DeadLetter) -> dict[str, Any]:
    """A dead letter as plain data (for ``--json``)."""
    return {
        "stream": d.stream,
        "task_id": d.task_id,
        "reason": d.reason,
        "name": d.record.name if d.record else d.header.get("name"),
        "args": d.record.args if d.record else None,
        "kwargs": d.record.kwargs if d.record else None,
        **{k: v for k, v in d.header.items() if k != "traceback"},
        "traceback": task_traceback(str(d.header.get("traceback", ""))),
    }


def to_json(row: dict[str, Any]) -> str:
    return json.dumps(row, default=str, separators=(",", ":"))


def shown_result(encoded: bytes, serializer: Any, limit: int = 2_000) -> str:
    """A stored result as an operator reads it: the repr of its value, cut to ``limit``."""
    try:
        text = repr(serializer.loads(encoded))
    except Exception as exc:
        text = f"<{len(encoded)} bytes the serializer cannot read: {type(exc).__name__}>"
    return text if len(text) <= limit else text[:limit] + f"... [{len(text):,} characters]"
