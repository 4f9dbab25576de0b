"""What a client is told when a request fails: a status (Triton's codes) and a short, safe message.

Every layer below raises its own exception types; ``as_serving_error`` is the one place that maps
them to statuses, so gRPC and an HTTP front end answer the same case the same way. Messages never
carry server paths nor client-chosen names longer than 64 characters (``shown``) (an 8 KB name
echoed into a gRPC status is refused by the transport, and the client saw "Stream removed").
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from pathlib import Path

from runtime.core.files import shown
from runtime.core.package import PackageError
from runtime.core.registry import UnknownTaskError
from runtime.serving.batcher import DeadlineExpiredError, QueueFullError, ShuttingDownError
from runtime.serving.package_source import TaskNotFoundError
from runtime.serving.preprocess import InputError
from runtime.serving.task_store import ModelControlError, TaskLoadCancelledError

log = logging.getLogger("e2vpt.server")

MESSAGE_LIMIT = 1024


class Status(enum.Enum):
    """A failure's status; the names are gRPC's (``grpc.StatusCode[status.name]``)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    ABORTED = "ABORTED"
    INTERNAL = "INTERNAL"


class ServingError(Exception):
    """A request's failure as the client sees it."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message[:MESSAGE_LIMIT]


def without_paths(message: str, paths: Iterable[str | Path]) -> str:
    """``message`` with each of ``paths`` (server directories) removed."""
    for path in paths:
        text = str(path).rstrip("/")
        if text:
            message = message.replace(text + "/", "").replace(text, "<task-dir>")
    return message


def as_serving_error(error: BaseException, hidden_paths: Iterable[str | Path] = ()) -> ServingError:
    """The client-visible status and message of any exception a request raised."""
    if isinstance(error, ServingError):
        return error
    status = _status_of(error)
    if isinstance(error, UnknownTaskError):
        message = f"unknown task {shown(str(error.args[0]))}: no loaded task has this id"
    elif isinstance(error, MemoryError):
        message = "the server could not allocate memory for this request; send smaller inputs"
    elif status is Status.INTERNAL:
        log.error("request failed unexpectedly", exc_info=error)
        message = f"inference failed: {type(error).__name__}: {error}"
    else:
        message = str(error)
    return ServingError(status, without_paths(message, hidden_paths))


def _status_of(error: BaseException) -> Status:
    if isinstance(error, UnknownTaskError | TaskNotFoundError):
        return Status.NOT_FOUND
    if isinstance(error, InputError | PackageError):
        return Status.INVALID_ARGUMENT
    if isinstance(error, QueueFullError | ShuttingDownError | ModelControlError):
        return Status.UNAVAILABLE
    if isinstance(error, DeadlineExpiredError):
        return Status.DEADLINE_EXCEEDED
    if isinstance(error, MemoryError):
        return Status.RESOURCE_EXHAUSTED
    if isinstance(error, TaskLoadCancelledError):  # an unload of the same task won the race
        return Status.ABORTED
    return Status.INTERNAL
