"""FedAvg as a streaming weighted accumulator whose partial sums merge.

An ``Accumulator`` holds ``Σ w_i · x_i`` (float64), ``Σ w_i`` and the number of
updates. Updates are added as they arrive (eager aggregation); two accumulators
merge by adding their sums, so any tree of aggregators (leaf → middle → top) ends
with exactly the flat weighted mean, whatever the grouping and the order.

A partial travels between aggregator functions as plain bytes (``Partial``); its
byte format is ``strato.codec.partials`` (re-exported here).

Precision and speed (the choice; numbers for 100 updates × 10M on the 2-core VM):

- The running sum is float64. A float32 running sum cannot meet "any tree of
  partials equals the flat float64 weighted mean within 1e-6 relative error": with
  mixed signs a float32 sum cancels catastrophically, and its error grows with the
  number of updates (the property test catches a float32 accumulator). Merging
  float64 partials adds no rounding of note; the one float32 rounding is
  ``result()``.
- The float32 → float64 conversion is fused into the multiply-add loop (numba, see
  ``_kernels``): no float64 copy of an update, no temporary per update.
- ``add`` reads the update (4 bytes/value) and reads and writes the float64 sum (16):
  about the cost of float32 ``saxpy``. ``add_many`` adds up to 8 updates per pass
  with each block of the sum held in cache, so the traffic approaches one read of
  each update, as ``weights @ stacked`` does: feed it everything that has arrived.
  ``threads=2`` splits the vector into two ranges; they run on two cores when the
  caller installs a runner (``_kernels.set_runner``: this layer starts no threads),
  else one after the other (one core reaches about half of this VM's memory
  bandwidth). Measured with the VM shared (load ~10): the BLAS floor ``w @ S``
  0.46 s; ``add_many`` 0.85 s (all 100 at once) to 1.0 s (10 at a time); ``add`` one
  at a time 1.6 s; float32 BLAS ``saxpy`` one at a time 1.25 s.
- Buffers are allocated once: ``reset()`` zeroes the sum in place for the next round
  (rewriting warm memory is ~10× cheaper than faulting in a fresh allocation here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.codec.partials import PARTIAL_HEADER_SIZE, Partial
from strato.errors import LayoutError
from strato.strategy import _kernels
from strato.strategy._base import Strategy, check_stack

__all__ = ["PARTIAL_HEADER_SIZE", "Accumulator", "FedAvg", "Partial", "all_finite", "weighted_mean"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

all_finite = _kernels.all_finite


def _check_weight(weight: float) -> float:
    w = float(weight)
    if not (math.isfinite(w) and w > 0.0):
        raise ValueError(f"an update's weight must be a positive finite number, got {weight!r}")
    return w


def _as_update(update: npt.ArrayLike, n: int) -> npt.NDArray[Any]:
    x = np.asarray(update)
    if x.dtype not in (np.float32, np.float64):
        raise LayoutError(f"an update must be float32 or float64, got {x.dtype}")
    if x.ndim != 1:
        x = x.reshape(-1)
    if x.shape[0] != n:
        raise LayoutError(f"update has {x.shape[0]} values but the model has {n}")
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    if x.dtype.byteorder == ">":
        x = x.astype(x.dtype.newbyteorder("<"))
    return x


class Accumulator:
    """Streaming weighted sum of updates of ``n`` values; merges with other partials.

    ``add``/``add_many`` take float32 (or float64) 1-D arrays, including read-only
    views of shared memory; nothing is kept of them after the call returns.
    ``threads`` > 1 splits each add into that many ranges, run in parallel by the
    runner a caller installs (``_kernels.set_runner``; the kernels release the GIL),
    else in order.
    """

    __slots__ = ("_count", "_sum", "_threads", "_weight")

    def __init__(self, n: int, *, threads: int = 1) -> None:
        if n < 0:
            raise ValueError(f"an accumulator needs n ≥ 0 values, got {n}")
        if threads < 1:
            raise ValueError(f"threads must be ≥ 1, got {threads}")
        self._sum: F64 = np.zeros(int(n), dtype=np.float64)
        self._threads = int(threads)
        self._weight = 0.0
        self._count = 0

    @property
    def n(self) -> int:
        return int(self._sum.shape[0])

    @property
    def weight(self) -> float:
        return self._weight

    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> F64:
        """The running float64 sum (a read-only view)."""
        view = self._sum.view()
        view.flags.writeable = False
        return view

    def add(self, update: npt.ArrayLike, weight: float) -> None:
        """Add ``weight · update``."""
        w = _check_weight(weight)
        _kernels.axpy(self._sum, _as_update(update, self.n), w, self._threads)
        self._weight += w
        self._count += 1

    def add_many(self, updates: Sequence[npt.ArrayLike], weights: Sequence[float]) -> None:
        """Add a batch in one pass over the accumulator (faster than ``add`` in a loop).

        Rows of a 2-D array count as updates too: ``add_many(stacked, weights)``.
        """
        if len(updates) != len(weights):
            raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
        ws = [_check_weight(w) for w in weights]
        xs = [_as_update(u, self.n) for u in updates]
        _kernels.axpy_many(self._sum, xs, ws, self._threads)
        self._weight += math.fsum(ws)
        self._count += len(xs)

    def merge(self, other: Accumulator | Partial) -> None:
        """Fold another accumulator's (or a received partial's) sums into this one."""
        part = other.to_partial() if isinstance(other, Accumulator) else other
        if part.n != self.n:
            raise LayoutError(f"cannot merge a partial of {part.n} values into one of {self.n}")
        np.add(self._sum, part.sum, out=self._sum)
        self._weight += part.weight
        self._count += part.count

    def result(self, out: F32 | None = None) -> F32:
        """The weighted mean Σ w·x / Σ w as float32 (into ``out`` when given)."""
        if self._count == 0 or self._weight <= 0.0:
            raise ValueError("the accumulator holds no updates")
        if out is None:
            out = np.empty(self.n, dtype=np.float32)
        elif out.shape != (self.n,) or out.dtype != np.float32:
            raise LayoutError(f"result buffer must be float32[{self.n}], "
                              f"got {out.dtype}{list(out.shape)}")
        # Divide in float64, round to float32 once (numpy casts in small buffers).
        np.divide(self._sum, np.float64(self._weight), out=out, casting="same_kind")
        return out

    def reset(self) -> None:
        """Empty the accumulator for the next round, keeping its buffer."""
        self._sum.fill(0.0)
        self._weight = 0.0
        self._count = 0

    def to_partial(self) -> Partial:
        """This accumulator as plain data; ``sum`` is a read-only view until the next add."""
        return Partial(self.sum, self._weight, self._count)

    @classmethod
    def from_partial(cls, partial: Partial) -> Accumulator:
        """A new accumulator holding a copy of ``partial`` (ready for more adds or merges)."""
        acc = cls(partial.n)
        acc.merge(partial)
        return acc


def weighted_mean(
    stacked: npt.ArrayLike, weights: npt.ArrayLike, out: F32 | None = None, *, threads: int = 1
) -> F32:
    """Σ w_k · S[k] / Σ w_k of ``K`` updates stacked in a ``(K, n)`` array, float64-exact.

    The batch form of the accumulator (same kernel, same rounding): unlike a float32
    ``weights @ stacked`` it meets the 1e-6 relative bound whatever the signs.
    """
    stack = np.asarray(stacked)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if stack.ndim != 2:
        raise LayoutError(f"weighted_mean needs a (K, n) array, got shape {stack.shape}")
    if stack.shape[0] != w.shape[0]:
        raise ValueError(f"{stack.shape[0]} updates but {w.shape[0]} weights")
    acc = Accumulator(stack.shape[1], threads=threads)
    acc.add_many(list(stack), w.tolist())
    return acc.result(out)


class FedAvg(Strategy):
    """McMahan et al. 2017: the new global model is the weighted mean of the updates."""

    name = "fedavg"
    streaming = True

    def reduce(self, updates: npt.ArrayLike, weights: npt.ArrayLike) -> F32:
        stack, w = check_stack(updates, weights, self.min_updates, self.name)
        return weighted_mean(stack, w)
