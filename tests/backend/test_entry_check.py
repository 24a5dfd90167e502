"""The scripts' check of a stored entry (lib.lua ``parse_entry``) against the worker's
(``pyfiq.task.Entry.parse``), on a real redis-server: the two must accept exactly the same
bytes and read the same id and deadline, or a task one side takes for valid the other would
dead-letter as undecodable, or hand out with another deadline."""

from __future__ import annotations

from importlib import resources

import pytest

from pyfiq.backend.scripts import CONSTANTS, lib_definitions, needed
from pyfiq.errors import DecodeError
from pyfiq.task import Entry
from tests.support.servers import RedisServer

ID = "0123456789abcdef" * 2

CORPUS = [
    f"{ID}|1796687292780|0|payload",
    f"{ID}|1796687292780|1796687299999|payload",
    f"{ID}|1|00|",
    f"{ID}|0|0|a|b|c",
    f"{ID}|{'9' * 15}|{'9' * 15}|x",
    f"{ID}|{'9' * 16}|0|x",
    f"{ID}|1|{'1' * 16}|x",
    f"{ID}||0|x",
    f"{ID}|1||x",
    f"{ID}|1|0",
    f"{ID}|1|0x|",
    f"{ID}|1a|0|",
    f"{ID.upper()}|1|0|x",
    f"{ID[:-1]}|1|0|x",
    f"{ID}a|1|0|x",
    f"{ID[:-1]}g|1|0|x",
    f"|{ID}|1|0|x",
    f"{ID} |1|0|x",
    f"{ID}|+1|0|x",
    f"{ID}|-1|0|x",
    f"{ID}|1.5|0|x",
    f"{ID}|1|5e3|x",
    f"{ID}|\u0661|0|x",
    "",
    "not an entry",
    ID,
]


def lua_checks(redis_server: RedisServer, entries: list[bytes]) -> list[tuple[str, int] | None]:
    definitions = lib_definitions(resources.files("pyfiq.engine").joinpath("lua", "lib.lua").read_text())
    body = """
local out = {}
for i, entry in ipairs(ARGV) do
  local id, expires = parse_entry(entry)
  if id then out[i] = { id, string.format('%.0f', expires) } else out[i] = false end
end
return out
"""
    script = CONSTANTS + "".join(definitions[d] for d in needed(definitions, body)) + body
    client = redis_server.client()
    try:
        replies = client.eval(script, 0, *entries)
    finally:
        client.close()
    return [None if r is None else (r[0].decode(), int(r[1])) for r in replies]


def python_check(raw: bytes) -> tuple[str, int] | None:
    try:
        entry = Entry.parse(raw)
    except DecodeError:
        return None
    return entry.id, entry.expires_ms


@pytest.mark.parametrize("extra", [b"", b"\x00\xff\n|payload"])
def test_the_scripts_and_the_worker_accept_the_same_entries(redis_server: RedisServer, extra: bytes) -> None:
    entries = [e.encode() + extra for e in CORPUS]
    lua = lua_checks(redis_server, entries)
    python = [python_check(e) for e in entries]
    assert lua == python
    accepted = sum(r is not None for r in python)
    assert 5 <= accepted < len(CORPUS), "the corpus holds valid and malformed entries"
