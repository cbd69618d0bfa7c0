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


def reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS (Linux ``clear_refs`` 5); returns
    it in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return peak_bytes()


def peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def checksum_shm(event: Any, ctx: Any) -> dict[str, Any]:
    """Map the buffer named by reference and read all of it in place (with ``copy``: copy
    it into private memory first, the control that shows the measure sees such a copy).

    Bytes copied = how far the peak RSS rose while the buffer was taken and read: a
    copy, however it is made (a read from a pipe, a ``memcpy`` out of a memory map),
    needs that much new private memory, while pages of a segment this warm worker has
    mapped before are already counted. ``pipe_bytes``: what came through ``read()``."""
    before, base = _io(), reset_peak()
    t0 = time.perf_counter()
    view = ctx.attach(event["ref"])
    attach_s = time.perf_counter() - t0
    data = np.frombuffer(view, dtype=np.float32)
    if event.get("copy"):
        data = np.array(data)
    total = float(data.sum(dtype=np.float64))
    grown = peak_bytes() - base
    after = _io()
    return {"sum": total, "attach_s": attach_s, "bytes_copied": grown,
            "pipe_bytes": after["rchar"] - before["rchar"]}
