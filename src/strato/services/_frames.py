"""Length-prefixed JSON frames over a pipe: the runtime's parent <-> worker protocol.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
JSON, never pickle: a worker runs user code, and what crosses the pipe is data.
This module is imported by every worker at cold start, so it stays tiny.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

_HEADER = struct.Struct(">I")
_CHUNK = 1 << 20


def encode(message: Any) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


def frame_body(body: bytes) -> bytes:
    """Frame already-encoded JSON (the runtime encodes events once, to check their size)."""
    return _HEADER.pack(len(body)) + body


def write_frame(fd: int, frame: bytes) -> None:
    """Write a whole frame (blocking). BrokenPipeError means the other side is gone."""
    view = memoryview(frame)
    while view:
        view = view[os.write(fd, view) :]


class FrameReader:
    """Reads frames from a pipe, optionally with a deadline (``time.monotonic()`` based)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def read(self, deadline: float | None = None) -> Any:
        """The next message. EOFError when the writer closed; TimeoutError at the deadline."""
        while True:
            if len(self._buf) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buf)
                end = _HEADER.size + size
                if len(self._buf) >= end:
                    body = bytes(self._buf[_HEADER.size : end])
                    del self._buf[:end]
                    return json.loads(body)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._poll.poll(remaining * 1000.0):
                    raise TimeoutError
            chunk = os.read(self.fd, _CHUNK)
            if not chunk:
                raise EOFError
            self._buf += chunk
