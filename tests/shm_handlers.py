"""Handlers for tests/test_shm.py, imported by runtime workers (via spec.env PYTHONPATH)."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any


def digest(event: Any, ctx: Any) -> dict[str, Any]:
    """Read a parent-written buffer in place and fill another one for the parent."""
    view = ctx.attach(event["input"])
    out = ctx.attach(event["output"])
    out[:] = bytes([event["fill"]]) * len(out)
    return {"sha256": hashlib.sha256(view).hexdigest(), "nbytes": len(view), "pid": os.getpid()}


def attach_and_die(event: Any, ctx: Any) -> None:
    view = ctx.attach(event["input"])
    view[0] = 0xAB  # touch it, then die holding the mapping
    os.kill(os.getpid(), signal.SIGKILL)


_pool: Any = None
_leases: list[Any] = []


def lease_and_wait(event: Any, ctx: Any) -> None:
    """Own a segment (as the aggregator's node pool does), publish its name, then block."""
    from strato.services.shm import ShmPool

    global _pool
    _pool = _pool or ShmPool()
    lease = _pool.lease(1000)
    _leases.append(lease)
    tmp = Path(event["name_file"] + ".tmp")
    tmp.write_text(lease.ref.name)
    tmp.rename(event["name_file"])
    time.sleep(event["seconds"])
