"""Where aggregator invocations run: Runtime functions, or warm threads of the node.

Both executors run the same handler (``_handler.aggregate``) on the same events and
keep one warm "lane" per aggregator name, so an aggregator that serves round after
round stays warm (its worker has every segment it uses already mapped):

- ``RuntimeExecutor``: each aggregator is a Runtime function ``lifl.<node>.<name>``
  with ``max_concurrency=1``; the Runtime keeps its worker warm for ``keep_alive_s``
  and scales it to zero after, counts cold starts and bills function-seconds.
- ``ThreadExecutor``: each aggregator is a thread of the node's process that lives
  while it is used and exits after ``keep_alive_s`` idle; billed time is the time
  spent in the handler. No process boundary: an invocation is a queue hand-off.

Which is faster depends on the update size; ``benchmarks/aggregation.py`` measures
both (see docs/lifl.md for the numbers and the choice).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any, Protocol

from strato.aggregation import _handler, _kernels
from strato.services import shm
from strato.services.runtime import FunctionSpec, Runtime

__all__ = ["Executor", "RuntimeExecutor", "ThreadExecutor", "single_threaded_blas"]

HANDLER = "strato.aggregation._handler:aggregate"
# Parallelism comes from aggregators, never from BLAS threads inside one of them.
BLAS_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Executor(Protocol):
    kind: str

    def submit(self, name: str, event: Mapping[str, Any]) -> Future[dict[str, Any]]: ...

    def billed_s(self) -> float: ...

    def cold_starts(self) -> int: ...

    def close(self) -> None: ...


class RuntimeExecutor:
    kind = "runtime"

    def __init__(
        self,
        runtime: Runtime,
        node: str,
        *,
        keep_alive_s: float = 60.0,
        timeout_s: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.runtime = runtime
        self.node = node
        self.keep_alive_s = keep_alive_s
        self.timeout_s = timeout_s
        self.env = {**BLAS_ENV, _handler.WARM_UP_ENV: "1", **(env or {})}
        self._registered: set[str] = set()
        self._lock = threading.Lock()

    def function_name(self, name: str) -> str:
        return f"lifl.{self.node}.{name}"

    def submit(self, name: str, event: Mapping[str, Any]) -> Future[dict[str, Any]]:
        fn = self.function_name(name)
        with self._lock:
            if fn not in self._registered:
                self.runtime.register(
                    FunctionSpec(
                        fn,
                        HANDLER,
                        timeout_s=self.timeout_s,
                        max_concurrency=1,  # one lane per aggregator
                        keep_alive_s=self.keep_alive_s,
                        # Not idempotent mid-batch (a half-added input would be added
                        # again): a crash fails the round instead of retrying.
                        retries=0,
                        env=self.env,
                    )
                )
                self._registered.add(fn)
        return self.runtime.invoke_async(fn, event)

    def billed_s(self) -> float:
        with self._lock:
            names = list(self._registered)
        return sum(self.runtime.stats(n).billed_s for n in names)

    def cold_starts(self) -> int:
        with self._lock:
            names = list(self._registered)
        return sum(self.runtime.stats(n).cold_starts for n in names)

    def close(self) -> None:
        pass  # the runtime belongs to the node, which closes it


class _LocalContext:
    """The handler's ``ctx`` on a node thread: segments are mapped by this very process."""

    def __init__(self, name: str) -> None:
        self.function_name = name
        self.invocation_id = ""
        self.cold_start = False

    def remaining_s(self) -> float:
        return float("inf")

    def attach(self, ref: Mapping[str, Any]) -> memoryview:
        return shm.attach(ref)

    def invoke_async(self, name: str, event: Mapping[str, Any],
                     node: str | None = None) -> None:
        raise NotImplementedError("aggregators on node threads do not start functions")


_Job = tuple[Mapping[str, Any], "Future[dict[str, Any]]"]


class _Lane(threading.Thread):
    def __init__(self, owner: ThreadExecutor, name: str) -> None:
        super().__init__(name=f"lifl-{owner.node}-{name}", daemon=True)
        self.owner = owner
        self.agg = name
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.ctx = _LocalContext(name)

    def run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=self.owner.keep_alive_s)
            except queue.Empty:
                if self.owner._retire(self):
                    return  # idle past keep-alive: scale to zero
                continue
            if job is None:
                return
            event, future = job
            if not future.set_running_or_notify_cancel():
                continue
            started = time.perf_counter()
            try:
                result = _handler.aggregate(event, self.ctx)
            except BaseException as exc:  # delivered through the future
                self.owner._bill(time.perf_counter() - started)
                future.set_exception(exc)
            else:
                self.owner._bill(time.perf_counter() - started)
                future.set_result(result)


class ThreadExecutor:
    kind = "threads"

    def __init__(self, node: str, *, keep_alive_s: float = 60.0) -> None:
        self.node = node
        self.keep_alive_s = keep_alive_s
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lane] = {}
        self._billed = 0.0
        self._cold = 0
        self._closed = False
        single_threaded_blas()
        _kernels.warm_up()

    def submit(self, name: str, event: Mapping[str, Any]) -> Future[dict[str, Any]]:
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the executor is closed")
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = _Lane(self, name)
                self._cold += 1
                lane.start()
            lane.jobs.put((event, future))
        return future

    def _retire(self, lane: _Lane) -> bool:
        with self._lock:
            if not lane.jobs.empty():
                return False  # work arrived while we timed out
            if self._lanes.get(lane.agg) is lane:
                del self._lanes[lane.agg]
            return True

    def _bill(self, seconds: float) -> None:
        with self._lock:
            self._billed += seconds

    def billed_s(self) -> float:
        with self._lock:
            return self._billed

    def cold_starts(self) -> int:
        with self._lock:
            return self._cold

    def close(self) -> None:
        with self._lock:
            self._closed = True
            lanes = list(self._lanes.values())
            self._lanes.clear()
        for lane in lanes:
            lane.jobs.put(None)
        for lane in lanes:
            lane.join(timeout=10.0)


def single_threaded_blas() -> None:
    """Pin this process's BLAS to one thread (see ``_kernels``), when threadpoolctl is there."""
    try:
        from threadpoolctl import (  # type: ignore[import-untyped]  # no stubs published
            threadpool_limits,
        )
    except ImportError:  # the aggregation is still right, only slower on small machines
        return
    threadpool_limits(limits=1, user_api="blas")
