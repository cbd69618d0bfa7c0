"""The arithmetic of aggregation: weighted sums into a reused accumulator.

``accumulate`` adds a small batch of inputs (updates or partials, each with its
coefficient) into an accumulator in one pass over memory. The model is cut into
chunks: while every input of the batch is added into one chunk of the accumulator,
that chunk stays in the core's L2 cache, so memory sees each input read once and
the accumulator read and written once per *batch* rather than once per input (what
``weights @ stacked`` achieves, without stacking). A fresh accumulator (the first
call of a round) is zeroed chunk by chunk just before its first adds, and the root's
final ``scale`` (1 / total weight) is applied to each chunk while it is in cache —
into the float32 model buffer ``out`` when one is given.

Two accumulator precisions:

- ``float32``: with numba, one fused pass per batch of up to eight inputs
  (``_numba_kernels.add_f32``: no chunks, no Python per chunk; 0.9-1.07 of ``w @ S``);
  without it, BLAS ``saxpy`` at an offset per chunk (0.78). The fastest; its rounding
  error grows like ``n · eps32`` of the magnitude of the terms, which is what float32
  FedAvg implementations (Flower, PyTorch) accept.
- ``float64``: ``strategy._kernels.axpy_many`` (a fused float32 → float64
  multiply-add): partial sums of any tree equal the flat float64 weighted mean to
  1e-6 relative error even when signs cancel — the guarantee of ``strategy.fedavg``.

BLAS must run single-threaded here: parallelism comes from running several
aggregators at once, and OpenBLAS's own threads on small level-1 calls cost far
more than they save on these 2-core machines (measured: 10× slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.errors import LayoutError

__all__ = ["CHUNK", "DTYPES", "accumulate", "warm_up"]

MAX_INPUTS = 8  # inputs per pass of the fused float32 kernel (see _numba_kernels)

CHUNK = 1 << 16  # float32 elements: 256 KiB, so a batch of inputs + acc chunk fits L2
# float64: axpy_many blocks for the cache itself; bigger chunks amortize its per-call
# set-up (a typed list of the batch), and 8 MiB stays in L3 for the fused zero/scale.
CHUNK64 = 1 << 20
DTYPES: dict[str, np.dtype[Any]] = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}

Vector = npt.NDArray[Any]


def _check(acc: Vector, inputs: Sequence[tuple[Vector, float]], out: Vector | None) -> None:
    if acc.dtype not in (np.float32, np.float64) or acc.ndim != 1:
        raise LayoutError(f"LIFL accumulates into 1-D float32/float64 buffers, got {acc.dtype}")
    if not (acc.flags.c_contiguous and acc.flags.writeable):
        raise LayoutError("the accumulator must be a writable contiguous buffer")
    n = acc.shape[0]
    for x, _ in inputs:
        bad_type = x.dtype != acc.dtype if acc.dtype == np.float32 else x.dtype.kind != "f"
        if bad_type or x.shape != acc.shape or not x.flags.c_contiguous:
            raise LayoutError(
                f"input of {x.dtype}{list(x.shape)} cannot add into {acc.dtype}[{n}]"
            )
    if out is not None and (out.shape != acc.shape or not out.flags.writeable):
        raise LayoutError(f"the output buffer must be a writable [{n}] array")


def accumulate(
    acc: Vector,
    inputs: Sequence[tuple[Vector, float]],
    *,
    fresh: bool,
    scale: float | None = None,
    out: Vector | None = None,
    chunk: int | None = None,
) -> None:
    """``acc = (0 if fresh else acc) + Σ c·x``; then ``out = acc·scale`` (or ``acc *= scale``)."""
    _check(acc, inputs, out)
    if acc.dtype == np.float32:
        _accumulate32(acc, inputs, fresh, scale, out, chunk or CHUNK)
    else:
        _accumulate64(acc, inputs, fresh, scale, out, chunk or CHUNK64)


def _fused32() -> Any:
    """numba's one-pass float32 kernel, or None without numba (then BLAS saxpy)."""
    if "fused" not in _FUSED:
        kernel: Any = None
        try:
            from strato.aggregation._numba_kernels import add_f32

            kernel = add_f32
        except ImportError:
            pass
        _FUSED["fused"] = kernel
    return _FUSED["fused"]


