"""Runtime: named functions invoked by events (the Lambda model).

A function is a ``FunctionSpec``: a handler named ``"package.module:function"`` (so a
worker imports it; no code is pickled), a timeout, a concurrency cap, a keep-alive
and a retry budget. The handler is called as ``handler(event, ctx)`` with a JSON
event and returns a JSON-able result; module-level state survives between warm
invocations, exactly as in Lambda. Large inputs travel by reference: put them in
node shared memory (``services.shm``) and pass the ``ShmRef`` dict in the event;
the handler maps it with ``ctx.attach(ref)``.

Semantics every backend keeps: a warm worker is reused (its invocation is not a
cold start); a worker idle longer than ``keep_alive_s`` goes away (scale to zero);
at most ``max_concurrency`` invocations of a function run at once, the rest wait;
a worker that dies mid-invocation is replaced and the invocation retried up to
``retries`` times; an invocation past ``timeout_s`` is stopped. Every backend counts
cold starts, invocations and billed function-seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Context", "FunctionSpec", "Runtime", "RuntimeStats"]


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    handler: str
    timeout_s: float = 60.0
    max_concurrency: int = 4
    keep_alive_s: float = 30.0
    memory_mb: int = 1024
    retries: int = 2
    max_event_bytes: int = 6 * 1024 * 1024  # Lambda's synchronous payload limit
    env: Mapping[str, str] = field(default_factory=dict)
    # Where a backend with several nodes runs it (one-node backends and Lambda have
    # nothing to choose): "state", next to the run's durable state (the table and the
    # blobs; Ray: on the head); "node", on the node an invocation names
    # (``ctx.invoke_async(..., node=)``; none named: as "state"), with its own warm
    # workers and ``max_concurrency`` on each node (a node's agent); "" anywhere.
    locality: str = ""


@dataclass
class RuntimeStats:
    invocations: int = 0
    cold_starts: int = 0
    billed_s: float = 0.0  # function-seconds: sum of invocation durations
    # cold starts' init (process start + handler import), which Lambda bills too since
    # 2025; kept apart so that billed_s stays the invocations' own time
    init_s: float = 0.0
    gb_s: float = 0.0  # billed_s weighted by each function's memory size in GB
    errors: int = 0
    timeouts: int = 0
    crashes: int = 0
    retries: int = 0
    live_workers: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


class Context(Protocol):
    """What a handler sees of the invocation beside its event."""

    function_name: str
    invocation_id: str
    cold_start: bool

    def remaining_s(self) -> float: ...

    def attach(self, ref: Mapping[str, Any]) -> memoryview:
        """Map a shared-memory reference from the event (no copy)."""
        ...

    def invoke_async(self, name: str, event: Mapping[str, Any],
                     node: str | None = None) -> None:
        """Start another function without waiting for it (Lambda's Event invocation).
        ``node``: for a function of ``locality="node"``, the node to run it on (a name
        from ``BlobStore.home``); ignored where there is one node."""
        ...


@runtime_checkable
class Runtime(Protocol):
    def register(self, spec: FunctionSpec) -> None: ...

    def invoke(self, name: str, event: Mapping[str, Any]) -> Any:
        """Run a function and return its result. UnknownFunction, PayloadTooLarge,
        FunctionError, InvocationTimeout, WorkerCrashed."""
        ...

    def invoke_async(self, name: str, event: Mapping[str, Any]) -> Future[Any]: ...

    def stats(self, name: str | None = None) -> RuntimeStats: ...

    def close(self) -> None:
        """Stop every worker; nothing is left running or mapped."""
        ...
