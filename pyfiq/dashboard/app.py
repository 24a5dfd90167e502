"""The dashboard's Starlette application: its routes, pages and the POST route of the actions.

Pages read Redis through ``pyfiq.ops.inspect`` in a worker thread (the backend's client is
synchronous), so a slow Redis never blocks the event loop of an application that mounts it.
Every form carries a CSRF token that must match a cookie the dashboard set (double submit), and
a request a browser marks as cross-site is refused; the application's own authentication goes
in front, through ``guard``.
"""

from __future__ import annotations

import inspect as pyinspect
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import jinja2
import redis
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from ..engine.keys import queue_of, validate_queue_name
from ..engine.outcomes import describe_error
from ..errors import ConfigurationError, PyfiqError
from ..ops import inspect
from ..redis.backend import RedisQueueBackend
from . import actions

CSRF_COOKIE = "pyfiq_csrf"
FLASH_COOKIE = "pyfiq_flash"
#: A form larger than this is refused (a selection of thousands of dead letters still fits).
MAX_FORM_BYTES = 1 << 20
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
Endpoint = Callable[[Request], Awaitable[Response]]


class Dashboard:
    """The pages and actions of one deployment (``backend``) with the options of ``create_app``."""

    def __init__(
        self,
        backend: RedisQueueBackend,
        *,
        read_only: bool,
        guard: Callable[[Any], Any] | None,
        blocked_after: float,
        refresh: float,
    ) -> None:
        if blocked_after <= 0 or refresh < 0:
            raise ConfigurationError("blocked_after must be positive and refresh at least 0")
        self.backend = backend
        self.read_only = read_only
        self.guard = guard
        self.blocked_after = blocked_after
        self.refresh = refresh
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("pyfiq.dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(age=format_age, when=format_when, number=format_number, rate=format_rate)
        env.filters["quote"] = lambda value: quote(str(value), safe="")
        env.filters["task_traceback"] = inspect.task_traceback
        env.globals["path_for"] = _path_for
        self.templates = Jinja2Templates(env=env)

    # -- plumbing -----------------------------------------------------------------------------

    def endpoint(self, handler: Endpoint) -> Endpoint:
        """``handler`` behind the guard, with Redis failures shown as a page, not a traceback."""

        async def run(request: Request) -> Response:
            if self.guard is not None:
                verdict = self.guard(request)
                if pyinspect.isawaitable(verdict):
                    await verdict
            try:
                return await handler(request)
            except (PyfiqError, redis.RedisError) as exc:
                return self.render(request, "error.html", {"message": describe_error(exc)}, status=503)

        return run

    def render(self, request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        token = request.cookies.get(CSRF_COOKIE, "")
        fresh = len(token) != 43
        if fresh:
            token = secrets.token_urlsafe(32)
        flash = unquote(request.cookies.get(FLASH_COOKIE, ""))
        base = {
            "read_only": self.read_only,
            "refresh": self.refresh,
            "csrf": token,
            "flash": flash,
            "blocked_after": self.blocked_after,
        }
        response = self.templates.TemplateResponse(request, name, {**base, **context}, status_code=status)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        path = _cookie_path(request)
        if fresh:
            secure = request.url.scheme == "https"
            response.set_cookie(CSRF_COOKIE, token, path=path, httponly=True, samesite="strict", secure=secure)
        if flash:
            response.delete_cookie(FLASH_COOKIE, path=path)
        return response

    # -- pages --------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        def read() -> dict[str, Any]:
            fleet = self.backend.replicas()
            queues = inspect.overview(self.backend, blocked_after=self.blocked_after, replicas=fleet)
            total = sum((q.rate for q in queues), inspect.Rate())
            return {"queues": queues, "replicas": fleet, "total": total}

        return self.render(request, "overview.html", await run_in_threadpool(read))

    async def queue(self, request: Request) -> Response:
        name = _queue_param(request)
        search = request.query_params.get("q", "").strip()
        cursor = request.query_params.get("cursor", "0:0")
        if not _is_cursor(cursor, self.backend.keys.shards):
            raise HTTPException(400, "bad cursor")

        def read() -> dict[str, Any]:
            fleet = self.backend.replicas()
            held = {s: r for s, r in inspect.held_streams(fleet).items() if queue_of(s) == name}
            found = inspect.overview(self.backend, queue=name, blocked_after=self.blocked_after, replicas=fleet)
            after = self.blocked_after
            return {
                "queue": name,
                "summary": found[0] if found else None,
                "held": inspect.read_streams(self.backend, sorted(held), blocked_after=after),
                "holders": held,
                "waiting": inspect.waiting_longest(self.backend, name, 10, blocked_after=after),
                "page": inspect.stream_page(self.backend, name, cursor=cursor, search=search, blocked_after=after),
                "search": search,
                "first_page": cursor == "0:0",
                "replicas": {r["replica"]: r for r in fleet},
            }

        return self.render(request, "queue.html", await run_in_threadpool(read))

    async def dead(self, request: Request) -> Response:
        name = _queue_param(request)
        stream = request.query_params.get("stream", "").strip() or None
        reason = request.query_params.get("reason", "").strip() or None
        offset = _int_param(request, "offset")
        if stream is not None and queue_of(stream) != name:
            raise HTTPException(404, f"{stream} is not a stream of {name}")

        def read() -> dict[str, Any]:
            streams, complete = inspect.dead_streams_of(self.backend, name)
            shown = [stream] if stream is not None else streams
            return {
                "queue": name,
                "streams": streams,
                "complete": complete,
                "stream": stream,
                "reason": reason,
                "reasons": REASONS,
                "page": inspect.dead_letter_page(self.backend, shown, offset=offset, reason=reason),
                "offset": offset,
            }

        return self.render(request, "dead.html", await run_in_threadpool(read))

    async def replicas(self, request: Request) -> Response:
        fleet = await run_in_threadpool(self.backend.replicas)
        return self.render(request, "replicas.html", {"replicas": fleet})

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            raise HTTPException(404)
        body = resources.files("pyfiq.dashboard").joinpath("static").joinpath(name).read_bytes()
        return Response(body, media_type=ASSETS[name], headers={"Cache-Control": "max-age=300"})

    # -- actions ------------------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        form = await _form(request)
        _check_csrf(request, form)
        try:
            action = actions.parse(request.path_params["action"], form)
        except (ValueError, ConfigurationError) as exc:
            raise HTTPException(400, str(exc)) from None
        if action.confirm and dict(form).get("confirmed") != "1":
            text = await run_in_threadpool(actions.describe, self.backend, action)
            fields = [(k, v) for k, v in form if k not in ("csrf", "confirmed")]
            context = {"action": action, "text": text, "fields": fields, "back": self.back(request, action)}
            return self.render(request, "confirm.html", context)
        done = await run_in_threadpool(actions.run, self.backend, action)
        response = RedirectResponse(self.back(request, action), status_code=303)
        response.set_cookie(FLASH_COOKIE, quote(done), path=_cookie_path(request), max_age=60, samesite="strict")
        return response

    def back(self, request: Request, action: actions.Action) -> str:
        """Where an action returns to: its queue's page, or its dead letters."""
        page = "dead" if action.name in ("requeue", "purge") else "queue"
        return str(request.url_for(page, queue=action.queue).path)


#: Dead-letter reasons, for the filter.
REASONS = ("exhausted", "poison", "lease-lost", "unknown-task", "undecodable", "expired", "operator")


def build(
    backend: RedisQueueBackend,
    *,
    read_only: bool,
    guard: Callable[[Any], Any] | None,
    blocked_after: float,
    refresh: float,
) -> Starlette:
    """The Starlette app of ``create_app``."""
    d = Dashboard(backend, read_only=read_only, guard=guard, blocked_after=blocked_after, refresh=refresh)
    routes = [
        Route("/", d.endpoint(d.overview), name="overview"),
        Route("/replicas", d.endpoint(d.replicas), name="replicas"),
        Route("/queue/{queue:path}", d.endpoint(d.queue), name="queue"),
        Route("/dead/{queue:path}", d.endpoint(d.dead), name="dead"),
        Route("/assets/{name}", d.endpoint(d.asset), name="asset"),
    ]
    if not read_only:
        routes.append(Route("/act/{action}", d.endpoint(d.act), methods=["POST"], name="act"))
    app = Starlette(routes=routes)
    app.state.dashboard = d
    return app


# -- reading requests ----------------------------------------------------------------------------


@jinja2.pass_context
def _path_for(context: Any, name: str, /, **params: Any) -> str:
    """A route's path (under the mount point), not an absolute URL: links keep working behind
    a proxy that rewrites the host."""
    request: Request = context["request"]
    return str(request.url_for(name, **params).path)


def _cookie_path(request: Request) -> str:
    return str(request.scope.get("root_path") or "") or "/"


def _queue_param(request: Request) -> str:
    try:
        return validate_queue_name(request.path_params["queue"])
    except ConfigurationError as exc:
        raise HTTPException(404, str(exc)) from None


def _int_param(request: Request, name: str) -> int:
    value = request.query_params.get(name, "0")
    if not value.isdigit():
        raise HTTPException(400, f"bad {name}")
    return int(value)


def _is_cursor(cursor: str, shards: int) -> bool:
    shard, sep, pos = cursor.partition(":")
    return bool(sep) and shard.isdigit() and pos.isdigit() and int(shard) <= shards


async def _form(request: Request) -> list[tuple[str, str]]:
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise HTTPException(415, "send the form as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "form too large")
    try:
        return parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=100_000)
    except ValueError as exc:
        raise HTTPException(400, f"unreadable form: {exc}") from None


def _check_csrf(request: Request, form: list[tuple[str, str]]) -> None:
    """The form's token must equal the cookie's: another site can make a browser send the
    cookie, but cannot read it to put it in the form. A browser that says the request comes
    from another site is refused outright."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise HTTPException(403, "cross-site request refused")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = dict(form).get("csrf", "")
    if not cookie or not secrets.compare_digest(cookie.encode(), sent.encode()):
        raise HTTPException(403, "the form's security token does not match: reload the page and try again")


# -- formatting ---------------------------------------------------------------------------------

#: What a cell shows for a value that does not exist (an en dash).
NONE = "\u2013"


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_when(ms: int | float | None) -> str:
    if not ms:
        return NONE
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_number(n: int | float) -> str:
    return f"{n:,}"


def format_rate(per_second: float) -> str:
    if per_second == 0:
        return "0"
    return f"{per_second:.2f}" if per_second < 10 else f"{per_second:,.0f}"
