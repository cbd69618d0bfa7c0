"""The hot loops of aggregation: ``acc += w · x`` with float32 ``x`` and a float64 ``acc``.

Two interchangeable backends compute bit-identical results:

- ``numba`` (used when numba imports; kernels in ``_numba_kernels``): one fused loop
  converts each float32 value to float64, multiplies and adds in registers, so an
  update is read once; ``axpy_many`` walks the vector in cache-sized blocks and adds
  up to ``BATCH`` updates to a block while it sits in cache, so the float64
  accumulator crosses the memory bus once per batch. Compiled on first use and
  cached on disk: a new process loads machine code (numba import plus load: ~1 s
  on this busy VM), it does not compile.
- ``numpy`` (the fallback): the same block order with ``np.multiply`` into a small
  float64 scratch and ``np.add`` into the accumulator: no temporaries of model size
  and no start-up cost, but 3-4 GB/s instead of memory bandwidth.

Why float64 at all, and what it costs: see ``fedavg``'s docstring.

Neither backend uses fused multiply-add (numba is compiled without ``fastmath``, and
numpy multiplies then adds), which is what makes them bit-identical.

``set_backend("numpy")`` forces the fallback (tests run both; the ``strato`` command
does it for ``STRATO_KERNELS=numpy``: this module reads no environment).

Pure computation: no threads of its own. An add with ``threads`` > 1 is split into
block-aligned ranges; the ranges run one after the other on the calling thread unless
the caller that owns threads installed a runner (``set_runner``) that runs them at
once (the kernels release the GIL, so threads add memory bandwidth). Either way the
bits are the same: each range of the accumulator is added to in the same order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BATCH",
    "BLOCK",
    "Runner",
    "all_finite",
    "axpy",
    "axpy_many",
    "backend",
    "set_backend",
    "set_runner",
]

F64 = npt.NDArray[np.float64]

# Elements per block: 8192 float64 accumulator values are 64 KiB, resident in L2
# while every update of a batch is added to them.
BLOCK = 8192
# Updates per pass over the accumulator in ``axpy_many``: with 8 the float64
# accumulator traffic (16 bytes/value) is 2 bytes per value per update, against the
# 4 bytes of reading the float32 update itself.
BATCH = 8

# Runs the tasks of one split add (each a range of the vector) and returns when all
# are done; the first task may run on the calling thread.
Runner = Callable[[Sequence[Callable[[], None]]], None]

_state: dict[str, Any] = {"name": None, "numba": None, "runner": None}


def _compile_numba() -> dict[str, Any]:
    # Imported lazily: numba costs 0.2-0.5 s to import, only paid by processes that
    # aggregate. The kernels live at module level there, because numba's disk cache
    # misses (and recompiles, every process) for jitted closures calling each other.
    from strato.strategy import _numba_kernels as nk

    return {"one": nk.axpy_one, "batch": nk.axpy_batch, "finite": nk.finite_scan}


def backend() -> str:
    """The backend in use: ``numba`` or ``numpy`` (decided on first call: numba when it
    imports, unless ``set_backend`` chose before)."""
    name = _state["name"]
    if name is None:
        set_backend("numba", strict=False)
        name = _state["name"]
    return str(name)


def set_backend(name: str, *, strict: bool = True) -> None:
    """Select ``numba`` or ``numpy``; without numba, ``strict=False`` falls back quietly."""
    if name not in ("numba", "numpy"):
        raise ValueError(f"unknown kernel backend {name!r} (numba, numpy)")
    if name == "numba" and _state["numba"] is None:
        try:
            _state["numba"] = _compile_numba()
        except ImportError:
            if strict:
                raise
            name = "numpy"
    _state["name"] = name


def _readonly(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    # numba types read-only and writable arrays differently; giving it read-only
    # views always means one compiled signature whatever the caller's memory is.
    if x.flags.writeable:
        x = x.view()
        x.flags.writeable = False
    return x


def _ranges(n: int, threads: int) -> list[tuple[int, int]]:
    """Split [0, n) into up to ``threads`` block-aligned ranges (at least 16 blocks each)."""
    parts = max(1, min(threads, n // (16 * BLOCK)))
    step = -(-n // parts)
    step = -(-step // BLOCK) * BLOCK
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def set_runner(runner: Runner | None) -> Runner | None:
    """Install what runs the ranges of a split add (None: in order, on the calling
    thread); returns the runner it replaces."""
    previous: Runner | None = _state["runner"]
    _state["runner"] = runner
    return previous


def _run(task: Callable[[int, int], None], n: int, threads: int) -> None:
    ranges = _ranges(n, threads)
    runner: Runner | None = _state["runner"]
    if len(ranges) == 1 or runner is None:
        for lo, hi in ranges:
            task(lo, hi)
        return
    runner([functools.partial(task, lo, hi) for lo, hi in ranges])


def axpy(acc: F64, x: npt.NDArray[Any], w: float, threads: int = 1) -> None:
    """``acc += w · x`` in float64; ``x`` is 1-D contiguous float32 or float64."""
    axpy_many(acc, [x], [w], threads)


def axpy_many(
    acc: F64, xs: Sequence[npt.NDArray[Any]], ws: Sequence[float], threads: int = 1
) -> None:
    """``acc += Σ w_j · x_j``, adding in the order given, one pass over ``acc``."""
    if not xs:
        return
    n = acc.shape[0]
    if backend() == "numpy":
        weights = [np.float64(w) for w in ws]
        _run(lambda lo, hi: _numpy_axpy_many(acc, xs, weights, lo, hi), n, threads)
        return
    kernels = _state["numba"]
    groups = _groups([_readonly(x) for x in xs], np.asarray(ws, dtype=np.float64))

    def task(lo: int, hi: int) -> None:
        for group, gw in groups:
            if len(group) == 1:
                kernels["one"](acc, group[0], float(gw[0]), lo, hi)
                continue
            slots = group + [group[0]] * (BATCH - len(group))  # unused slots are never read
            padded = np.zeros(BATCH, dtype=np.float64)
            padded[: len(group)] = gw
            kernels["batch"](acc, *slots, padded, len(group), BLOCK, lo, hi)

    _run(task, n, threads)


def _groups(
    views: list[npt.NDArray[Any]], weights: npt.NDArray[np.float64]
) -> list[tuple[list[npt.NDArray[Any]], npt.NDArray[np.float64]]]:
    """Consecutive runs of one dtype, at most BATCH long, in the given order."""
    out = []
    start = 0
    while start < len(views):
        stop = start + 1
        while (stop < len(views) and stop - start < BATCH
               and views[stop].dtype == views[start].dtype):
            stop += 1
        out.append((views[start:stop], weights[start:stop]))
        start = stop
    return out


def _numpy_axpy_many(
    acc: F64, xs: Sequence[npt.NDArray[Any]], weights: Sequence[np.float64], lo: int, hi: int
) -> None:
    # Weights are np.float64, not Python floats: under NEP 50 a Python float is a
    # "weak" scalar and float32 · 0.3 would be computed in float32.
    scratch = np.empty(min(hi - lo, BLOCK), dtype=np.float64)
    for start in range(lo, hi, BLOCK):
        stop = min(hi, start + BLOCK)
        a, s = acc[start:stop], scratch[: stop - start]
        for x, w in zip(xs, weights, strict=True):
            np.multiply(x[start:stop], w, out=s)
            np.add(a, s, out=a)


def all_finite(x: npt.NDArray[Any]) -> bool:
    """True when no element of the 1-D array ``x`` is NaN or ±Inf (no temporaries)."""
    if x.size == 0:
        return True
    if backend() == "numba":
        return bool(_state["numba"]["finite"](_readonly(x), BLOCK))
    # A float64 sum of float32 values cannot overflow, so it is finite exactly when
    # every element is; numpy casts in small buffers, nothing model-sized is allocated.
    if x.dtype == np.float32:
        return bool(np.isfinite(np.add.reduce(x, dtype=np.float64)))
    return all(bool(np.isfinite(x[lo : lo + BLOCK]).all()) for lo in range(0, x.shape[0], BLOCK))
