"""The engine is sans-I/O: none of its modules imports the clock, threads, logging, hooks,
asyncio or redis, at module level or inside a function. Its drivers give it a clock and locks,
and log, call hooks and run callbacks from the events it keeps; every event has a reporter."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

import pyfiq.engine
from pyfiq.engine import events
from pyfiq.workers import reports

ENGINE = Path(pyfiq.engine.__file__).parent
FORBIDDEN = ("time", "threading", "logging", "structlog", "asyncio", "redis", "pyfiq.logs", "pyfiq.hooks")


def imported(source: str) -> set[str]:
    """Absolute names of every module an engine module's ``source`` imports, anywhere in it
    (``TYPE_CHECKING`` blocks and functions included: an import deferred to run time or needed
    only for types is a dependency all the same)."""
    package = ["pyfiq", "engine"]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return found


def forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f"{f}.") for f in FORBIDDEN)


@pytest.mark.parametrize("path", sorted(ENGINE.glob("*.py")), ids=lambda p: p.name)
def test_the_engine_imports_no_clock_thread_logger_hook_loop_or_redis(path: Path) -> None:
    bad = sorted(name for name in imported(path.read_text()) if forbidden(name))
    assert not bad, f"pyfiq/engine/{path.name} imports {bad}"


def test_the_check_sees_relative_aliased_and_deferred_imports() -> None:
    source = "from ..logs import log\nfrom .. import hooks\nimport time as clock\ndef f():\n    import threading\n"
    assert sorted(name for name in imported(source) if forbidden(name)) == [
        "pyfiq.hooks",
        "pyfiq.logs",
        "pyfiq.logs.log",
        "threading",
        "time",
    ]
    assert not forbidden("timeit") and not forbidden("redis_compat") and not forbidden("pyfiq.engine.events")


def test_every_event_the_engine_keeps_has_a_reporter_in_the_drivers() -> None:
    kept = set(typing.get_args(events.Event))
    assert kept and kept == set(reports._REPORTERS)
