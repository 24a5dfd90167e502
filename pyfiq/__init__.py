"""pyfiq: an embedded, Redis-backed, strictly ordered task queue."""

from . import hooks, metrics, tracing
from .backend.backend import RedisQueueBackend
from .config import Settings
from .errors import (
    AccessDeniedError,
    BackendUnavailableError,
    ConfigurationError,
    DecodeError,
    EnqueueOutcomeUnknown,
    NotConfiguredError,
    NotReplicatedError,
    PartialEnqueueError,
    PayloadTooLargeError,
    PyfiqError,
    ResultRefused,
    ResultUnavailable,
    SerializationError,
    TaskExpired,
    TaskFailed,
    TaskSkipped,
    TimeLimitExceeded,
)
from .functions import FifoFunction, Registry, configure, fifo, get_backend, handle
from .serializers import JSONSerializer, MsgpackSerializer, PickleSerializer, Serializer
from .task import DeadLetter, TaskContext, TaskHandle, TaskStatus, current_task
from .workers.aio import AsyncWorker, async_worker
from .workers.threaded import ThreadedWorker, threaded_worker

__all__ = [
    "AccessDeniedError",
    "AsyncWorker",
    "BackendUnavailableError",
    "ConfigurationError",
    "DeadLetter",
    "DecodeError",
    "EnqueueOutcomeUnknown",
    "FifoFunction",
    "JSONSerializer",
    "MsgpackSerializer",
    "NotConfiguredError",
    "NotReplicatedError",
    "PartialEnqueueError",
    "PayloadTooLargeError",
    "PickleSerializer",
    "PyfiqError",
    "RedisQueueBackend",
    "Registry",
    "ResultRefused",
    "ResultUnavailable",
    "SerializationError",
    "Serializer",
    "Settings",
    "TaskContext",
    "TaskExpired",
    "TaskFailed",
    "TaskHandle",
    "TaskSkipped",
    "TaskStatus",
    "ThreadedWorker",
    "TimeLimitExceeded",
    "async_worker",
    "configure",
    "current_task",
    "fifo",
    "get_backend",
    "handle",
    "hooks",
    "metrics",
    "threaded_worker",
    "tracing",
]

__version__ = "0.2.0"
