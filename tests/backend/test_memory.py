"""The embedded ``memory://`` server is an optional extra: without fakeredis, a clear refusal."""

from __future__ import annotations

import sys

import pytest

from pyfiq import ConfigurationError, RedisQueueBackend
from pyfiq.backend import memory


def test_memory_without_fakeredis_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import raise ImportError, as if the package were absent.
    monkeypatch.setitem(sys.modules, "fakeredis", None)
    with pytest.raises(ConfigurationError) as info:
        RedisQueueBackend("memory://without-fakeredis")
    message = str(info.value)
    assert "pip install 'pyfiq[memory]'" in message and "\n" not in message
    assert message == memory.INSTALL_HINT


def test_memory_without_its_lua_runtime_says_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    real = memory.importlib.util.find_spec
    monkeypatch.setattr(memory.importlib.util, "find_spec", lambda name: None if name == "lupa" else real(name))
    with pytest.raises(ConfigurationError, match=r"pip install 'pyfiq\[memory\]'"):
        RedisQueueBackend("memory://without-lua")


def test_backends_naming_one_memory_server_share_its_data() -> None:
    first, second = RedisQueueBackend("memory://shared-by-name"), RedisQueueBackend("memory://shared-by-name")
    first.client.set("pyfiq:probe", b"1")
    assert second.client.get("pyfiq:probe") == b"1"
    assert RedisQueueBackend("memory://another-name").client.get("pyfiq:probe") is None
