"""Authentication for the standalone dashboard (``pyfiq dashboard --auth basic|token``), as a
``guard`` of ``create_app``, so it covers every page, asset and action alike.

The secret comes from an environment variable, never from the command line (argv is visible to
every user of the machine through ``ps``), is compared in constant time, and appears in no
message. A dashboard mounted in your own app keeps using your own authentication as its
``guard=``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Callable, Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request

#: The environment variables the command reads: ``user:password`` for HTTP basic
#: authentication, or the bearer token every request must carry.
BASIC_ENV = "PYFIQ_DASHBOARD_BASIC_AUTH"
BEARER_ENV = "PYFIQ_DASHBOARD_TOKEN"
#: The shortest password and token accepted: the dashboard can pause queues and purge dead
#: letters, and it listens on the network.
MIN_PASSWORD = 12
MIN_TOKEN = 24
Guard = Callable[[Request], None]


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine alone: ``localhost``, 127.0.0.0/8, ::1."""
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


def basic_guard(user: str, password: str) -> Guard:
    """A guard that lets a request through only with HTTP basic credentials ``user:password``;
    otherwise a 401 asking the browser for them."""
    expected_user, expected_password = user.encode(), password.encode()

    def guard(request: Request) -> None:
        sent_user, sent_password = _basic_credentials(request.headers.get("authorization", ""))
        # Both compared whatever the first gives, so the time taken tells nothing of either.
        good_user = hmac.compare_digest(sent_user, expected_user)
        good_password = hmac.compare_digest(sent_password, expected_password)
        if not (good_user and good_password):
            raise HTTPException(
                401,
                "credentials needed",
                headers={"WWW-Authenticate": 'Basic realm="pyfiq dashboard", charset="UTF-8"'},
            )

    return guard


def _basic_credentials(header: str) -> tuple[bytes, bytes]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return b"", b""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b"", b""
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else (b"", b"")


def token_guard(token: str) -> Guard:
    """A guard that lets a request through only with ``Authorization: Bearer <token>`` (for a
    proxy that adds the header, or a program); otherwise a 401."""
    expected = token.encode()

    def guard(request: Request) -> None:
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        good = hmac.compare_digest(sent.strip().encode(), expected)
        if scheme.lower() != "bearer" or not good:
            raise HTTPException(401, "a bearer token is needed", headers={"WWW-Authenticate": 'Bearer realm="pyfiq"'})

    return guard


def guard_from_env(kind: str, environ: Mapping[str, str]) -> Guard:
    """The guard of ``--auth kind`` with its secret from ``environ``; ``ValueError`` saying what
    to set when the variable is missing or unfit (the message never quotes the secret)."""
    if kind == "basic":
        value = environ.get(BASIC_ENV, "")
        user, colon, password = value.partition(":")
        if not colon or not user or len(password) < MIN_PASSWORD:
            raise ValueError(
                f"--auth basic reads user:password from ${BASIC_ENV}: set it to a user name, a colon and "
                f"a password of at least {MIN_PASSWORD} characters"
            )
        return basic_guard(user, password)
    if kind == "token":
        token = environ.get(BEARER_ENV, "")
        if len(token) < MIN_TOKEN or token != token.strip() or not token.isprintable():
            raise ValueError(
                f"--auth token reads the bearer token from ${BEARER_ENV}: set it to at least {MIN_TOKEN} "
                'printable characters without spaces around them (python -c "import secrets; '
                'print(secrets.token_urlsafe(32))")'
            )
        return token_guard(token)
    raise ValueError(f"--auth takes basic or token, not {kind!r}")
