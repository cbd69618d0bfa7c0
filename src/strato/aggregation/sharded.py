"""Coordinate-sharded aggregation: robust rules for models too big for one function.

The median, the trimmed mean and Krum need every update of a round at once: one
aggregator would hold ``K × model`` bytes. Here ``M`` shard aggregators split the
flat float32 model by coordinates: shard ``i`` owns ``[lo_i, hi_i)`` and holds a
``K × (hi_i − lo_i)`` float32 matrix, filled as updates arrive (each arrival copies
its slice into the next row, reading the update where it lies, by reference). At
the close each shard reduces its own columns; only Krum needs a word between them:
squared distances add up over coordinates, so the shards' ``K × K`` partial distance
matrices are summed here, ``strategy.robust.krum_select_from_distances`` picks the
updates, and each shard averages (or copies) the picked rows of its slice. The plain
weighted mean (FedAvg and the other streaming strategies' ``reduce``) is sharded the
same way with a running float64 sum per shard: ``O(slice)`` memory, not ``O(K × slice)``.

Results equal the unsharded references: ``np.median(stack, axis=0)`` exactly;
``strategy.robust.trimmed_mean``, Krum / multi-Krum and ``weighted_mean`` to
rounding (the sums are the same per coordinate; Krum's distances are summed in
another order, which only matters on an exact tie).

API::

    with ShardedRound(runtime, "fedmedian", {}, n_params, updates_expected,
                      shards=None, function_memory_mb=1024) as rnd:
        rnd.add("client-7", {"shm": name, "offset": 0, "nbytes": 4 * n_params}, weight)
        rnd.add("client-8", file_ref("/blobs/ab12", 0, 4 * n_params), weight)
        model = rnd.result()              # float32 [n_params]: the strategy's reduce
        rnd.stats().max_peak_rss_mb       # the largest shard's peak RSS this round

- ``strategy_name``/``options``: ``fedmedian``, ``trimmedmean`` (``beta``), ``krum``
  (``f``, ``m``), or any streaming strategy (its ``reduce`` is the weighted mean;
  apply ``strategy.step`` to the result yourself).
- ``shards=None`` takes the fewest that fit ``function_memory_mb``
  (``control.autoscaler.choose_shards``); fewer than that is a ConfigError.
- ``add(client, ref, weight)`` is eager and returns at once: the arrival is queued for
  every shard and each idle shard is invoked (``invoke_async``) with everything queued
  for it; a busy shard gets the arrivals in its next invocation, started when the
  current one ends (no thread of ours waits). False for a client already added or an
  update past ``updates_expected``. The referenced buffer must stay valid until
  ``result()`` returns.
- ``result()`` waits for the adds, reduces with the updates that arrived (at least the
  strategy's ``min_updates``), and frees the shards' state.
- ``stats()``: shards, ranges, per-shard peak RSS (KiB, the worker's VmHWM, reset when
  the round starts in it), cold starts and billed seconds of this round.
- ``close()`` drops the shards' state if no result was taken.
- ``selected``: after a Krum ``result()``, the chosen updates (indices in add order,
  best first), as ``strategy.robust.krum_select`` gives them.

Each shard is the Runtime function ``{prefix}.{function_memory_mb}mb.{i}`` with
``max_concurrency=1``, so all of a round's invocations of a shard reach one warm
worker, which keeps the round's matrix in its own memory (see ``_shard_handler``).
Names repeat across rounds: a later round reuses the warm workers. Concurrent rounds
on one runtime share them too (state is per round) but then share their memory cap:
give each a ``prefix``. A worker replaced mid-round (crash, keep-alive expiry) loses
its rows, and the round fails with an error that says so. Shards do their float64
sums with numpy (the arithmetic of ``strategy.fedavg``'s numpy kernel, bit-identical
to its numba one): loading numba would add ~130 MiB to every shard's footprint.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.aggregation._executor import BLAS_ENV
from strato.control.autoscaler import SHARD_OVERHEAD_MB, choose_shards
from strato.errors import ConfigError, LayoutError
from strato.services.runtime import FunctionSpec, Runtime
from strato.services.shm import ShmLease, ShmPool, ShmRef
from strato.strategy import make_strategy
from strato.strategy.robust import FedMedian, Krum, TrimmedMean, krum_select_from_distances

__all__ = ["HANDLER", "ShardedRound", "ShardedStats", "shard_ranges"]

HANDLER = "strato.aggregation._shard_handler:handle"
_MAX_BATCH = 512  # arrivals per invocation: keeps an event far below the payload limit


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each shard: sizes differ by at most one, the larger ones first."""
    if not 1 <= shards <= n:
        raise ConfigError(f"cannot split {n} coordinates into {shards} shards")
    base, extra = divmod(n, shards)
    ranges, lo = [], 0
    for i in range(shards):
        hi = lo + base + (1 if i < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


@dataclass(frozen=True)
class ShardedStats:
    shards: int
    ranges: tuple[tuple[int, int], ...]
    peak_rss_kb: tuple[int, ...]  # per shard: its worker's VmHWM during this round
    pids: tuple[tuple[int, ...], ...]  # per shard: the worker processes that served it
    updates: int
    refused: int
    function_memory_mb: int
    cold_starts: int
    billed_s: float

    @property
    def max_peak_rss_mb(self) -> float:
        """The largest shard's peak RSS, in MiB (the unit of ``function_memory_mb``)."""
        return max(self.peak_rss_kb, default=0) / 1024.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "ranges": [list(r) for r in self.ranges],
            "peak_rss_kb": list(self.peak_rss_kb),
            "max_peak_rss_mb": self.max_peak_rss_mb,
            "pids": [list(p) for p in self.pids],
            "updates": self.updates,
            "refused": self.refused,
            "function_memory_mb": self.function_memory_mb,
            "cold_starts": self.cold_starts,
            "billed_s": self.billed_s,
        }


