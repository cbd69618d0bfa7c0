"""Nodes and the cluster of nodes that aggregates one round at a time.

A ``Node`` is a runtime with its own shared memory: a ``ShmPool`` that updates land
in and accumulators live in, an executor that runs aggregator functions (Runtime
workers or warm threads), a dispatcher, and a socket endpoint that other nodes send
updates and partials to. Several nodes can live in one process (tests, benchmarks):
they still share nothing but sockets — each maps only its own pool's segments.

``lease_update`` hands out the buffer an update lands in, and blocks while the node
holds ``max_inflight_updates`` (or ``max_inflight_bytes``) of not-yet-aggregated
updates: back-pressure (a gateway stops reading its sockets) keeps memory bounded
however many clients there are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from strato.aggregation._dispatcher import Dispatcher
from strato.aggregation._executor import Executor, RuntimeExecutor, ThreadExecutor
from strato.aggregation._inputs import Accumulator, PrivateBuffer
from strato.aggregation._messages import Input
from strato.aggregation._transport import Endpoint
from strato.control.placement import NodeCapacity
from strato.errors import ConfigError
from strato.services.runtime import Runtime
from strato.services.shm import ShmLease, ShmPool

__all__ = ["Node", "UpdateLease"]


# Measured (docs/lifl.md): below this update size a hand-off to a warm node thread
# beats a Runtime invocation (at 1M floats a worker's IPC costs more than the add);
# from 10M floats up, worker processes are as fast or faster (no GIL or allocator
# contention with the node's dispatcher, ingest and sockets) and are isolated.
THREADS_BELOW_BYTES = 16 << 20


class Node:
    def __init__(
        self,
        name: str,
        *,
        cores: float = 1.0,
        executor: str = "auto",
        runtime: Runtime | None = None,
        keep_alive_s: float = 60.0,
        max_inflight_updates: int = 16,
        max_inflight_bytes: int = 512 << 20,
    ) -> None:
        """``executor``: "runtime" (aggregators are Runtime functions), "threads" (warm
        threads of this process), or "auto" (threads for updates under
        ``THREADS_BELOW_BYTES``, Runtime functions otherwise)."""
        if executor not in ("threads", "runtime", "auto"):
            raise ConfigError(f"executor must be threads, runtime or auto, got {executor!r}")
        if max_inflight_updates < 1 or max_inflight_bytes < 1:
            raise ConfigError("a node must let at least one update in at a time")
        self.name = name
        self.cores = cores
        self.executor_mode = executor
        self.keep_alive_s = keep_alive_s
        self.max_inflight_updates = max_inflight_updates
        self.max_inflight_bytes = max_inflight_bytes
        self.pool = ShmPool()
        self._runtime = runtime
        self._own_runtime: Runtime | None = None
        self._executors: dict[str, Executor] = {}
        self._lock = threading.Condition()
        self._inflight = 0  # bytes of updates landed and not yet aggregated
        self._inflight_count = 0
        self.backpressure_s = 0.0  # total time lease_update waited for room
        self._accumulators: dict[str, Accumulator] = {}
        self._parked: list[tuple[str, Accumulator]] = []  # see ``accumulators``
        self.endpoint = Endpoint(self._received, self.pool.lease, self._transport_failed)
        self.dispatcher = Dispatcher(self)

    # ---- executors -------------------------------------------------------------------

    def executor_for(self, nbytes: int) -> Executor:
        """Where this node runs the aggregators of a model of ``nbytes`` bytes."""
        kind = self.executor_mode
        if kind == "auto":
            kind = "threads" if nbytes < THREADS_BELOW_BYTES else "runtime"
        with self._lock:
            found = self._executors.get(kind)
            if found is not None:
                return found
        made: Executor
        if kind == "runtime":
            runtime = self._runtime
            if runtime is None:
                from strato.services._runtime_process import ProcessRuntime

                runtime = self._runtime = self._own_runtime = ProcessRuntime()
            made = RuntimeExecutor(runtime, self.name, keep_alive_s=self.keep_alive_s)
        else:
            made = ThreadExecutor(self.name, keep_alive_s=self.keep_alive_s)
        with self._lock:
            return self._executors.setdefault(kind, made)

    def billed_s(self) -> float:
        with self._lock:
            executors = list(self._executors.values())
        return sum(e.billed_s() for e in executors)

    def cold_starts(self) -> int:
        with self._lock:
            executors = list(self._executors.values())
        return sum(e.cold_starts() for e in executors)

    @property
    def capacity(self) -> NodeCapacity:
        return NodeCapacity(self.name, self.cores)

    # ---- memory ------------------------------------------------------------------------

    def lease_update(
        self, nbytes: int, timeout: float | None = None, *, requested_at: float | None = None
    ) -> UpdateLease:
        """A buffer to receive one update into; blocks while too much is waiting.

        ``requested_at`` (default: now) is when the update began to arrive — a gateway
        passes the time the client's upload started — and becomes its arrival time."""
        called = time.monotonic()
        requested_at = called if requested_at is None else requested_at
        with self._lock:
            room = self._lock.wait_for(lambda: self._room(nbytes), timeout)
            self.backpressure_s += time.monotonic() - called
            if not room:
                raise TimeoutError(f"node {self.name}: no room for another update")
            self._inflight += nbytes
            self._inflight_count += 1
        try:
            lease = self.pool.lease(nbytes)
        except BaseException:
            self._returned(nbytes)
            raise
        return UpdateLease(lease, lambda: self._returned(nbytes), requested_at)

    def update_slots(self, nbytes: int) -> int:
        """How many updates of ``nbytes`` the ingest budget holds at once (at least 1)."""
        return max(1, min(self.max_inflight_updates, self.max_inflight_bytes // max(1, nbytes)))

    def has_room(self, nbytes: int) -> bool:
        """Whether ``lease_update(nbytes)`` would go through without waiting."""
        with self._lock:
            return self._room(nbytes)

    def _room(self, nbytes: int) -> bool:
        if self._inflight_count == 0:
            return True  # one update always fits, however big
        return (
            self._inflight_count < self.max_inflight_updates
            and self._inflight + nbytes <= self.max_inflight_bytes
        )

    def _returned(self, nbytes: int) -> None:
        with self._lock:
            self._inflight -= nbytes
            self._inflight_count -= 1
            self._lock.notify_all()

    def accumulators(self, wanted: dict[str, int], *, private: bool = False,
                     busy: frozenset[str] = frozenset()) -> dict[str, Accumulator]:
        """Warm accumulators for a round's aggregators on this node (``wanted``: name →
        bytes), reused round after round: in the node's shared memory, or, for
        aggregators on threads of this process (``private``), in this process's own
        memory (``PrivateBuffer``). One an aggregator of the last round held goes to an
        aggregator of this round that needs its size (the tree changes between rounds:
        fresh memory is slow to touch the first time, ~2 GB/s); those left over are
        given back. ``busy``: aggregators with an invocation still out (a dropped
        round's): their buffers may still be written, so they go to no other
        aggregator and are not given back until a later round finds them idle (under
        its own name a buffer is safe: an aggregator's invocations run one at a time)."""
        kind = PrivateBuffer if private else ShmLease

        def fits(lease: Accumulator, nbytes: int | None) -> bool:
            return lease.nbytes == nbytes and isinstance(lease, kind)

        with self._lock:
            held = self._accumulators
            loose = [(n, held.pop(n)) for n in list(held) if not fits(held[n], wanted.get(n))]
            for n, lease in self._parked:  # kept aside; wanted again under its own name?
                if n not in held and fits(lease, wanted.get(n)):
                    held[n] = lease
                else:
                    loose.append((n, lease))
            self._parked = [(n, lease) for n, lease in loose if n in busy]
            spare = [lease for n, lease in loose if n not in busy]
            for name, nbytes in wanted.items():
                match = None if name in held else next(
                    (i for i, lease in enumerate(spare) if fits(lease, nbytes)), None)
                if match is not None:
                    held[name] = spare.pop(match)
            for lease in spare:  # before any new lease: the pool may reuse its segment
                lease.release()
            for name, nbytes in wanted.items():
                if name not in held:
                    held[name] = PrivateBuffer(nbytes) if private else self.pool.lease(nbytes)
            return {name: held[name] for name in wanted}

    def hand_over(self, name: str, lease: Accumulator) -> None:
        """The root's accumulator now belongs to the round's result."""
        with self._lock:
            if self._accumulators.get(name) is lease:
                del self._accumulators[name]

    def take_back(self, name: str, lease: Accumulator) -> None:
        with self._lock:
            if name not in self._accumulators and not self.pool.closed:
                self._accumulators[name] = lease
                return
        lease.release()

    # ---- wire ----------------------------------------------------------------------------

    def _received(self, header: dict[str, Any], lease: ShmLease | None) -> None:
        kind, round_no, to = header.get("kind"), int(header["round"]), str(header["to"])
        if kind in ("update", "partial") and lease is not None:
            item = Input(
                {**lease.ref.to_dict(), "dtype": str(header["dtype"])}, float(header["coef"]),
                float(header["weight"]), int(header["updates"]), lease.release,
            )
            self.dispatcher.post("input", round_no, to, item)
        elif kind == "empty":
            self.dispatcher.post("empty", round_no, to)
        elif kind == "count":
            self.dispatcher.post("count", round_no, to, str(header["source"]),
                                 int(header["count"]))
        elif lease is not None:
            lease.release()

    def _transport_failed(self, exc: Exception) -> None:
        self.dispatcher.post("fail", exc)

    def close(self) -> None:
        self.dispatcher.stop()
        self.endpoint.close()
        with self._lock:
            executors = list(self._executors.values())
        for executor in executors:
            executor.close()
        if self._own_runtime is not None:
            self._own_runtime.close()
        self.dispatcher.release_left()
        with self._lock:
            accumulators = [*self._accumulators.values(), *(p for _, p in self._parked)]
            self._accumulators.clear()
            self._parked = []
        for lease in accumulators:
            lease.release()
        self.pool.close()


class UpdateLease:
    """A buffer one update lands in: a pooled shared-memory lease that also holds part
    of the node's in-flight budget until the update has been aggregated."""

    def __init__(
        self, lease: ShmLease, on_release: Callable[[], None], requested_at: float
    ) -> None:
        self._lease = lease
        # When the update started to arrive (before any wait for room): the arrival
        # time a round records, so back-pressure delays count against the system.
        self.requested_at = requested_at
        self._on_release: Callable[[], None] | None = on_release
        self.ref = lease.ref
        self.nbytes = lease.nbytes

    @property
    def buffer(self) -> memoryview:
        return self._lease.buffer

    def release(self) -> None:
        """Give the memory back (the dispatcher does this once the update is added)."""
        done, self._on_release = self._on_release, None
        if done is None:
            return
        self._lease.release()
        done()
