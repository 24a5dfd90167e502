"""What a Redis error means for pyfiq: whether a retry may help (``is_transient``), whether the
call certainly did not run (``never_ran``), and pyfiq's own error for it where there is one
(``translate``: refused credentials, another shard layout)."""

from __future__ import annotations

import redis
import redis.asyncio.sentinel
import redis.sentinel

from ..errors import AccessDeniedError, ConfigurationError

#: Errors after which Redis may be back shortly: worth a bounded retry. A cluster says so while
#: a failover or a slot migration is under way (CLUSTERDOWN, TRYAGAIN, a slot with no node yet),
#: and a demoted primary refuses writes (READONLY) until Sentinel has moved its clients on;
#: none of these applied the command.
TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.ReadOnlyError,
)
#: Refusals no retry can fix (redis-py makes some of them ConnectionErrors).
DENIED = (redis.AuthenticationError, redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError)
_DENIED_REPLIES = ("NOAUTH", "WRONGPASS", "NOPERM")

#: What redis-py says when a pooled connection fails its readiness check, before any command.
_UNUSED_CONNECTION = ("Connection has data", "Connection not ready")

#: What a Sentinel-managed client raises, before sending anything, while no primary is known.
_NO_PRIMARY = (
    redis.sentinel.MasterNotFoundError,
    redis.sentinel.SlaveNotFoundError,
    redis.asyncio.sentinel.MasterNotFoundError,
    redis.asyncio.sentinel.SlaveNotFoundError,
)


def is_denied(exc: BaseException) -> bool:
    return isinstance(exc, DENIED) or (isinstance(exc, redis.ResponseError) and str(exc).startswith(_DENIED_REPLIES))


def redirections_exhausted(exc: BaseException) -> bool:
    """redis-py's cluster client follows MOVED, ASK and TRYAGAIN itself, 16 times (about 0.4 s),
    then gives up with ``ClusterError("TTL exhausted.")``. Every attempt was refused, none
    applied the command, so it is as transient as the TRYAGAIN behind it: during a slot
    migration a script whose keys the two nodes share out meets TRYAGAIN until the move ends."""
    return type(exc) is redis.exceptions.ClusterError and str(exc).startswith("TTL exhausted")


def is_transient(exc: BaseException) -> bool:
    """Worth a bounded retry: Redis may be back in a moment (not so a refused password)."""
    return (isinstance(exc, TRANSIENT) or redirections_exhausted(exc)) and not is_denied(exc)


def never_ran(exc: BaseException) -> bool:
    """Whether a call that failed with ``exc`` certainly did not run: Redis answered with a
    refusal (every transient one refuses before running: CLUSTERDOWN, TRYAGAIN, READONLY, a
    redirection), the client refused to send it, or the connection failed while connecting
    (redis-py's own words). Any other failure may have come after the request was written."""
    if isinstance(exc, (redis.ResponseError, AccessDeniedError, ConfigurationError)):
        return True
    if is_denied(exc) or redirections_exhausted(exc):
        return True
    if isinstance(exc, (redis.exceptions.SlotNotCoveredError, redis.exceptions.MaxConnectionsError)):
        return True
    if isinstance(exc, _NO_PRIMARY):  # Sentinel named no primary (a failover): nothing was sent
        return True
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        text = str(exc)
        return "connecting to" in text or text in _UNUSED_CONNECTION
    return False


def is_unlaid(exc: BaseException) -> bool:
    """The enqueue script refused a shard that has no layout yet, storing nothing
    (``Transport.lay_out`` writes it)."""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith("PYFIQUNLAID")


def _layout_error(exc: redis.ResponseError) -> ConfigurationError | None:
    text = str(exc)
    if "PYFIQLAYOUT" not in text:
        return None
    return ConfigurationError(
        f"{text.split('PYFIQLAYOUT ', 1)[-1]}: give every replica and producer of this prefix the same shards setting"
    )


def translate(exc: BaseException, address: str) -> BaseException:
    """pyfiq's own error for what Redis at ``address`` said, where there is one: a refusal of
    credentials or permissions (``AccessDeniedError``, never retried) or another shard layout.
    Anything else is ``exc`` itself."""
    if is_denied(exc):
        said = str(exc).rstrip(". ")  # Redis ends some refusals with a period of its own
        return AccessDeniedError(
            f"Redis at {address} refused pyfiq: {type(exc).__name__}: {said}. Check the password and "
            "the user's ACL (pyfiq needs its key prefix, its channels and the script commands)"
        )
    if isinstance(exc, redis.ResponseError) and "DB index is out of range" in str(exc):
        return ConfigurationError(
            f"Redis at {address} has no database {_database(address)}: it has as many as its 'databases' "
            "setting (16 by default, numbered from 0); Redis Cluster has only database 0"
        )
    if isinstance(exc, redis.ResponseError):
        return _layout_error(exc) or exc
    return exc


def _database(address: str) -> str:
    """The database number a redacted URL names: its ``db=`` query parameter, which redis-py
    prefers, else its path ("?" if it names none)."""
    base, _, query = address.partition("?")
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "db" and value.isdigit():
            return value
    path = base.rsplit("/", 1)
    return path[1] if len(path) == 2 and path[1].isdigit() else "?"
