"""Handlers for the AWS backend's own tests (imported by local Lambda workers, which get
this directory on their PYTHONPATH from the function's environment)."""

from __future__ import annotations

import os
from typing import Any

calls = 0


def describe(event: Any, ctx: Any) -> dict[str, Any]:
    global calls
    calls += 1
    return {
        "event": event,
        "calls": calls,
        "cold_start": ctx.cold_start,
        "function_name": ctx.function_name,
        "invocation_id": ctx.invocation_id,
        "remaining_s": ctx.remaining_s(),
        "lambda_function": os.environ.get("AWS_LAMBDA_FUNCTION_NAME"),
        "services": os.environ.get("STRATO_SERVICES"),
    }


def boom(event: Any, ctx: Any) -> None:
    raise KeyError(event.get("missing", "k"))


def not_json(event: Any, ctx: Any) -> Any:
    return {1, 2}


def attach(event: Any, ctx: Any) -> Any:
    return ctx.attach({"name": "x"})


def fire(event: Any, ctx: Any) -> None:
    ctx.invoke_async(event["target"], {"from": ctx.function_name})
