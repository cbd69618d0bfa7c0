"""Receiving an update over HTTP straight into a shared-memory buffer.

The ASGI server hands the request body over in chunks as it reads them off the
socket (uvicorn: at most ~64 KiB each); each chunk is copied once, into place, at the
next offset of a buffer leased from the node's ``ShmPool``. The body is never joined
into one bytes object, so receiving a 100 MB update costs one pass over the memory
the aggregator will read, not three.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request

__all__ = ["HttpError", "content_length", "receive_into", "small_body", "upload_meta"]

Receive = Callable[[], Awaitable[Mapping[str, Any]]]


class HttpError(Exception):
    """A request the gateway refuses: an HTTP status and a one-line reason for the client."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        # True when the body was left unread: the connection cannot be reused.
        self.close = close


def content_length(headers: Mapping[str, str], limit: int) -> int:
    """The declared body size, checked against ``limit`` before a byte is read."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise HttpError(411, "an upload needs a Content-Length, not a chunked body", close=True)
    raw = headers.get("content-length")
    if raw is None:
        raise HttpError(411, "an upload needs a Content-Length header", close=True)
    try:
        length = int(raw)
    except ValueError:
        raise HttpError(400, f"Content-Length {raw!r} is not a number", close=True) from None
    if length <= 0:
        raise HttpError(400, "the upload is empty", close=True)
    if length > limit:
        raise HttpError(
            413, f"upload of {length} bytes is over this server's limit of {limit}", close=True
        )
    return length


async def receive_into(receive: Receive, buffer: memoryview, idle_timeout_s: float) -> None:
    """Read exactly ``len(buffer)`` body bytes into ``buffer``, chunk by chunk, in place.

    Raises ``HttpError(400)`` when the body ends early, the client disconnects, or no
    data arrives for ``idle_timeout_s`` (a stalled sender must not hold a buffer forever).
    """
    expected, offset = len(buffer), 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), idle_timeout_s)
        except TimeoutError:
            raise HttpError(
                400,
                f"upload truncated: no data for {idle_timeout_s:g} s after "
                f"{offset} of {expected} bytes",
                close=True,
            ) from None
        if message["type"] == "http.disconnect":
            raise HttpError(
                400, f"upload truncated: client went away after {offset} of {expected} bytes"
            )
        chunk = message.get("body", b"")
        if chunk:
            end = offset + len(chunk)
            if end > expected:  # h11 enforces Content-Length; this guards other servers
                raise HttpError(400, f"upload is longer than its Content-Length {expected}")
            buffer[offset:end] = chunk
            offset = end
        if not message.get("more_body", False):
            break
    if offset != expected:
        raise HttpError(400, f"upload truncated: {offset} of {expected} bytes arrived")


def upload_meta(headers: Mapping[str, str]) -> dict[str, Any]:
    """The update's metadata from its headers (checked before the body is read)."""
    h = headers
    try:
        num_examples = int(h.get("x-strato-num-examples", ""))
        train_s = float(h.get("x-strato-train-s", "0"))
        metrics = json.loads(h.get("x-strato-metrics", "{}"))
    except ValueError:
        raise HttpError(
            400,
            "X-Strato-Num-Examples must be an integer, X-Strato-Train-S a number "
            "and X-Strato-Metrics a JSON object",
        ) from None
    if num_examples <= 0:
        raise HttpError(400, "X-Strato-Num-Examples must be positive")
    if not math.isfinite(train_s) or train_s < 0:
        raise HttpError(400, "X-Strato-Train-S must be a finite number of seconds")
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and math.isfinite(v) for v in metrics.values()
    ):
        raise HttpError(400, "X-Strato-Metrics must map names to finite numbers")
    return {
        "num_examples": num_examples,
        "train_s": train_s,
        "metrics": {str(k): float(v) for k, v in metrics.items()},
        "receipt": h.get("x-strato-receipt", ""),
    }


async def small_body(request: Request, limit: int, idle_timeout_s: float) -> bytes:
    """A small request body (a JSON document), refused beyond ``limit`` bytes, when the
    client goes away before it is whole, or when it stalls for ``idle_timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"request body over {limit} bytes", close=True)
    parts, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), idle_timeout_s)
        except TimeoutError:
            raise HttpError(
                400, f"request body stalled: no data for {idle_timeout_s:g} s", close=True
            ) from None
        if message["type"] == "http.disconnect":
            raise HttpError(400, "the client went away before its request body was whole")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body over {limit} bytes", close=True)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)