@dataclass
class _Lane:
    function: str
    lo: int
    hi: int
    pending: list[dict[str, Any]] = field(default_factory=list)
    busy: bool = False
    error: BaseException | None = None
    peak_kb: int = 0
    pids: set[int] = field(default_factory=set)


def _as_ref(ref: Mapping[str, Any] | ShmRef | ShmLease) -> dict[str, Any]:
    if isinstance(ref, ShmLease):
        return ref.ref.to_dict()
    if isinstance(ref, ShmRef):
        return ref.to_dict()
    return dict(ref)


class ShardedRound:
    """One round of coordinate-sharded aggregation (see the module docstring)."""

    def __init__(
        self,
        runtime: Runtime,
        strategy_name: str,
        options: Mapping[str, Any] | None,
        n_params: int,
        updates_expected: int,
        shards: int | None = None,
        function_memory_mb: int = 1024,
        *,
        pool: ShmPool | None = None,
        prefix: str = "shard",
        overhead_mb: int = SHARD_OVERHEAD_MB,
        keep_alive_s: float = 300.0,
        timeout_s: float = 600.0,
    ) -> None:
        self.strategy = make_strategy(strategy_name, **dict(options or {}))
        if isinstance(self.strategy, FedMedian):
            self.op = "median"
        elif isinstance(self.strategy, TrimmedMean):
            self.op = "trimmed"
        elif isinstance(self.strategy, Krum):
            self.op = "krum"
        elif self.strategy.streaming:
            self.op = "mean"
        else:
            raise ConfigError(f"strategy {self.strategy.name} cannot be sharded")
        if n_params < 1 or updates_expected < 1:
            raise ConfigError(f"a sharded round needs n_params ≥ 1 and updates_expected ≥ 1, "
                              f"got {n_params} and {updates_expected}")
        if updates_expected < self.strategy.min_updates:
            raise ConfigError(f"{self.strategy.name} needs at least "
                              f"{self.strategy.min_updates} updates, the round expects "
                              f"{updates_expected}")
        self.n = int(n_params)
        self.k = int(updates_expected)
        self.function_memory_mb = int(function_memory_mb)
        rows_held = 2 if self.op == "mean" else self.k  # a float64 sum is two float32 rows
        fewest = choose_shards(rows_held, 4 * self.n, self.function_memory_mb,
                               overhead_mb=overhead_mb)
        if shards is None:
            shards = fewest
        elif shards < fewest:
            raise ConfigError(f"{shards} shards of {self.n} coordinates × {rows_held} rows "
                              f"do not fit function_memory_mb={self.function_memory_mb}; "
                              f"it takes at least {fewest}")
        self.timeout_s = timeout_s
        self.runtime = runtime
        self._token = secrets.token_hex(8)
        self._lanes = [_Lane(f"{prefix}.{self.function_memory_mb}mb.{i}", lo, hi)
                       for i, (lo, hi) in enumerate(shard_ranges(self.n, shards))]
        env = dict(BLAS_ENV)
        for lane in self._lanes:
            runtime.register(FunctionSpec(
                lane.function, HANDLER, timeout_s=timeout_s, max_concurrency=1,
                keep_alive_s=keep_alive_s, memory_mb=self.function_memory_mb,
                retries=0,  # a new worker would not have the rows: fail, do not retry
                env=env,
            ))
        self._baseline = {lane.function: runtime.stats(lane.function) for lane in self._lanes}
        self._own_pool = pool is None  # ours: the result and Krum's distances pass through it
        self.pool = ShmPool(max_idle_bytes=0) if pool is None else pool
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._clients: dict[str, int] = {}
        self._weights: list[float] = []
        self._refused = 0
        self._closing = False  # result() or close() began: no more adds
        self._result: npt.NDArray[np.float32] | None = None
        self._dropped = False
        self.selected: tuple[int, ...] | None = None  # Krum: the rows (add order) it chose

    @property
    def shards(self) -> int:
        return len(self._lanes)

    # ---- arrivals ---------------------------------------------------------------------

    def add(self, client: str, ref: Mapping[str, Any] | ShmRef | ShmLease,
            weight: float = 1.0) -> bool:
        """Queue one update for every shard and start the idle ones; False if refused."""
        item_ref = _as_ref(ref)
        if int(item_ref.get("nbytes", -1)) != 4 * self.n:
            raise LayoutError(f"update of {item_ref.get('nbytes')} bytes is not "
                              f"{self.n} float32 values")
        w = float(weight)
        if not (math.isfinite(w) and w > 0.0):
            raise ValueError(f"an update's weight must be a positive finite number, got {weight!r}")
        starts: list[tuple[_Lane, list[dict[str, Any]]]] = []
        with self._lock:
            if self._closing or client in self._clients or len(self._clients) >= self.k:
                self._refused += 1
                return False
            row = len(self._clients)
            self._clients[client] = row
            self._weights.append(w)
            for lane in self._lanes:
                if lane.error is not None:
                    continue  # the round has failed: result() raises that error
                lane.pending.append({"row": row, "weight": w, "ref": item_ref})
                if not lane.busy:
                    starts.append((lane, self._take(lane)))
        for lane, batch in starts:
            self._start(lane, batch)
        return True

    def _take(self, lane: _Lane) -> list[dict[str, Any]]:
        # caller holds the lock
        batch, lane.pending = lane.pending[:_MAX_BATCH], lane.pending[_MAX_BATCH:]
        lane.busy = True
        return batch

    def _start(self, lane: _Lane, batch: list[dict[str, Any]]) -> None:
        event = {"op": "add", "round": self._token, "mode": "sum" if self.op == "mean" else "rows",
                 "n": self.n, "lo": lane.lo, "hi": lane.hi, "k": self.k, "inputs": batch}
        try:
            future = self.runtime.invoke_async(lane.function, event)
        except BaseException as exc:  # refused at once (e.g. the runtime is closed)
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            future = failed
        future.add_done_callback(lambda done: self._added(lane, done))

    def _added(self, lane: _Lane, done: Future[Any]) -> None:
        error = done.exception()
        nxt: list[dict[str, Any]] | None = None
        with self._lock:
            lane.busy = False
            if error is not None:
                lane.error = lane.error or error
                lane.pending.clear()
            else:
                self._note(lane, done.result())
                if lane.pending and not self._dropped:
                    nxt = self._take(lane)
            self._idle.notify_all()
        if nxt is not None:
            self._start(lane, nxt)

    def _note(self, lane: _Lane, reply: Any) -> None:
        # caller holds the lock
        if isinstance(reply, Mapping):
            lane.peak_kb = max(lane.peak_kb, int(reply.get("hwm_kb", 0)))
            lane.pids.add(int(reply.get("pid", 0)))

    def _wait_adds(self, timeout: float | None) -> None:
        with self._idle:
            if not self._idle.wait_for(
                lambda: all(not lane.busy and not lane.pending for lane in self._lanes), timeout
            ):
                raise TimeoutError(f"shards still adding updates after {timeout} s")
            for lane in self._lanes:
                if lane.error is not None:
                    raise lane.error

    # ---- the close --------------------------------------------------------------------

    def result(self, timeout: float | None = None) -> npt.NDArray[np.float32]:
        """The strategy's reduce of the updates added, float32 ``[n_params]``."""
        if self._result is not None:
            return self._result
        with self._lock:
            self._closing = True
            count = len(self._clients)
            weights = list(self._weights)
        self._wait_adds(timeout)
        if count < max(1, self.strategy.min_updates):
            raise ConfigError(f"{self.strategy.name} needs at least "
                              f"{max(1, self.strategy.min_updates)} updates, {count} arrived")
        with self.pool.lease(4 * self.n) as out:
            if self.op == "krum":
                self._krum(out, count, weights, timeout)
            else:
                extra: dict[str, Any] = {"k": count}
                if self.op == "trimmed":
                    extra["beta"] = self.strategy.options()["beta"]
                self._call_all(self.op, out.ref, extra, timeout)
            view = np.frombuffer(out.buffer, dtype=np.float32, count=self.n)
            self._result = view.copy()
            del view  # no export may outlive the lease
        self._dropped = True
        return self._result

    def _krum(self, out: ShmLease, count: int, weights: list[float],
              timeout: float | None) -> None:
        f, m = int(self.strategy.options()["f"]), int(self.strategy.options()["m"])
        block = 8 * count * count
        with self.pool.lease(block * len(self._lanes)) as parts:
            refs = [parts.ref.sub(i * block, block) for i in range(len(self._lanes))]
            self._call_all("distances", None, {"k": count}, timeout, outs=refs)
            partial = np.frombuffer(parts.buffer, dtype=np.float64)
            dist = partial.reshape(len(self._lanes), count, count).sum(axis=0)
            del partial
        chosen = krum_select_from_distances(dist, f, m)
        self.selected = tuple(int(i) for i in chosen)
        if m == 1:
            select: dict[str, Any] = {"rows": [int(chosen[0])], "weights": None}
        else:
            rows = sorted(int(i) for i in chosen)  # strategy.robust averages in input order
            select = {"rows": rows, "weights": [weights[i] for i in rows]}
        self._call_all("select", out.ref, {"k": count, **select}, timeout)

    def _call_all(self, op: str, out: ShmRef | None, extra: Mapping[str, Any],
                  timeout: float | None, *, outs: list[ShmRef] | None = None) -> None:
        futures: list[Future[Any]] = []
        for i, lane in enumerate(self._lanes):
            if outs is not None:
                ref = outs[i]
            else:
                assert out is not None
                ref = out.sub(4 * lane.lo, 4 * (lane.hi - lane.lo))
            event = {"op": op, "round": self._token, "out": ref.to_dict(), **extra}
            futures.append(self.runtime.invoke_async(lane.function, event))
        _, pending = wait_all(futures, timeout=timeout)
        if pending:
            raise TimeoutError(f"shards still reducing ({op}) after {timeout} s")
        with self._lock:
            for lane, future in zip(self._lanes, futures, strict=True):
                if future.exception() is None:
                    self._note(lane, future.result())
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error

    # ---- accounting and clean-up --------------------------------------------------------

    def stats(self) -> ShardedStats:
        cold, billed = 0, 0.0
        for lane in self._lanes:
            now, before = self.runtime.stats(lane.function), self._baseline[lane.function]
            cold += now.cold_starts - before.cold_starts
            billed += now.billed_s - before.billed_s
        with self._lock:
            return ShardedStats(
                shards=len(self._lanes),
                ranges=tuple((lane.lo, lane.hi) for lane in self._lanes),
                peak_rss_kb=tuple(lane.peak_kb for lane in self._lanes),
                pids=tuple(tuple(sorted(lane.pids)) for lane in self._lanes),
                updates=len(self._clients),
                refused=self._refused,
                function_memory_mb=self.function_memory_mb,
                cold_starts=cold,
                billed_s=billed,
            )

    def close(self, timeout: float = 30.0) -> None:
        """Free the shards' state of this round (if no result took it) and our buffers."""
        with self._lock:
            self._closing = True
            for lane in self._lanes:
                lane.pending.clear()
            drop = not self._dropped
            self._dropped = True
        if drop:
            deadline = time.monotonic() + timeout
            with contextlib.suppress(Exception):  # closing anyway: the drop frees what was added
                self._wait_adds(timeout)
            futures = []
            for lane in self._lanes:
                try:
                    futures.append(self.runtime.invoke_async(
                        lane.function, {"op": "drop", "round": self._token}))
                except Exception:  # the runtime is closed: its workers are gone with the state
                    break
            wait_all(futures, timeout=max(0.0, deadline - time.monotonic()))
        if self._own_pool:
            self.pool.close()

    def __enter__(self) -> ShardedRound:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
