"""The AWS Lambda handler of every Strato function: ``strato.backends.aws.lambda_entry.handler``.

``LambdaRuntime.register`` deploys a ``FunctionSpec`` as a Lambda function with this
handler and, in its environment, ``STRATO_HANDLER`` (the spec's
``package.module:function``), ``STRATO_FUNCTION`` (its Strato name) and
``STRATO_SERVICES`` (the Services config, so the handler's ``connect_from_env()``
and ``ctx.invoke_async`` reach the same backend). The Strato handler is imported once
per execution environment and its module state survives between warm invocations,
as Lambda keeps it; it is called as ``handler(event, ctx)`` with a Strato ``Context``.

A batch from a DynamoDB-stream event source mapping (``{"Records": [...]}``) reaches
the handler as ``{"records": [Change, ...]}``, what the embedded ``StreamTrigger``
sends (``_stream_event``), so a stream-triggered function runs unchanged on both.

Keep this module light: it is imported on every cold start.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from strato.backends.aws._stream_event import is_stream_event, strato_event
from strato.errors import ConfigError

__all__ = ["LambdaContext", "handler"]

_handlers: dict[str, Callable[[Any, Any], Any]] = {}
_warm = False  # set by the first invocation of this execution environment
_services: Any = None
_lock = threading.Lock()


def _load(name: str) -> Callable[[Any, Any], Any]:
    if name not in _handlers:
        module, _, attr = name.partition(":")
        if not module or not attr:
            raise ConfigError(f"STRATO_HANDLER must be 'package.module:function', got {name!r}")
        _handlers[name] = getattr(importlib.import_module(module), attr)
    return _handlers[name]


def _runtime() -> Any:
    """The runtime of this function's own Services (opened once per environment)."""
    global _services
    with _lock:
        if _services is None:
            from strato.services import connect_from_env

            _services = connect_from_env()
        return _services.runtime


class LambdaContext:
    """A Strato ``Context`` over the context object Lambda passes to its handler."""

    def __init__(self, function_name: str, lambda_context: Any, cold_start: bool) -> None:
        self.function_name = function_name
        self.invocation_id = str(getattr(lambda_context, "aws_request_id", ""))
        self.cold_start = cold_start
        self._lambda_context = lambda_context

    def remaining_s(self) -> float:
        return float(self._lambda_context.get_remaining_time_in_millis()) / 1000.0

    def attach(self, ref: Mapping[str, Any]) -> memoryview:
        raise ConfigError(
            "shared-memory references do not reach into AWS Lambda: put the data in the "
            "BlobStore and pass its key in the event"
        )

    def invoke_async(self, name: str, event: Mapping[str, Any],
                     node: str | None = None) -> None:
        """Lambda's Event invocation of another function of the same Services (Lambda
        has no nodes to name: ``node`` is moot)."""
        runtime = _runtime()
        invoke_event = getattr(runtime, "invoke_event", None)
        if invoke_event is not None:
            invoke_event(name, event)
        else:  # a non-AWS backend in STRATO_SERVICES (a test double): fire and forget
            runtime.invoke_async(name, event)


def _prefix() -> str:
    try:
        return str(json.loads(os.environ.get("STRATO_SERVICES") or "{}").get("prefix", ""))
    except ValueError:
        return ""


def handler(event: Any, context: Any) -> Any:
    """What Lambda calls: run the Strato handler named in the environment."""
    global _warm
    cold, _warm = not _warm, True
    function = _load(os.environ["STRATO_HANDLER"])
    name = os.environ.get("STRATO_FUNCTION") or str(getattr(context, "function_name", ""))
    if is_stream_event(event):
        event = strato_event(event, _prefix())
    return function(event, LambdaContext(name, context, cold))
