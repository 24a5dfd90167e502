"""The dashboard's Starlette application: its routes, pages and the POST route of the actions.

Pages read Redis through ``backend.admin`` and are rendered in a worker thread (the backend's
client is synchronous, and a page of dead letters can be large), so neither a slow Redis nor a
big page blocks the event loop of an application that mounts the dashboard.

An action is carried out only for a request from the dashboard's own origin (``Origin`` or
``Referer`` naming the request's own host, and no ``Sec-Fetch-Site`` but ``same-origin``) whose
form carries the token of the dashboard's cookie, signed with the app's secret: a sibling
subdomain can plant a cookie, but neither sign one nor post from this origin. Over HTTPS the
cookie is a ``__Host-`` cookie, which only this host can set. Every response carries a
Content-Security-Policy that allows only the dashboard's own script and styles. The
application's own authentication goes in front, through ``guard``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect as pyinspect
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import jinja2
import redis
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..backend.backend import RedisQueueBackend
from ..backend.views import Rate, held_streams
from ..engine.keys import queue_of, validate_queue_name
from ..engine.outcomes import describe_error
from ..errors import ConfigurationError, PyfiqError
from ..ops.render import task_traceback
from . import actions, chart, tasks

CSRF_COOKIE = "pyfiq_csrf"
#: The CSRF cookie over HTTPS: browsers take a ``__Host-`` cookie only from this very host, over
#: TLS, for every path, so a sibling subdomain cannot plant one.
CSRF_COOKIE_HTTPS = "__Host-pyfiq_csrf"
FLASH_COOKIE = "pyfiq_flash"
#: Headers of every response: only the dashboard's own script, styles and form targets, never
#: framed, no content sniffing, and no URL of it sent to another site.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
#: Characters of an error message or traceback a dead-letter page shows.
SHOWN_CHARS = 4000
#: Characters of a traceback searched for frames to hide, from its start: enough for the frames
#: that lead the shown part, bounded whatever a task raised.
TRACEBACK_SCAN = 16 * SHOWN_CHARS
#: Characters of a search a queue page accepts.
MAX_SEARCH = 1000
#: Digits of a dead-letter offset (far beyond any real count, within Redis's 64-bit ranges).
_OFFSET = re.compile(r"[0-9]{1,15}")
_CURSOR = re.compile(r"([0-9]{1,6}):([0-9]{1,20})")
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
        secret: str | bytes | None = None,
        redact: tasks.Redactor | None = None,
    ) -> None:
        if blocked_after <= 0 or refresh < 0:
            raise ConfigurationError("blocked_after must be positive and refresh at least 0")
        self.signer = Signer(secret)
        self.backend = backend
        self.read_only = read_only
        self.guard = guard
        self.blocked_after = blocked_after
        self.refresh = refresh
        self.redact = redact or tasks.redact_secrets
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("pyfiq.dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(age=format_age, when=format_when, number=format_number, rate=format_rate)
        env.filters["quote"] = lambda value: quote(str(value), safe="")
        env.filters.update(clip=clip, clip_traceback=clip_traceback)
        env.filters["arguments"] = lambda item: tasks.arguments_of(item, self.redact, backend.settings.serializer)
        env.globals.update(path_for=_path_for, chart=chart.figure)
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
                return await self.render(request, "error.html", {"message": describe_error(exc)}, status=503)

        return run

    async def render(self, request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        """The page ``name``, rendered in a worker thread: a page of many dead letters takes a
        while to render, and the event loop is the host application's."""
        return await run_in_threadpool(self._render, request, name, context, status)

    def _render(self, request: Request, name: str, context: dict[str, Any], status: int) -> Response:
        cookie = _csrf_cookie(request)
        token = request.cookies.get(cookie, "")
        fresh = self.signer.unsign("csrf", token) is None
        if fresh:
            token = self.signer.sign("csrf", secrets.token_urlsafe(24))
        sent_flash = request.cookies.get(FLASH_COOKIE, "")
        # Only a message this dashboard wrote is shown: a sibling subdomain can set the cookie too.
        flash = unquote(self.signer.unsign("flash", sent_flash) or "")
        base = {
            "read_only": self.read_only,
            "refresh": self.refresh,
            "csrf": token,
            "flash": flash,
            "blocked_after": self.blocked_after,
        }
        response = self.templates.TemplateResponse(request, name, {**base, **context}, status_code=status)
        response.headers["Cache-Control"] = "no-store"
        if fresh:
            secure = request.url.scheme == "https"
            path = "/" if cookie == CSRF_COOKIE_HTTPS else _cookie_path(request)
            response.set_cookie(cookie, token, path=path, httponly=True, samesite="strict", secure=secure)
        if sent_flash:
            response.delete_cookie(FLASH_COOKIE, path=_cookie_path(request))
        return response

    # -- pages --------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        def read() -> dict[str, Any]:
            fleet = self.backend.replicas()
            queues = self.backend.admin.overview(blocked_after=self.blocked_after, replicas=fleet)
            total = sum((q.rate for q in queues), Rate())
            return {"queues": queues, "replicas": fleet, "total": total}

        return await self.render(request, "overview.html", await run_in_threadpool(read))

    async def queue(self, request: Request) -> Response:
        name = _queue_param(request)
        search = request.query_params.get("q", "").strip()
        if len(search) > MAX_SEARCH:
            raise HTTPException(400, f"q (the stream key searched for) takes at most {MAX_SEARCH} characters")
        cursor = _cursor_param(request, self.backend.keys.shards)

        def read() -> dict[str, Any]:
            fleet = self.backend.replicas()
            held = {s: r for s, r in held_streams(fleet).items() if queue_of(s) == name}
            found = self.backend.admin.overview(queue=name, blocked_after=self.blocked_after, replicas=fleet)
            after = self.blocked_after
            return {
                "queue": name,
                "summary": found[0] if found else None,
                "held": self.backend.admin.read_streams(sorted(held), blocked_after=after),
                "holders": held,
                "waiting": self.backend.admin.waiting_longest(name, 10, blocked_after=after),
                "page": self.backend.admin.stream_page(name, cursor=cursor, search=search, blocked_after=after),
                "search": search,
                "first_page": cursor == "0:0",
                "replicas": {r["replica"]: r for r in fleet},
                "history": self.backend.admin.history(name),
            }

        return await self.render(request, "queue.html", await run_in_threadpool(read))

    async def dead(self, request: Request) -> Response:
        name = _queue_param(request)
        stream = request.query_params.get("stream", "").strip() or None
        reason = request.query_params.get("reason", "").strip() or None
        offset = _offset_param(request)
        if stream is not None and queue_of(stream) != name:
            raise HTTPException(400, f"stream: {_shown(stream)} is not a stream of {name}")
        if reason is not None and reason not in REASONS:
            raise HTTPException(400, f"reason: {_shown(reason)} is none of {', '.join(REASONS)}")

        def read() -> dict[str, Any]:
            found = self.backend.admin.dead_streams_of(name)
            shown = [stream] if stream is not None else found.streams
            return {
                "queue": name,
                "streams": found.streams,
                "complete": found.complete,
                "scan": found,
                "stream": stream,
                "reason": reason,
                "reasons": REASONS,
                "page": self.backend.admin.dead_letter_page(shown, offset=offset, reason=reason),
                "offset": offset,
            }

        return await self.render(request, "dead.html", await run_in_threadpool(read))

    async def schedules(self, request: Request) -> Response:
        def read() -> dict[str, Any]:
            views = self.backend.admin.schedules()
            states = [self.backend.task_status(v.stream, v.task_id).state if v.task_id else None for v in views]
            return {"schedules": list(zip(views, states, strict=True))}

        return await self.render(request, "schedules.html", await run_in_threadpool(read))

    async def replicas(self, request: Request) -> Response:
        fleet = await run_in_threadpool(self.backend.replicas)
        return await self.render(request, "replicas.html", {"replicas": fleet})

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            raise HTTPException(404)
        body = resources.files("pyfiq.dashboard").joinpath("static").joinpath(name).read_bytes()
        return Response(body, media_type=ASSETS[name], headers={"Cache-Control": "max-age=300"})

    # -- actions ------------------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        _check_origin(request)
        form = await _form(request)
        self.check_token(request, form)
        try:
            action = actions.parse(request.path_params["action"], form)
        except (ValueError, ConfigurationError) as exc:
            raise HTTPException(400, str(exc)) from None
        if action.confirm and dict(form).get("confirmed") != "1":
            text = await run_in_threadpool(actions.describe, self.backend, action)
            fields = [(k, v) for k, v in form if k not in ("csrf", "confirmed")]
            context = {"action": action, "text": text, "fields": fields, "back": self.back(request, action)}
            return await self.render(request, "confirm.html", context)
        done = await run_in_threadpool(actions.run, self.backend, action)
        response = RedirectResponse(self.back(request, action), status_code=303)
        flash = self.signer.sign("flash", quote(done))
        secure = request.url.scheme == "https"
        response.set_cookie(
            FLASH_COOKIE, flash, path=_cookie_path(request), max_age=60, samesite="strict", secure=secure
        )
        return response

    def check_token(self, request: Request, form: list[tuple[str, str]]) -> None:
        """The form's token must be the cookie's, and signed with this app's secret: another site
        can make a browser send a cookie, even plant one from a sibling subdomain, but can neither
        read this one to put it in its form nor sign one of its own."""
        cookie = request.cookies.get(_csrf_cookie(request), "")
        sent = dict(form).get("csrf", "")
        if self.signer.unsign("csrf", cookie) is None or not hmac.compare_digest(cookie.encode(), sent.encode()):
            raise HTTPException(
                403,
                "refused: the form's security token is missing or not this dashboard's: reload the page and try again",
            )

    def back(self, request: Request, action: actions.Action) -> str:
        """Where an action returns to: its queue's page, its dead letters, or its stream's tasks."""
        page = "dead" if action.name in ("requeue", "purge") else "stream" if action.task_id else "queue"
        path = str(request.url_for(page, queue=action.queue).path)
        return path + f"?stream={quote(action.target, safe='')}" if page == "stream" else path


