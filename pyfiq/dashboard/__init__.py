"""A web dashboard for pyfiq's ordered queues (``pip install "pyfiq[dashboard]"``).

``create_app(backend)`` returns an ASGI application (Starlette, server-rendered with Jinja2) to
serve with ``pyfiq dashboard`` or to mount inside your own FastAPI or Starlette app, behind your
own authentication. It reads Redis through ``backend.admin`` in bounded steps and carries
out the operators' actions (pause, resume, skip, requeue, purge, and the delete or dead-letter
of one pending task) through the backend.

Starlette and Jinja2 are imported only when an app is created, so ``import pyfiq`` works
without the extra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ..backend.backend import RedisQueueBackend

__all__ = ["create_app"]

#: ``redact(task name, args, kwargs) -> (args, kwargs)``: what the pages may show of a task's
#: arguments (``pyfiq.dashboard.tasks.redact_secrets`` by default).
Redactor = Callable[[str, list[Any], dict[str, Any]], tuple[Any, Any]]


def create_app(
    backend: RedisQueueBackend,
    read_only: bool = False,
    *,
    guard: Callable[[Any], Any] | None = None,
    blocked_after: float = 60.0,
    refresh: float = 5.0,
    secret: str | bytes | None = None,
    redact: Redactor | None = None,
) -> Starlette:
    """The dashboard of the deployment ``backend`` points at, as an ASGI app.

    ``read_only`` removes every action (no form is rendered, no POST route exists).
    ``guard(request)`` (sync or async) runs before every request and refuses it by raising an
    ``HTTPException`` (FastAPI's or Starlette's): pass the same function your FastAPI routes use
    as a dependency. A stream whose head task has been running longer than ``blocked_after``
    seconds is marked blocked. Pages refresh their figures every ``refresh`` seconds (0: never)
    without reloading.

    ``secret`` (at least 16 bytes) signs the token every action's form must carry. Without it
    each app draws a random one, so a form is accepted only by the app that served its page:
    several replicas of the dashboard behind one load balancer need the same ``secret`` (say
    ``secrets.token_hex(32)``, kept with your other secrets). Changing it only makes open pages
    ask for a reload.

    ``redact(name, args, kwargs)`` returns what the pages show of a task's arguments (pending
    tasks, dead letters) in place of the decoded ones. The default,
    ``pyfiq.dashboard.tasks.redact_secrets``, hides the value of every mapping key whose name
    contains password, token, secret, authorization, api_key or cookie (any case, nested too);
    a positional argument has no name, so a secret passed positionally needs a ``redact`` of
    your own. A ``redact`` that raises hides that task's arguments."""
    try:
        from .app import build
    except ImportError as exc:  # pragma: no cover - depends on what is installed
        raise ConfigurationError(
            f'the dashboard needs Starlette and Jinja2 ({exc}): pip install "pyfiq[dashboard]"'
        ) from exc
    options: dict[str, Any] = {"blocked_after": blocked_after, "refresh": refresh, "secret": secret, "redact": redact}
    return build(backend, read_only=read_only, guard=guard, **options)
