"""The shape of the package: what may import what, the twin workers, pyfiq.testing, and a wheel
that holds the runtime alone (the fault-injection harness is a distribution of its own)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import pyfiq
from pyfiq import AsyncWorker, ThreadedWorker, fifo
from pyfiq.testing import drain, memory_backend

PACKAGE = Path(pyfiq.__file__).parent


def module_imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.If):  # TYPE_CHECKING blocks import nothing at run time
            continue
    return found


def modules_under(*parts: str) -> list[Path]:
    return sorted((PACKAGE.joinpath(*parts)).rglob("*.py"))


@pytest.mark.parametrize("path", modules_under("engine"), ids=lambda p: p.name)
def test_the_engine_does_no_io_and_knows_no_driver(path: Path) -> None:
    # No I/O, no driver, and nothing a driver does for it: no clock, no threads, no logging, no hooks.
    forbidden = (
        *(
            "redis",
            "pyfiq.backend",
            "pyfiq.functions",
            "pyfiq.options",
            "pyfiq.workers",
            "pyfiq.ops",
            "pyfiq_harness",
            "asyncio",
        ),
        *("time", "threading", "logging", "structlog", "pyfiq.logs", "pyfiq.hooks"),
    )
    bad = {m for m in module_imports(path) if m.startswith(forbidden) and not m.startswith("redis_")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


RUNTIME = [p for p in modules_under() if p.name != "testing.py"]
#: What only the repository uses around the runtime: never imported by it, at any depth.
TOOLING = {"pyfiq_harness", "benchmarks", "tests"}


def every_import(path: Path) -> set[str]:
    """Absolute names of every module a file imports, inside functions too."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.add(".".join([*base, *([node.module] if node.module else [])]))
    return found


@pytest.mark.parametrize("path", RUNTIME, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_runtime_never_imports_test_tooling(path: Path) -> None:
    bad = {m for m in every_import(path) if m.split(".")[0] in TOOLING or m.startswith("pyfiq.testing")}
    assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_the_wheel_holds_the_runtime_alone() -> None:
    """The wheel's hatch configuration packages ``pyfiq`` and nothing else, and nothing of the
    harness (its modules, the clock shim's C source) sits inside the package directory."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    wheel = config["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == ["pyfiq"]
    assert not {"include", "only-include", "force-include", "sources"} & set(wheel), wheel
    assert not (PACKAGE / "chaos").exists()
    assert not [p for p in PACKAGE.rglob("*") if p.suffix in {".c", ".so"}]
    harness = PACKAGE.parent / "harness" / "pyfiq_harness"
    assert harness.is_dir() and not harness.is_relative_to(PACKAGE)


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]  # the docstring
            if body:
                out.append((node.name, (body[-1].end_lineno or 0) - body[0].lineno + 1))
    return out


#: The most lines a runtime function's body may have, and a runtime module.
FUNCTION_LINES = 50
MODULE_LINES = 550


@pytest.mark.parametrize("path", RUNTIME, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_runtime_functions_stay_short(path: Path) -> None:
    long = [(name, n) for name, n in _function_lengths(path) if n > FUNCTION_LINES]
    assert not long, f"{path.relative_to(PACKAGE)}: {long}"


@pytest.mark.parametrize("path", RUNTIME, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_runtime_modules_stay_readable(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MODULE_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it along its concerns"


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_the_two_workers_are_twins() -> None:
    assert _public(ThreadedWorker) == _public(AsyncWorker)
    assert (
        ThreadedWorker.__init__.__code__.co_varnames[: ThreadedWorker.__init__.__code__.co_argcount]
        == (AsyncWorker.__init__.__code__.co_varnames[: AsyncWorker.__init__.__code__.co_argcount])
    )


@pytest.mark.parametrize("name", pyfiq.__all__)
def test_every_public_name_is_documented(name: str) -> None:
    obj = getattr(pyfiq, name)
    if callable(obj) and not isinstance(obj, str):
        assert (obj.__doc__ or "").strip(), f"pyfiq.{name} has no docstring"


def test_every_module_says_what_it_owns() -> None:
    missing = [
        str(p.relative_to(PACKAGE))
        for p in modules_under()
        if p.name != "__main__.py" and not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not missing, missing


def test_testing_helpers_run_tasks_to_the_end() -> None:
    backend = memory_backend()
    seen: list[int] = []

    @fifo(queue="layout-testing", name="tests.layout.record")
    def record(i: int) -> None:
        seen.append(i)

    for i in range(5):
        record(i)
    drain(backend, ["layout-testing"])
    assert seen == [0, 1, 2, 3, 4]
    assert backend.queue_info("layout-testing")["pending"] == 0


def test_drain_gives_up_on_a_queue_that_never_empties() -> None:
    backend = memory_backend()

    @fifo(queue="layout-blocked", name="tests.layout.blocked", max_retries=-1, retry_wait=0.01)
    def blocked() -> None:
        raise RuntimeError("never succeeds")

    blocked()
    with pytest.raises(TimeoutError, match="layout-blocked"):
        drain(backend, ["layout-blocked"], timeout=0.5)
