"""Errors a user can cause or meet. The CLI prints each as one line, never a traceback."""

from __future__ import annotations

import errno

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class StratoError(Exception):
    """Base of every error Strato raises on purpose; its message is meant for the user."""


class ConfigError(StratoError):
    """A job, app or command-line setting is missing or malformed."""


class LayoutError(StratoError):
    """Parameters do not match the expected layout (names, shapes, dtypes)."""


class CodecError(StratoError):
    """A payload cannot be decoded: truncated, corrupt or of an unknown format."""


class PayloadTooLarge(StratoError):
    """A payload is over the configured size limit."""


class SchemaError(StratoError):
    """A message does not match its topic's schema."""


class NotFound(StratoError):
    """A named topic, queue, blob, item, function or execution does not exist."""


class CorruptBlob(StratoError):
    """A stored blob's content does not match its recorded checksum (or its address)."""


class ConditionFailed(StratoError):
    """A conditional write found the item in another state than expected."""


class UnknownFunction(NotFound):
    """No function of that name is registered with the runtime."""


class FunctionError(StratoError):
    """A function raised; the message carries the function's own error."""


class InvocationTimeout(StratoError):
    """A function ran past its timeout and was stopped."""


class WorkerCrashed(StratoError):
    """A worker process died during an invocation and every retry died too."""


class TaskFailed(StratoError):
    """A workflow task token was failed, or a token wait timed out."""


class InvalidToken(StratoError):
    """A task token is unknown, or its task has already completed or timed out."""


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says a disk (or a quota on it) is full: the node's fault, not
    the caller's, and one that freeing space ends."""
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL
