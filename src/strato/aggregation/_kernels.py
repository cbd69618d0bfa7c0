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

import threading
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
    check: bool = False,
) -> list[int]:
    """``acc = (0 if fresh else acc) + Σ c·x``; then ``out = acc·scale`` (or ``acc *= scale``).

    With ``check``, inputs holding NaN or ±Inf are left out of the sum (found in the same
    pass that adds, by ``add_f32_checked``); returns their indices (empty: all clean)."""
    _check(acc, inputs, out)
    if check and inputs and all(x.dtype == np.float32 for x, _ in inputs):
        kernel = _checked()
        if kernel is not None:
            return _accumulate_checked(kernel, acc, inputs, fresh, scale, out)
    bad: list[int] = []
    if check:  # the fallbacks look at each input first: a second pass, numba-less only
        bad = [i for i, (x, _) in enumerate(inputs) if not np.isfinite(x).all()]
        inputs = [pair for i, pair in enumerate(inputs) if i not in bad]
    if acc.dtype == np.float32:
        _accumulate32(acc, inputs, fresh, scale, out, chunk or CHUNK)
    else:
        _accumulate64(acc, inputs, fresh, scale, out, chunk or CHUNK64)
    return bad


BLOCK_CHECKED = 1 << 14  # values per block of the checked kernel: 64-128 KiB, in L2


def _checked() -> Any:
    if "checked" not in _FUSED:
        kernel: Any = None
        try:
            from strato.aggregation._numba_kernels import add_checked

            kernel = add_checked
        except ImportError:
            pass
        _FUSED["checked"] = kernel
    return _FUSED["checked"]


def _accumulate_checked(
    kernel: Any, acc: Vector, inputs: Sequence[tuple[Vector, float]], fresh: bool,
    scale: float | None, out: Vector | None,
) -> list[int]:
    from strato.strategy._kernels import _readonly as readonly

    key = acc.dtype.str
    scratch: Vector | None = getattr(_SCRATCH, key, None)
    if scratch is None:  # one per thread: a node runs several aggregators on threads
        scratch = np.empty(BLOCK_CHECKED, dtype=acc.dtype)
        setattr(_SCRATCH, key, scratch)
    first_bad = np.empty(MAX_INPUTS, dtype=np.int64)
    bad: list[int] = []
    groups = [list(range(i, min(i + MAX_INPUTS, len(inputs))))
              for i in range(0, len(inputs), MAX_INPUTS)]
    for g, group in enumerate(groups):
        xs = [readonly(inputs[i][0]) for i in group]
        slots = tuple(xs + [xs[0]] * (MAX_INPUTS - len(xs)))
        coefs = np.zeros(MAX_INPUTS, dtype=np.float64)
        coefs[: len(group)] = [inputs[i][1] for i in group]
        last = g == len(groups) - 1
        factor = 1.0 if scale is None or not last else float(scale)
        write_out = out is not None and last
        bits = tuple(x.view(np.uint32) for x in slots)
        target = out if out is not None else acc
        if kernel(acc, slots, bits, coefs, len(group), fresh and g == 0, factor, scratch,
                  first_bad, target, write_out):
            for k, i in enumerate(group):
                if first_bad[k] < 0:
                    continue
                bad.append(i)
                stop = int(first_bad[k])
                if not stop:
                    continue
                # take back what it added before its first bad block
                x, coef = inputs[i]
                if write_out:
                    assert out is not None
                    acc[:stop] -= acc.dtype.type(coef) * x[:stop]
                    np.multiply(acc[:stop], factor, out=out[:stop], casting="same_kind")
                else:
                    acc[:stop] -= acc.dtype.type(factor * coef) * x[:stop]
    return bad


_SCRATCH = threading.local()


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
