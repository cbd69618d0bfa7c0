"""The shard aggregator function: one coordinate range of every update of a round.

Runs as a Runtime function (``strato.aggregation._shard_handler:handle``), one
function per shard with ``max_concurrency=1``, so every invocation of a shard reaches
its one warm worker. Unlike the LIFL aggregator (``_handler``), a shard keeps state
between invocations, in its own process memory: for each open round, a ``K × S``
float32 matrix of its slice ``[lo, hi)`` of every update (median, trimmed mean,
Krum), or a float64 running weighted sum of the slice (mean). Events:

    {"op": "add", "round": token, "mode": "rows"|"sum", "n": n, "lo": lo, "hi": hi,
     "k": K, "inputs": [{"row": r, "weight": w, "ref": {"shm"|"path", "offset", "nbytes"}}]}
    {"op": "median" | "trimmed" (+ "beta") | "mean", "round", "k": rows used, "out": ref}
    {"op": "distances", "round", "k", "out": ref}     # K × K float64 partial; keeps the round
    {"op": "select", "round", "k", "rows": [...], "weights": [...] | null, "out": ref}
    {"op": "drop", "round"}

Every reply is ``{"rows": rows held, "hwm_kb": peak RSS, "pid": pid}``. A round's
state is made by its first ``add`` (the high-water mark is reset then, so ``hwm_kb``
is this round's peak when the worker serves one round at a time) and freed by the
op that writes its result, or by ``drop``. Adding row ``r`` twice is harmless (an
at-least-once redelivery): the matrix row is rewritten, the sum skips it.

Memory (what ``control.autoscaler.choose_shards`` budgets): inputs are mapped where
they lie and only their slice is read; after the copy, those pages are dropped from
this process (``madvise(MADV_DONTNEED)``: the data stays in its file or segment), and
so are the output's pages after each chunk is written. The reductions walk the slice
in column chunks whose copies stay under ``SHARD_SCRATCH_MB``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.aggregation._handler import peak_rss_kb
from strato.aggregation._inputs import attach_input
from strato.control.autoscaler import SHARD_SCRATCH_MB
from strato.errors import LayoutError, StratoError
from strato.strategy import robust

__all__ = ["chunk_columns", "handle"]

_MAX_CHUNK = 1 << 16
_BLOCK = 8192  # float64 values per multiply-add step: 64 KiB of scratch, in L2
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _libc_madvise() -> Any:
    if _MADV_DONTNEED is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def chunk_columns(rows: int) -> int:
    """Columns per reduction chunk: ``16 × (rows + 1)`` bytes each stay under the scratch."""
    return max(1, min(_MAX_CHUNK, (SHARD_SCRATCH_MB << 20) // (16 * (rows + 1))))


def _evict(view: npt.NDArray[Any]) -> None:
    """Drop the whole pages of a *mapped* (file or shared-memory) view from our RSS.

    Only for views of shared file mappings: there the data stays in the file or the
    segment and a later read faults it back in; on private memory it would be lost.
    Rounded inwards, so no byte outside the view is touched.
    """
    if _madvise is None or view.nbytes == 0:
        return
    start = int(view.ctypes.data)
    first = -(-start // _PAGE) * _PAGE
    last = (start + view.nbytes) // _PAGE * _PAGE
    if last > first:
        _madvise(first, last - first, _MADV_DONTNEED)


def _reset_peak() -> None:
    # "5" resets VmHWM to the current RSS (Linux ≥ 4.0): the peak is then this round's.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass
class _Shard:
    mode: str
    n: int
    lo: int
    hi: int
    k: int
    matrix: npt.NDArray[np.float32] | None = None
    acc: npt.NDArray[np.float64] | None = None
    weights: dict[int, float] = field(default_factory=dict)
    filled: set[int] = field(default_factory=set)

    @property
    def width(self) -> int:
        return self.hi - self.lo


_ROUNDS: dict[str, _Shard] = {}
_LOCK = threading.Lock()


def _open(event: Mapping[str, Any]) -> _Shard:
    token = str(event["round"])
    with _LOCK:
        shard = _ROUNDS.get(token)
        if shard is not None:
            return shard
        mode, n, lo, hi, k = (str(event["mode"]), int(event["n"]), int(event["lo"]),
                              int(event["hi"]), int(event["k"]))
        if not 0 <= lo < hi <= n or k < 1 or mode not in ("rows", "sum"):
            raise LayoutError(f"bad shard [{lo}, {hi}) of {n} values, {k} rows, mode {mode!r}")
        if not _ROUNDS:
            _reset_peak()
        shard = _Shard(mode, n, lo, hi, k)
        if mode == "rows":
            # np.empty: pages are faulted in row by row as updates arrive
            shard.matrix = np.empty((k, hi - lo), dtype=np.float32)
        else:
            shard.acc = np.zeros(hi - lo, dtype=np.float64)
        _ROUNDS[token] = shard
        return shard


def _get(event: Mapping[str, Any]) -> _Shard:
    shard = _ROUNDS.get(str(event["round"]))
    if shard is None:
        raise StratoError(
            f"shard state of round {event['round']} is not in worker {os.getpid()}: its "
            "worker was replaced mid-round (crash or keep-alive expiry), or it was dropped"
        )
    return shard


def _slice(shard: _Shard, ref: Mapping[str, Any]) -> npt.NDArray[np.float32]:
    view = attach_input(ref)
    if view.nbytes != 4 * shard.n:
        raise LayoutError(f"an update of {view.nbytes} bytes is not {shard.n} float32 values")
    return np.frombuffer(view, dtype=np.float32, count=shard.width, offset=4 * shard.lo)


def _add(shard: _Shard, inputs: Sequence[Mapping[str, Any]]) -> None:
    for item in inputs:
        row = int(item["row"])
        if not 0 <= row < shard.k:
            raise LayoutError(f"row {row} is outside this round's {shard.k} rows")
        if shard.matrix is not None:
            x = _slice(shard, item["ref"])
            shard.matrix[row] = x
            _evict(x)
        elif shard.acc is not None and row not in shard.filled:
            x = _slice(shard, item["ref"])
            shard.weights[row] = _axpy(shard.acc, x, item["weight"])
            _evict(x)
        shard.filled.add(row)


def _axpy(acc: npt.NDArray[np.float64], x: npt.NDArray[Any], weight: Any) -> float:
    """``acc += w · x`` in float64: ``strategy.fedavg``'s arithmetic (its numpy kernel,
    bit-identical to the numba one), without loading numba (~130 MiB per process)."""
    w = float(weight)
    if not (math.isfinite(w) and w > 0.0):
        raise ValueError(f"an update's weight must be a positive finite number, got {weight!r}")
    w64 = np.float64(w)  # not a Python float: NEP 50 would multiply float32 in float32
    scratch = np.empty(min(acc.shape[0], _BLOCK), dtype=np.float64)
    for a in range(0, acc.shape[0], _BLOCK):
        b = min(acc.shape[0], a + _BLOCK)
        s = scratch[: b - a]
        np.multiply(x[a:b], w64, out=s)
        np.add(acc[a:b], s, out=acc[a:b])
    return w


def _out(shard: _Shard, ref: Mapping[str, Any], dtype: Any, count: int) -> npt.NDArray[Any]:
    view = attach_input(ref)
    out = np.frombuffer(view, dtype=dtype)
    if out.shape[0] != count or not out.flags.writeable:
        raise LayoutError(f"output buffer holds {out.shape[0]} {np.dtype(dtype)}, not {count}")
    return out


def _used_rows(shard: _Shard, k: int) -> npt.NDArray[np.float32]:
    if shard.matrix is None:
        raise StratoError("this round keeps a running sum, not the updates")
    missing = sorted(set(range(k)) - shard.filled)
    if missing:
        raise StratoError(f"shard [{shard.lo}, {shard.hi}) is missing rows {missing[:8]} "
                          f"of {k}: its worker lost them mid-round")
    return shard.matrix[:k]


def _chunks(width: int, rows: int) -> list[tuple[int, int]]:
    step = chunk_columns(rows)
    return [(a, min(width, a + step)) for a in range(0, width, step)]


def _median(rows: npt.NDArray[np.float32], out: npt.NDArray[np.float32]) -> None:
    for a, b in _chunks(rows.shape[1], rows.shape[0]):
        # A transposed copy makes each coordinate's K values contiguous for the
        # partition (twice as fast as partitioning strided columns); np.median is
        # the same arithmetic on the same values, so it equals np.median(stack, 0).
        lanes = np.ascontiguousarray(rows[:, a:b].T)
        out[a:b] = np.median(lanes, axis=1, overwrite_input=True)
        _evict(out[a:b])


def _trimmed(rows: npt.NDArray[np.float32], beta: float, out: npt.NDArray[np.float32]) -> None:
    for a, b in _chunks(rows.shape[1], rows.shape[0]):
        out[a:b] = robust.trimmed_mean(rows[:, a:b], beta)
        _evict(out[a:b])


def _distances(rows: npt.NDArray[np.float32], out: npt.NDArray[np.float64]) -> None:
    k = rows.shape[0]
    total = np.zeros((k, k), dtype=np.float64)
    for a, b in _chunks(rows.shape[1], k):
        total += robust.pairwise_sq_distances(rows[:, a:b])
    out[:] = total.reshape(-1)


def _select(
    rows: npt.NDArray[np.float32], chosen: Sequence[int], weights: Sequence[float] | None,
    out: npt.NDArray[np.float32],
) -> None:
    if not chosen or not all(0 <= i < rows.shape[0] for i in chosen):
        raise LayoutError(f"cannot select rows {list(chosen)} of {rows.shape[0]}")
    total = None if weights is None else np.float64(math.fsum(weights))
    for a, b in _chunks(rows.shape[1], len(chosen)):
        if weights is None or total is None:  # Krum: the one chosen update itself
            out[a:b] = rows[chosen[0], a:b]
        else:  # multi-Krum: the weighted mean of the chosen, as strategy.robust does
            acc = np.zeros(b - a, dtype=np.float64)
            for i, w in zip(chosen, weights, strict=True):
                _axpy(acc, rows[i, a:b], w)
            np.divide(acc, total, out=out[a:b], casting="same_kind")
        _evict(out[a:b])


def _mean(shard: _Shard, out: npt.NDArray[np.float32]) -> None:
    if shard.acc is None or not shard.weights:
        raise StratoError(f"shard [{shard.lo}, {shard.hi}) holds no running sum to average")
    weight = np.float64(math.fsum(shard.weights.values()))  # as Accumulator.add_many sums
    for a, b in _chunks(shard.width, 1):
        # Accumulator.result's arithmetic (divide in float64, round once), a chunk at a time
        np.divide(shard.acc[a:b], weight, out=out[a:b], casting="same_kind")
        _evict(out[a:b])


def handle(event: Mapping[str, Any], ctx: Any = None) -> dict[str, Any]:
    op = str(event.get("op"))
    token = str(event.get("round"))
    if op == "add":
        shard = _open(event)
        _add(shard, event.get("inputs", ()))
    elif op == "drop":
        with _LOCK:
            shard_or_none = _ROUNDS.pop(token, None)
        return _reply(0 if shard_or_none is None else len(shard_or_none.filled))
    else:
        shard = _get(event)
        keep = op == "distances"
        if op == "median":
            rows = _used_rows(shard, int(event["k"]))
            _median(rows, _out(shard, event["out"], np.float32, shard.width))
        elif op == "trimmed":
            rows = _used_rows(shard, int(event["k"]))
            out = _out(shard, event["out"], np.float32, shard.width)
            _trimmed(rows, float(event["beta"]), out)
        elif op == "distances":
            k = int(event["k"])
            _distances(_used_rows(shard, k), _out(shard, event["out"], np.float64, k * k))
        elif op == "select":
            rows = _used_rows(shard, int(event["k"]))
            weights = event.get("weights")
            _select(rows, [int(i) for i in event["rows"]],
                    None if weights is None else [float(w) for w in weights],
                    _out(shard, event["out"], np.float32, shard.width))
        elif op == "mean":
            _mean(shard, _out(shard, event["out"], np.float32, shard.width))
        else:
            raise StratoError(f"unknown shard operation {op!r}")
        if not keep:
            with _LOCK:
                _ROUNDS.pop(token, None)
    return _reply(len(shard.filled))


def _reply(rows: int) -> dict[str, Any]:
    return {"rows": rows, "hwm_kb": peak_rss_kb(), "pid": os.getpid()}
