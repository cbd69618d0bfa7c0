"""Handlers for the Runtime conformance suite, imported by worker processes.

The tests directory is not a package: specs put this directory on the workers'
PYTHONPATH (``spec.env``) and name handlers ``runtime_handlers:<function>``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

calls = 0  # module state: survives between warm invocations of one worker


def echo(event: Any, ctx: Any) -> dict[str, Any]:
    global calls
    calls += 1
    return {
        "event": event,
        "pid": os.getpid(),
        "cold_start": ctx.cold_start,
        "calls": calls,
        "function_name": ctx.function_name,
        "invocation_id": ctx.invocation_id,
        "remaining_s": ctx.remaining_s(),
    }


held: list[Any] = []  # shared-memory leases a nap holds (kept past the invocation)


def nap(event: Any, ctx: Any) -> dict[str, Any]:
    """Sleep; optionally hold a shared-memory lease, and write the pid first so a test
    can find (and kill) the worker."""
    if event.get("lease_bytes"):
        from strato.services.shm import ShmPool

        pool = ShmPool()
        held.extend([pool, pool.lease(int(event["lease_bytes"]))])
    if "pid_file" in event:
        Path(event["pid_file"]).write_text(str(os.getpid()))
    start = time.time()
    time.sleep(event["seconds"])
    return {"pid": os.getpid(), "start": start, "end": time.time()}


def die_once(event: Any, ctx: Any) -> dict[str, Any]:
    """SIGKILL our own worker on the first attempt; succeed on the retry."""
    marker = Path(event["marker"])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return {"pid": os.getpid(), "killed_pid": int(marker.read_text())}


def die_always(event: Any, ctx: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for_kill(event: Any, ctx: Any) -> dict[str, Any]:
    """First attempt: publish our pid and wait to be killed from outside. Retry: return."""
    pid_file = Path(event["pid_file"])
    if not pid_file.exists():
        pid_file.write_text(str(os.getpid()))
        time.sleep(60)
    return {"pid": os.getpid(), "killed_pid": int(pid_file.read_text())}


def fail(event: Any, ctx: Any) -> None:
    raise ValueError(f"{event['message']}\nsecond line of the message")


def environment(event: Any, ctx: Any) -> dict[str, Any]:
    print("a handler printing to stdout must not break the runtime")
    sys.stdout.flush()
    return {"value": os.environ.get(event["variable"]), "stdin": sys.stdin.read()}


def fan_out(event: Any, ctx: Any) -> dict[str, Any]:
    for i in range(event["count"]):
        ctx.invoke_async(event["leaf"], {"path": f"{event['dir']}/leaf-{i}", "i": i})
    try:
        ctx.invoke_async("no-such-function", {})
        refused = ""
    except Exception as exc:
        refused = type(exc).__name__
    return {"refused": refused}


def leaf(event: Any, ctx: Any) -> None:
    Path(event["path"]).write_text(str(event["i"]))


def put_here(event: Any, ctx: Any) -> dict[str, Any]:
    """Write a blob through the run's services; say where this worker runs. With
    ``then``, also start another function on the node ``then`` names."""
    from strato.services import connect_from_env

    svc = connect_from_env()
    svc.blobs.put(event["key"], event["data"].encode())
    if "then" in event:
        ctx.invoke_async(event["then"]["name"], event["then"]["event"], node=event["then"]["node"])
    return {"node": getattr(svc.blobs, "node_id", ""), "pid": os.getpid()}