#: Dead-letter reasons, for the filter.
REASONS = ("exhausted", "poison", "lease-lost", "unknown-task", "undecodable", "expired", "operator")


def build(
    backend: RedisQueueBackend,
    *,
    read_only: bool,
    guard: Callable[[Any], Any] | None,
    blocked_after: float,
    refresh: float,
    secret: str | bytes | None = None,
    redact: tasks.Redactor | None = None,
) -> Starlette:
    """The Starlette app of ``create_app``."""
    d = Dashboard(
        backend,
        read_only=read_only,
        guard=guard,
        blocked_after=blocked_after,
        refresh=refresh,
        secret=secret,
        redact=redact,
    )
    routes = [
        Route("/", d.endpoint(d.overview), name="overview"),
        Route("/replicas", d.endpoint(d.replicas), name="replicas"),
        Route("/schedules", d.endpoint(d.schedules), name="schedules"),
        Route("/queue/{queue:path}", d.endpoint(d.queue), name="queue"),
        Route("/dead/{queue:path}", d.endpoint(d.dead), name="dead"),
        *tasks.routes(d),
        Route("/assets/{name}", d.endpoint(d.asset), name="asset"),
    ]
    if not read_only:
        routes.append(Route("/act/{action}", d.endpoint(d.act), methods=["POST"], name="act"))
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
    app.state.dashboard = d
    return app


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response of the dashboard, its error pages included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, sending)


class Signer:
    """HMAC-SHA256 signatures with the app's secret (random per app unless one is given)."""

    def __init__(self, secret: str | bytes | None) -> None:
        key = secrets.token_bytes(32) if secret is None else secret
        key = key.encode() if isinstance(key, str) else key
        if len(key) < 16:
            raise ConfigurationError("the dashboard's secret must be at least 16 bytes: use secrets.token_hex(32)")
        self.key = key

    def sign(self, purpose: str, value: str) -> str:
        """``value.signature``; ``purpose`` keeps a value signed for one use from passing for another."""
        mac = hmac.new(self.key, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()
        return f"{value}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"

    def unsign(self, purpose: str, signed: str) -> str | None:
        """The value ``signed`` carries when this secret signed it for ``purpose``, else None."""
        value, dot, _ = signed.rpartition(".")
        if not dot or not value:
            return None
        return value if hmac.compare_digest(self.sign(purpose, value).encode(), signed.encode()) else None


# -- reading requests ----------------------------------------------------------------------------


@jinja2.pass_context
def _path_for(context: Any, name: str, /, **params: Any) -> str:
    """A route's path (under the mount point), not an absolute URL: links keep working behind
    a proxy that rewrites the host."""
    request: Request = context["request"]
    return str(request.url_for(name, **params).path)


def _cookie_path(request: Request) -> str:
    return str(request.scope.get("root_path") or "") or "/"


def _csrf_cookie(request: Request) -> str:
    return CSRF_COOKIE_HTTPS if request.url.scheme == "https" else CSRF_COOKIE


def _shown(value: str) -> str:
    """A value of a request, quoted and cut short, for a message."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _queue_param(request: Request) -> str:
    try:
        return validate_queue_name(request.path_params["queue"])
    except ConfigurationError as exc:
        raise HTTPException(404, str(exc)) from None


def _offset_param(request: Request) -> int:
    # A pattern, not str.isdigit() or int(): those take any Unicode digit, such as "²".
    value = request.query_params.get("offset", "0")
    if not _OFFSET.fullmatch(value):
        raise HTTPException(400, f"offset must be a whole number of at most 15 digits 0-9, not {_shown(value)}")
    return int(value)


def _cursor_param(request: Request, shards: int) -> str:
    cursor = request.query_params.get("cursor", "0:0")
    found = _CURSOR.fullmatch(cursor)
    if found is None or int(found[1]) > shards or int(found[2]) >= 1 << 64:
        raise HTTPException(
            400,
            f"cursor must be <shard>:<position> as a Next page link gives it (shard 0 to {shards}, "
            f"position below 2**64, digits 0-9), not {_shown(cursor)}",
        )
    return cursor


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


def _check_origin(request: Request) -> None:
    """Refuse a request a browser sent from any page but the dashboard's own: ``Sec-Fetch-Site``
    says where it came from (``same-site`` is a sibling subdomain or another port), and ``Origin``
    (else ``Referer``) must name the request's own host. A request without either comes from a
    program, not from a page, and still needs the token."""
    site = request.headers.get("sec-fetch-site")
    if site not in (None, "same-origin", "none"):
        raise HTTPException(
            403,
            f"refused: the browser says this request comes from another origin ({_shown(site)}); "
            "actions are accepted only from the dashboard's own pages",
        )
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if referer is None:
            return
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    host = request.headers.get("host", "")
    if _host_of(origin) != _strip_port(host.lower(), request.url.scheme):
        raise HTTPException(
            403,
            f"refused: the request comes from {_shown(origin)}, not from this dashboard ({_shown(host)}); "
            "behind a proxy, pass the original Host header on",
        )


def _host_of(origin: str) -> str | None:
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None  # "null" (a sandboxed or opaque origin), or not a web origin at all
    return _strip_port(parts.netloc.rpartition("@")[2].lower(), parts.scheme)


def _strip_port(host: str, scheme: str) -> str:
    # Compared without the scheme: behind a proxy that ends TLS the dashboard sees http while the
    # browser says https; a page of another scheme is refused by Sec-Fetch-Site already.
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    return host.removesuffix(default) if default else host


class Clipped(NamedTuple):
    """Text as a page shows it, and the length of the whole when that is not all of it."""

    text: str
    length: int | None


def clip(value: Any) -> Clipped:
    text = str(value)
    return Clipped(text[:SHOWN_CHARS], len(text) if len(text) > SHOWN_CHARS else None)


def clip_traceback(value: Any) -> Clipped:
    """A task's traceback without the machinery's frames (``render.task_traceback``), cut short."""
    text = str(value or "")
    shown = task_traceback(text[:TRACEBACK_SCAN])
    if len(text) <= TRACEBACK_SCAN and len(shown) <= SHOWN_CHARS:
        return Clipped(shown, None)
    return Clipped(shown[:SHOWN_CHARS], len(text))


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
