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


def record_batches(event: Any, ctx: Any) -> dict[str, Any]:
    """Keeps every event it gets as a blob ``seen/<invocation>``; a batch holding the key
    ``fail-once`` fails the first time it comes (to see it come again); the store
    remembers that it failed, whichever worker takes the retry."""
    import json

    from strato.services import connect_from_env

    keys = [r["key"] for r in event.get("records", [])]
    with connect_from_env() as svc:
        failing = "fail-once" in keys and not svc.blobs.exists("failed-once")
        body = json.dumps({"event": event, "failed": failing}).encode()
        svc.blobs.put(f"seen/{ctx.invocation_id}", body)
        if failing:
            svc.blobs.put("failed-once", b"1")
    if failing:
        raise RuntimeError("failing this batch once")
    return {"keys": keys}


def stub_start_round(event: Any, ctx: Any) -> dict[str, Any]:
    """Opens a round and never calls its token back: the round runs into its deadline."""
    return {"round": event["round"]}


def stub_close_round(event: Any, ctx: Any) -> dict[str, Any]:
    return {"round": event["round"], "closed_by": "deadline"}


def stub_evaluate(event: Any, ctx: Any) -> dict[str, Any]:
    r = int(event["round"])
    return {"round": r, "next_round": r + 1, "done": r >= 2}
