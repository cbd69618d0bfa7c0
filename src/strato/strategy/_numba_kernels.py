"""The numba kernels behind ``_kernels`` (imported only when numba is used).

Compiled on first call and cached on disk next to this file (``cache=True``), so a
new process loads machine code instead of compiling. Every kernel takes a
``[lo, hi)`` range so that threads can split one call. No ``fastmath`` on the
accumulation kernels: without fused multiply-add they round exactly like the numpy
fallback (multiply, then add), which the tests check bit for bit.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

__all__ = ["axpy_batch", "axpy_one", "finite_scan"]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def axpy_one(acc: Any, x: Any, w: float, lo: int, hi: int) -> None:
    """``acc[lo:hi] += w · x[lo:hi]``, converting each value to float64 in registers."""
    # Loop over slices from 0: with range(lo, hi) numba must handle negative indices,
    # and that branch keeps LLVM from vectorising the loop.
    a = acc[lo:hi]
    y = x[lo:hi]
    for i in range(a.shape[0]):
        a[i] += w * np.float64(y[i])


@numba.njit(cache=True, nogil=True, boundscheck=False)
def axpy_batch(acc: Any, x0: Any, x1: Any, x2: Any, x3: Any, x4: Any, x5: Any, x6: Any,
               x7: Any, ws: Any, count: int, block: int, lo: int, hi: int) -> None:
    """``acc += Σ_{j<count} ws[j] · x_j`` over ``[lo, hi)``, block by block.

    The block of ``acc`` stays in cache while each update of the batch is added to it,
    so ``acc`` crosses the memory bus once per batch instead of once per update.
    Updates come as separate arguments, not a numba typed List: building a typed List
    compiles its methods in every new process (~1 s of cold start).
    """
    for start in range(lo, hi, block):
        stop = min(hi, start + block)
        axpy_one(acc, x0, ws[0], start, stop)
        if count > 1:
            axpy_one(acc, x1, ws[1], start, stop)
        if count > 2:
            axpy_one(acc, x2, ws[2], start, stop)
        if count > 3:
            axpy_one(acc, x3, ws[3], start, stop)
        if count > 4:
            axpy_one(acc, x4, ws[4], start, stop)
        if count > 5:
            axpy_one(acc, x5, ws[5], start, stop)
        if count > 6:
            axpy_one(acc, x6, ws[6], start, stop)
        if count > 7:
            axpy_one(acc, x7, ws[7], start, stop)


# reassoc only (not nnan/ninf): lets LLVM vectorise the sum, NaN still propagates.
@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc"})
def finite_scan(x: Any, block: int) -> bool:
    """False as soon as a block of ``x`` holds a NaN or ±Inf."""
    # x - x is 0 for finite x and NaN for NaN/Inf: summing it needs no data-dependent
    # branch per element, and we stop at the first bad block.
    n = x.shape[0]
    for lo in range(0, n, block):
        s = x[lo] - x[lo]
        for i in range(lo + 1, min(n, lo + block)):
            s += x[i] - x[i]
        if s != 0:
            return False
    return True
