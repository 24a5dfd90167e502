"""Loads the Lua scripts in ``lua/`` and registers each once per client.

``register_script`` gives EVALSHA with an automatic reload on NOSCRIPT, for a sync client and
(awaitable) for a ``redis.asyncio`` client alike, so both workers share these objects.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from ..engine.keys import COUNT_MINUTES
from ..task import ID_LENGTH, TIME_DIGITS

NAMES = (
    "enqueue",
    "due",
    "acquire",
    "renew",
    "take",
    "dead_letter",
    "release",
    "requeue",
    "rate",
    "lost",
    "skip",
    "beat",
    "halted",
)


#: The entry layout, defined once in Python and handed to every script as constants.
CONSTANTS = f"local ID_LENGTH = {ID_LENGTH}\nlocal TIME_DIGITS = {TIME_DIGITS}\nlocal COUNT_MINUTES = {COUNT_MINUTES}\n"


@cache
def source(name: str) -> str:
    lua = resources.files("pyfiq.engine").joinpath("lua")
    return CONSTANTS + lua.joinpath("lib.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()


class Scripts:
    def __init__(self, client: Any) -> None:
        for name in NAMES:
            setattr(self, name, client.register_script(source(name)))

    enqueue: Any
    due: Any
    acquire: Any
    renew: Any
    take: Any
    dead_letter: Any
    release: Any
    requeue: Any
    rate: Any
    lost: Any
    skip: Any
    beat: Any
    halted: Any
