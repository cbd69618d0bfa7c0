"""Handlers the primitives benchmark runs inside Runtime workers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


def _io() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"rchar": int(fields["rchar"]), "wchar": int(fields["wchar"])}


def noop(event: Any, ctx: Any) -> dict[str, Any]:
    return {}


def io_counters(event: Any, ctx: Any) -> dict[str, int]:
    return _io()


def checksum_shm(event: Any, ctx: Any) -> dict[str, Any]:
    """Map the buffer named by reference and read all of it in place."""
    before = _io()
    t0 = time.perf_counter()
    view = ctx.attach(event["ref"])
    attach_s = time.perf_counter() - t0
    data = np.frombuffer(view, dtype=np.float32)
    total = float(data.sum(dtype=np.float64))
    after = _io()
    return {"sum": total, "attach_s": attach_s, "pipe_bytes": after["rchar"] - before["rchar"]}
