"""The arithmetic of aggregation: weighted sums into a reused accumulator.

``accumulate`` adds a small batch of inputs (updates or partials, each with its
coefficient) into an accumulator. A fresh accumulator (the first call of a round)
is written, not zeroed and then added to, and the root's final ``scale`` (1 / total
weight) is applied while each block is in cache — into the float32 model buffer
``out`` when one is given.

With numba (the normal case), float32 inputs go through one kernel,
``strategy._numba_kernels.add_checked``, whatever the accumulator's precision: one
pass over memory per batch of up to eight inputs (each input read once, the
accumulator read and written once), NaN/±Inf inputs found (and, with ``check``,
left out) in that same pass. Into a float64 accumulator, per update as a multiple of one
single-threaded BLAS ``saxpy`` over it (10M values; ``benchmarks/accumulator_memory.py``):
one update per pass 1.8×, four at once 0.7× each (the accumulator's traffic shared by
the four).

- ``float32`` accumulator: the fastest; its rounding error grows like ``n · eps32``
  of the magnitude of the terms, which is what float32 FedAvg implementations
  (Flower, PyTorch) accept; the model's last bits depend on the arrival order.
- ``float64``: partial sums of any tree equal the flat float64 weighted mean to 1e-6
  relative error even when signs cancel, so any arrival order gives the same model
  (to float32 rounding of one exact sum). The run's default (``[aggregation]
  accumulator``): a rerun or a resumed run reproduces a run.

Without numba: chunked BLAS ``saxpy`` (float32) or ``strategy._kernels.axpy_many``
(float64), with a separate finiteness pass when checking. Float64 inputs (partials)
always take ``axpy_many``.

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

MAX_INPUTS = 8  # inputs per call of the fused kernel (strategy._numba_kernels.MAX_INPUTS)

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
    ref: Vector | None = None,
    dist: npt.NDArray[np.float64] | None = None,
) -> list[int]:
    """``acc = (0 if fresh else acc) + Σ c·x``; then ``out = acc·scale`` (or ``acc *= scale``).

    With ``check``, inputs holding NaN or ±Inf are left out of the sum (found in the
    same pass that adds); returns their indices (empty: all clean). Without it, such an
    input is added like any other (its NaN reaches the sum). ``chunk`` sets the chunk
    of the numba-less fallbacks. With ``ref`` (a float32 vector, the round's model),
    ``dist[i]`` gets ``‖x_i − ref‖²`` (in the same pass with numba; a second read of
    each input in the fallbacks), NaN for an input left out."""
    _check(acc, inputs, out)
    want = ref is not None and dist is not None
    if want:
        assert ref is not None and dist is not None
        if ref.shape != acc.shape or dist.shape != (len(inputs),):
            raise LayoutError(f"a distance reference of {ref.shape} or {dist.shape} slots "
                              f"does not fit {len(inputs)} inputs of {acc.shape}")
        dist[:] = 0.0
    kernel = _fused()
    if kernel is not None and inputs and all(x.dtype == np.float32 for x, _ in inputs) and (
        not want or (ref is not None and ref.dtype == np.float32)
    ):
        found = _accumulate_fused(kernel, acc, inputs, fresh, scale, out,
                                  ref if want else None, dist if want else None)
        if want:
            assert dist is not None
            dist[found] = np.nan
        if found and not check:  # asked for the plain sum: what was left out goes in
            factor = 1.0 if scale is None else float(scale)
            for i in found:
                x, coef = inputs[i]
                acc += acc.dtype.type(coef * factor) * x
            if out is not None:
                np.multiply(acc, factor, out=out, casting="same_kind")
            return []
        return found
    bad: list[int] = []
    if check:  # the fallbacks look at each input first: a second pass
        bad = [i for i, (x, _) in enumerate(inputs) if not np.isfinite(x).all()]
    if want:  # and measure each one: another
        assert ref is not None and dist is not None
        for i, (x, _) in enumerate(inputs):
            dist[i] = np.nan if i in bad else _sq_dist(x, ref, chunk or CHUNK)
    if check:
        inputs = [pair for i, pair in enumerate(inputs) if i not in bad]
    if acc.dtype == np.float32:
        _accumulate32(acc, inputs, fresh, scale, out, chunk or CHUNK)
    else:
        _accumulate64(acc, inputs, fresh, scale, out, chunk or CHUNK64)
    return bad


BLOCK_FUSED = 512  # values per block of the fused kernel: eight inputs + scratch in L1

_SCRATCH = threading.local()
_NO_DIST = np.empty(0, dtype=np.float64)  # the kernel's "no distances asked"
_FUSED: dict[str, Any] = {}


def _fused() -> Any:
    """numba's fused kernel, or None without numba or when the numpy backend was chosen
    (``strategy._kernels.set_backend``, ``STRATO_KERNELS=numpy``)."""
    from strato.strategy import _kernels as strategy_kernels

    name = strategy_kernels.backend()
    if name not in _FUSED:
        kernel: Any = None
        if name == "numba":
            from strato.strategy._numba_kernels import add_checked

            kernel = add_checked
        _FUSED[name] = kernel
    return _FUSED[name]


def _sq_dist(x: Vector, ref: Vector, chunk: int) -> float:
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        d = x[start : start + chunk].astype(np.float64) - ref[start : start + chunk]
        total += float(np.dot(d, d))
    return total


def _accumulate_fused(
    kernel: Any, acc: Vector, inputs: Sequence[tuple[Vector, float]], fresh: bool,
    scale: float | None, out: Vector | None, ref: Vector | None = None,
    dist: npt.NDArray[np.float64] | None = None,
) -> list[int]:
    """Up to eight inputs per call; the last call also scales. Returns the inputs found
    non-finite, their contribution taken back out."""
    from strato.strategy._kernels import _readonly as readonly

    key = acc.dtype.str
    scratch: Vector | None = getattr(_SCRATCH, key, None)
    if scratch is None:  # one per thread: a node runs several aggregators on threads
        scratch = np.empty(BLOCK_FUSED, dtype=acc.dtype)
        setattr(_SCRATCH, key, scratch)
    first_bad = np.empty(MAX_INPUTS, dtype=np.int64)
    bad: list[int] = []
    groups = [list(range(i, min(i + MAX_INPUTS, len(inputs))))
              for i in range(0, len(inputs), MAX_INPUTS)]
    for g, group in enumerate(groups):
        # read-only views: numba then compiles one signature whatever memory comes in
        xs = [readonly(inputs[i][0]) for i in group]
        slots = tuple(xs + [xs[0]] * (MAX_INPUTS - len(xs)))
        coefs = np.zeros(MAX_INPUTS, dtype=np.float64)
        coefs[: len(group)] = [inputs[i][1] for i in group]
        last = g == len(groups) - 1
        factor = 1.0 if scale is None or not last else float(scale)
        write_out = out is not None and last
        target = out if out is not None else acc
        group_dist = _NO_DIST if dist is None else np.zeros(MAX_INPUTS, dtype=np.float64)
        found = kernel(acc, slots, coefs, len(group), fresh and g == 0, factor, scratch,
                       first_bad, target, write_out, xs[0] if ref is None else readonly(ref),
                       group_dist)
        if dist is not None:
            dist[group[0] : group[-1] + 1] = group_dist[: len(group)]
        if not found:
            continue
        for k, i in enumerate(group):
            stop = int(first_bad[k])
            if stop < 0:
                continue
            bad.append(i)
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


def _accumulate32(
    acc: Vector, inputs: Sequence[tuple[Vector, float]], fresh: bool,
    scale: float | None, out: Vector | None, chunk: int,
) -> None:
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
