"""Loads the Lua scripts of the engine's table (``engine.scripts.SCRIPTS``) and registers each
once per client.

``register_script`` gives EVALSHA with an automatic reload on NOSCRIPT, for a sync client and
(awaitable) for a ``redis.asyncio`` client alike, so both workers share these objects.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from ..engine.keys import COUNT_MINUTES
from ..engine.scripts import SCRIPTS, ScriptName
from ..task import ID_LENGTH, TIME_DIGITS

#: The entry layout, defined once in Python and handed to every script as constants.
CONSTANTS = f"local ID_LENGTH = {ID_LENGTH}\nlocal TIME_DIGITS = {TIME_DIGITS}\nlocal COUNT_MINUTES = {COUNT_MINUTES}\n"


@cache
def source(name: ScriptName) -> str:
    lua = resources.files("pyfiq.engine").joinpath("lua")
    return CONSTANTS + lua.joinpath("lib.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()


class Scripts(dict[ScriptName, Any]):
    """Every script of the table registered on one client, by name: ``scripts[call.script]``
    (a redis-py ``Script``, or its awaitable twin on an asyncio client). A dict, so the lookup
    on every call is one C-level step, as cheap as the attribute it replaced."""

    def __init__(self, client: Any) -> None:
        super().__init__((spec.name, client.register_script(source(spec.name))) for spec in SCRIPTS)
