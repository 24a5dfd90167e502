"""Loads the Lua scripts of the engine's table (``engine.scripts.SCRIPTS``) and registers each
once per client.

``register_script`` gives EVALSHA with an automatic reload on NOSCRIPT, for a sync client and
(awaitable) for a ``redis.asyncio`` client alike, so both workers share these objects.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any

from ..engine.keys import COUNT_MINUTES
from ..engine.scripts import SCRIPTS, ScriptName
from ..task import ID_LENGTH, TIME_DIGITS

#: The entry layout, defined once in Python and handed to every script as constants.
CONSTANTS = f"local ID_LENGTH = {ID_LENGTH}\nlocal TIME_DIGITS = {TIME_DIGITS}\nlocal COUNT_MINUTES = {COUNT_MINUTES}\n"


#: A top-level definition of lib.lua: ``local function name(`` or ``local NAME =``.
_DEFINITION = re.compile(r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*)\b", re.M)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Lua comments, block and line, so that a name a comment mentions pulls nothing in.
_COMMENT = re.compile(r"--\[\[.*?\]\]|--[^\n]*", re.S)


def used_names(code: str, definitions: dict[str, str]) -> list[str]:
    return [w for w in _WORD.findall(_COMMENT.sub(" ", code)) if w in definitions]


def lib_definitions(lib: str) -> dict[str, str]:
    """lib.lua cut into its top-level definitions, in file order, each running up to the next
    one (so it ends with the comment of the next: comments cost nothing once compiled). The
    file's header, before the first definition, belongs to none."""
    starts = list(_DEFINITION.finditer(lib))
    out: dict[str, str] = {}
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(lib)
        out[m.group(1)] = lib[m.start() : end]
    return out


def needed(definitions: dict[str, str], body: str) -> list[str]:
    """The definitions ``body`` uses, directly or through others, in lib.lua's order (which
    defines each before its first use)."""
    seen: set[str] = set()
    todo = used_names(body, definitions)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(used_names(definitions[name], definitions))
    return [name for name in definitions if name in seen]


#: A line of a script that splits it in two: what comes before runs before the helpers that
#: only the rest uses are built, so a hot path that returns early does not pay for them.
HELPERS_MARK = "--[[ helpers ]]\n"


@cache
def source(name: ScriptName) -> str:
    """The script as Redis runs it: the constants, the lib.lua definitions it uses, its file.

    Only what a script uses is prepended because Redis runs a script's whole chunk on every
    call: each local function defined is a closure built and collected per call, which for all
    of lib.lua cost more than the work of a short script. A script split by ``HELPERS_MARK``
    gets the definitions its first part uses before that part, and the rest's after it."""
    lua = resources.files("pyfiq.engine").joinpath("lua")
    body = lua.joinpath(f"{name}.lua").read_text()
    definitions = lib_definitions(lua.joinpath("lib.lua").read_text())
    head, mark, tail = body.partition(HELPERS_MARK)
    if not mark:
        head, tail = "", body
    early = needed(definitions, head)
    late = [d for d in needed(definitions, head + tail) if d not in early]

    def carried(names: list[str]) -> str:
        return "".join(definitions[d].rstrip("\n") + "\n\n" for d in names)

    return CONSTANTS + carried(early) + head + carried(late) + tail


class Scripts(dict[ScriptName, Any]):
    """Every script of the table registered on one client, by name: ``scripts[call.script]``
    (a redis-py ``Script``, or its awaitable twin on an asyncio client). A dict, so the lookup
    on every call is one C-level step, as cheap as the attribute it replaced."""

    def __init__(self, client: Any) -> None:
        super().__init__((spec.name, client.register_script(source(spec.name))) for spec in SCRIPTS)
