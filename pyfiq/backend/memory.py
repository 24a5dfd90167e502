"""The embedded ``memory://`` server: fakeredis with Lua, in this process, for demos and tests.

fakeredis is an optional extra (``pip install 'pyfiq[memory]'``): an application that only
talks to a real Redis does not take it, nor the compiled Lua runtime it needs. It is imported on
first use; missing, ``memory://`` is refused with the line that installs it.

Backends that name the same server (``memory://<name>``) share one dataset, as clients of one
Redis do.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ..errors import ConfigurationError

INSTALL_HINT = "memory:// needs the optional fakeredis dependency: pip install 'pyfiq[memory]'"

#: What names a fakeredis server (a client finds its server by these) and how it is spoken to.
_FAKE_KEYS = (
    "server",
    "host",
    "port",
    "path",
    "db",
    "version",
    "server_type",
    "lua_modules",
    "username",
    "password",
    "client_name",
    "decode_responses",
    "encoding",
    "encoding_errors",
)

_servers: dict[str, Any] = {}
_lock = threading.Lock()


def fakeredis() -> ModuleType:
    """The fakeredis module, or ``ConfigurationError`` saying how to install it. The scripts
    need its Lua support too (``lupa``), which the extra brings along."""
    try:
        module = importlib.import_module("fakeredis")
    except ImportError:
        raise ConfigurationError(INSTALL_HINT) from None
    if importlib.util.find_spec("lupa") is None:
        raise ConfigurationError(INSTALL_HINT)
    return module


def memory_client(name: str, *, asynchronous: bool = False) -> Any:
    """A client of the embedded server ``name`` (made on first use), sync or ``asyncio``."""
    fake = fakeredis()
    with _lock:
        server = _servers.setdefault(name, fake.FakeServer())
    return fake.FakeAsyncRedis(server=server) if asynchronous else fake.FakeRedis(server=server)


def is_fake(connection_class: type[Any]) -> bool:
    return connection_class.__module__.startswith("fakeredis")


def fake_twin(connection_kwargs: Mapping[str, Any], *, asynchronous: bool) -> Any:
    """A fakeredis client of the other kind on the same fake server as a pool with these
    ``connection_kwargs``."""
    fake = fakeredis()
    kind = fake.FakeAsyncRedis if asynchronous else fake.FakeRedis
    return kind(**{k: connection_kwargs[k] for k in _FAKE_KEYS if k in connection_kwargs})