_FUSED: dict[str, Any] = {}


def _accumulate32(
    acc: Vector, inputs: Sequence[tuple[Vector, float]], fresh: bool,
    scale: float | None, out: Vector | None, chunk: int,
) -> None:
    fused = _fused32() if out is None else None
    if fused is not None:
        _accumulate32_fused(fused, acc, inputs, fresh, scale)
        return
    from scipy.linalg import blas  # imported on first use: keeps a cold start lean

    n = acc.shape[0]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        overwrite = fresh
        for x, coef in inputs:
            if overwrite:  # the first input of a round writes, it does not add to zeros
                np.multiply(x[start:stop], np.float32(coef), out=acc[start:stop])
                overwrite = False
            else:
                blas.saxpy(x, acc, n=stop - start, a=coef, offx=start, offy=start)
        if overwrite:
            acc[start:stop] = 0
        _finish_chunk(acc, start, stop, scale, out)


def _accumulate32_fused(
    fused: Any, acc: Vector, inputs: Sequence[tuple[Vector, float]], fresh: bool,
    scale: float | None,
) -> None:
    """Up to eight inputs per pass over memory; the last pass also scales."""
    # read-only views: numba then compiles one signature whatever memory comes in
    from strato.strategy._kernels import _readonly as readonly

    if not inputs:  # nothing to add: a fresh accumulator is zero, the root may scale
        if fresh:
            acc[:] = 0
        if scale is not None:
            acc *= acc.dtype.type(scale)
        return
    groups = [inputs[i : i + MAX_INPUTS] for i in range(0, len(inputs), MAX_INPUTS)]
    for g, group in enumerate(groups):
        xs = [readonly(x) for x, _ in group]
        slots = xs + [xs[0]] * (MAX_INPUTS - len(xs))
        coefs = np.zeros(MAX_INPUTS, dtype=np.float64)
        coefs[: len(group)] = [c for _, c in group]
        last = g == len(groups) - 1
        factor = 1.0 if scale is None or not last else float(scale)
        fused(acc, *slots, coefs, len(group), fresh and g == 0, factor)


def _accumulate64(
    acc: Vector, inputs: Sequence[tuple[Vector, float]], fresh: bool,
    scale: float | None, out: Vector | None, chunk: int,
) -> None:
    from strato.strategy._kernels import axpy_many

    n = acc.shape[0]
    coefs = [float(c) for _, c in inputs]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        if fresh:
            acc[start:stop] = 0
        if inputs:
            axpy_many(acc[start:stop], [x[start:stop] for x, _ in inputs], coefs)
        _finish_chunk(acc, start, stop, scale, out)


def _finish_chunk(
    acc: Vector, start: int, stop: int, scale: float | None, out: Vector | None
) -> None:
    if out is not None:
        factor = 1.0 if scale is None else scale
        np.multiply(acc[start:stop], factor, out=out[start:stop], casting="same_kind")
    elif scale is not None:
        acc[start:stop] *= acc.dtype.type(scale)


def warm_up() -> None:
    """Load BLAS and the compiled float64 kernels for every input mix a round uses
    (updates and partials, one or a batch), so that happens in a cold start's init,
    not inside the first invocation's billed time."""
    for acc_type in (np.float32, np.float64):
        acc = np.zeros(8, acc_type)
        for x_type in {np.float32, acc_type}:
            xs = [np.ones(8, x_type), np.ones(8, x_type)]
            accumulate(acc, [(xs[0], 1.0)], fresh=True)
            accumulate(acc, [(x, 1.0) for x in xs], fresh=False, scale=0.5)
        accumulate(acc, [], fresh=False, scale=1.0, out=np.zeros(8, np.float32))
