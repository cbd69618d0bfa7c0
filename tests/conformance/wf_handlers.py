"""Handlers for the Workflow conformance suite, imported by runtime worker processes.

The tests directory is not a package: specs put this directory on the workers'
PYTHONPATH (``spec.env``) and name handlers ``wf_handlers:<function>``. Handlers
reach the run's services through ``connect_from_env()``, as a deployed function does;
they record what they did in the table ``wf_conformance`` so the tests can count.
"""

from __future__ import annotations

import os
from typing import Any

from strato.errors import ConditionFailed
from strato.services import Services, connect_from_env

TABLE = "wf_conformance"

_services: Services | None = None


def _connect() -> Services:
    global _services
    if _services is None:
        _services = connect_from_env()
        _services.table.create_table(TABLE)
    return _services


def _table() -> Any:
    return _connect().table


def bump(key: str) -> int:
    """Add one to the counter ``key`` (compare-and-set, so concurrent bumps all count)."""
    table = _table()
    while True:
        item = table.get(TABLE, key)
        try:
            if item is None:
                table.put(TABLE, key, {"n": 1}, if_absent=True)
                return 1
            table.put(TABLE, key, {"n": item.value["n"] + 1}, if_version=item.version)
            return int(item.value["n"]) + 1
        except ConditionFailed:
            continue


def count(event: Any, ctx: Any) -> dict[str, Any]:
    """Count this call under ``event["key"]`` and echo the event."""
    return {"key": event["key"], "count": bump(event["key"]), "event": event}


def hand_out_token(event: Any, ctx: Any) -> dict[str, Any]:
    """Publish the task token where a test (or another process) can find it."""
    n = bump(f"calls:{event['key']}")
    _table().put(TABLE, f"token:{event['key']}", {"token": event["token"], "call": n})
    return {"published": True}


def call_back(event: Any, ctx: Any) -> None:
    """Complete our own task from inside the worker, before the invocation even returns."""
    _connect().workflow.send_task_success(event["token"], {"from": "worker", "pid": os.getpid()})


class Flaky(Exception):
    """Raised by ``flaky`` until it has failed ``event["fail"]`` times."""


def flaky(event: Any, ctx: Any) -> dict[str, Any]:
    n = bump(event["key"])
    if n <= event["fail"]:
        raise Flaky(f"failure {n} of {event['fail']}")
    return {"attempt": n}
