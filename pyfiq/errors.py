"""Every error pyfiq raises derives from :class:`PyfiqError`."""

from __future__ import annotations


class PyfiqError(Exception):
    """Base class of pyfiq's errors."""


class ConfigurationError(PyfiqError, ValueError):
    """A setting, a queue name or a decorator argument is invalid."""


class NotConfiguredError(PyfiqError, RuntimeError):
    """A task was enqueued before any backend was configured in this process."""


class SerializationError(PyfiqError, TypeError):
    """A task's arguments cannot be encoded by the configured serializer."""


class DecodeError(PyfiqError, ValueError):
    """A stored task cannot be decoded (corrupt, or written by an incompatible serializer)."""


class BackendUnavailableError(PyfiqError, ConnectionError):
    """Redis could not be reached within the enqueue retry budget. Nothing was enqueued
    unless Redis accepted the task before the connection failed (enqueue is at-least-once)."""
