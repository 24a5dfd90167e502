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


# -- the script table: every fact about a Lua script is stated once, in pyfiq/engine/scripts.py --

SCRIPT_TABLE = PACKAGE / "engine" / "scripts.py"
LUA = PACKAGE / "engine" / "lua"


def test_the_script_table_the_names_and_the_lua_files_agree() -> None:
    from typing import get_args

    from pyfiq.engine.scripts import SCRIPTS, SPECS, ScriptName

    names = [spec.name for spec in SCRIPTS]
    assert len(names) == len(set(names)) == len(SPECS)
    assert set(names) == set(get_args(ScriptName))
    assert set(names) == {p.stem for p in LUA.glob("*.lua")} - {"lib"}


def test_every_key_the_table_names_is_one_the_schema_builds() -> None:
    from dataclasses import fields

    from pyfiq.engine.keys import KeySchema, ScheduleKeys, StreamKeys
    from pyfiq.engine.scripts import SCRIPTS

    schema = KeySchema("layout", 4)
    stream_keys = {f.name for f in fields(StreamKeys)} - {"stream", "shard", "_dedup_prefix"}
    for spec in SCRIPTS:
        for name in spec.keys:
            if spec.scope == "stream":
                assert name in stream_keys, (spec.name, name)
                continue
            if spec.scope == "schedule":
                assert name in {f.name for f in fields(ScheduleKeys)}, (spec.name, name)
                continue
            key = getattr(schema, name)
            key = key if spec.scope == "fleet" else key(1 if spec.scope == "shard" else "q")
            assert isinstance(key, str) and key.startswith("layout:"), (spec.name, name)


@pytest.mark.parametrize("name", sorted(p.stem for p in LUA.glob("*.lua") if p.stem != "lib"))
def test_every_script_names_its_keys_in_the_order_the_table_states(name: str) -> None:
    """Each ``KEYS[n]`` is bound once, at the top, to the name the table gives it, documented in
    the header, and used nowhere else by number."""
    import re

    from pyfiq.engine.scripts import SPECS

    text = (LUA / f"{name}.lua").read_text()
    declared = re.findall(r"^local (\w+) = KEYS\[(\d+)\]$", text, flags=re.M)
    assert [n for n, _ in declared] == list(SPECS[name].keys)  # type: ignore[index]
    assert [int(i) for _, i in declared] == list(range(1, len(declared) + 1))
    documented = re.findall(r"^\s+KEYS\[(\d+)\]\s", text, flags=re.M)
    assert [int(i) for i in documented] == list(range(1, len(declared) + 1)), "header"
    body = text[text.index("]]") :]
    prelude = "".join(f"local {n} = KEYS[{i}]\n" for n, i in declared)
    assert not re.search(r"KEYS\[\d+\]", body.replace(prelude, "")), "a key used by number"


#: What builds a script call from a script's name.
CALL_BUILDERS = {"Call", "stream_call", "_schema_call"}


def _key_names() -> set[str]:
    from dataclasses import fields

    from pyfiq.engine.keys import StreamKeys
    from pyfiq.engine.scripts import SCRIPTS

    return {f.name for f in fields(StreamKeys)} | {name for spec in SCRIPTS for name in spec.keys}


def _script_lists(tree: ast.Module, names: set[str]) -> list[str]:
    """Module-level tables of scripts by name (a list of the mutating ones, of every one)."""
    found = []
    values = [s.value for s in tree.body if isinstance(s, ast.Assign | ast.AnnAssign) and s.value is not None]
    for node in (n for value in values for n in ast.walk(value)):
        elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", [])
        listed = [e.value for e in elts if isinstance(e, ast.Constant) and e.value in names]
        if isinstance(node, ast.Dict | ast.Tuple | ast.List | ast.Set) and len(elts) > 1 and len(listed) == len(elts):
            found.append(f"line {node.lineno}: scripts listed by name")
    return found


def _script_facts(path: Path) -> list[str]:
    """Where ``path`` names a script by a string in a call it builds, lists keys in order, or
    keeps its own table of scripts by name."""
    from pyfiq.engine.scripts import SPECS

    tree = ast.parse(path.read_text())
    keys, found = _key_names(), _script_lists(tree, set(SPECS))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            named = [*node.args[:1], *(k.value for k in node.keywords if k.arg == "script")]
            if called in CALL_BUILDERS and any(isinstance(a, ast.Constant) and a.value in SPECS for a in named):
                found.append(f"line {node.lineno}: {called}() names its script by a string")
        elif isinstance(node, ast.Tuple | ast.List) and len(node.elts) > 1:
            values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if len(values) == len(node.elts) and all(isinstance(v, str) and v in keys for v in values):
                found.append(f"line {node.lineno}: keys listed in order {values}")
    return found


@pytest.mark.parametrize(
    "path", [p for p in modules_under() if p != SCRIPT_TABLE], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_module_but_the_table_states_a_scripts_keys_or_names_it_by_a_string(path: Path) -> None:
    found = _script_facts(path)
    assert not found, f"{path.relative_to(PACKAGE)}: {found}; state it in engine/scripts.py and read it from there"


def test_the_script_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        'KEYS = ("lease", "meta")\nc = Call("take", [], [])\nd = stream_call(script="due")\n'
        'MUTATING = frozenset({"take", "release"})\n'
        'ok = TAKE\nending = call.script in (TAKE.name, RELEASE.name)\nSTATES = {"run": 1, "take": 2}\n'
    )
    assert len(_script_facts(sample)) == 4


def test_each_script_carries_the_lib_definitions_it_uses_and_no_other() -> None:
    """Redis runs a script's whole chunk on every call, so each carries only what it calls
    (directly or through another helper); a name a comment mentions pulls nothing in."""
    from importlib import resources

    from pyfiq.backend.scripts import lib_definitions, needed, source, used_names
    from pyfiq.engine.scripts import SCRIPTS

    lib = resources.files("pyfiq.engine").joinpath("lua", "lib.lua").read_text()
    definitions = lib_definitions(lib)
    assert {"now_ms", "hand_out", "promote", "PUSH_SLICE"} <= set(definitions)
    for spec in SCRIPTS:
        body = resources.files("pyfiq.engine").joinpath("lua", f"{spec.name}.lua").read_text()
        carried = needed(definitions, body)
        text = source(spec.name)
        for name in definitions:
            assert (definitions[name].rstrip("\n") in text) == (name in carried), (spec.name, name)
        # Closed under use: whatever a carried helper calls is carried too.
        for name in carried:
            assert set(used_names(definitions[name], definitions)) <= set(carried), (spec.name, name)
    assert needed(definitions, "-- see promote and hand_out\nreturn now_ms()") == ["now_ms"]
    assert "hand_out" in needed(definitions, "hand_out(s, 0, 1, 5, 0, {})")
    assert "parse_entry" in needed(definitions, "hand_out(s, 0, 1, 5, 0, {})"), "through hand_out"
