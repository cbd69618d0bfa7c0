"""Strato's numba kernels: every compiled weighted sum lives here (imported only when
numba is used).

- ``axpy_one`` / ``axpy_batch`` / ``finite_scan`` serve ``strategy._kernels`` (the
  float64 ``Accumulator``). Each takes a ``[lo, hi)`` range so that threads can split
  one call. No ``fastmath``: without fused multiply-add they round exactly like the
  numpy fallback (multiply, then add), which the tests check bit for bit.
- ``add_checked`` serves the aggregation engine's leaves and root
  (``aggregation._kernels``): a batch of float32 inputs added into a float32 or
  float64 accumulator with NaN/±Inf refused in the same pass over memory.

Compiled on first call and cached on disk next to this file (``cache=True``), so a
new process loads machine code instead of compiling.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

__all__ = ["MAX_INPUTS", "add_checked", "axpy_batch", "axpy_one", "finite_scan"]


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


MAX_INPUTS = 8  # inputs per call of ``add_checked``: unused slots are never read


# reassoc: the sum of squares vectorises (its order is fixed at compile time: the same
# input always gives the same distance).
@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc", "contract"})
def _sq_dist(y: Any, r: Any) -> float:
    """``Σ (y_i − r_i)²`` in float64 over one block (in L1: the add just read it)."""
    s = 0.0
    for i in range(y.shape[0]):
        e = np.float64(y[i]) - np.float64(r[i])
        s += e * e
    return s


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"contract"})
def add_checked(acc: Any, xs: Any, w: Any, count: int, fresh: bool, scale: float,
                scratch: Any, first_bad: Any, out: Any, write_out: bool,
                ref: Any, dist: Any) -> int:
    """``acc = (0 if fresh else acc) + Σ_{j<count} w[j]·x_j``, leaving out every input that
    holds a NaN or ±Inf; then ``acc *= scale``, or with ``write_out`` (the root's float32
    model beside a float64 accumulator) ``out = acc · scale``. Returns the number of
    bad inputs; ``first_bad[j]`` is the offset of input j's first bad block (-1: clean).
    The caller takes a bad input's contribution to the blocks before that one back out.
    With ``dist`` of length 8 (else length 0: not asked), ``dist[j] += ‖x_j − ref‖²``
    for each clean input, block by block while the block is in L1: the update's
    distance to the round's model (the norm bound's measure) costs no extra pass over
    memory, only ``ref``'s block read once per call.

    ``xs`` is a tuple of eight float32 arrays (slots past ``count`` are never read);
    ``acc`` and ``scratch`` are float32 or float64 (numba compiles each); the model is
    walked in blocks of ``scratch.shape[0]`` values (512: in L1 with eight inputs).
    Each block is one pass over memory:

    - one input (what a leaf sees when updates come one at a time): the accumulator's
      old block is kept in ``scratch`` while the new sum is written, and the input's
      finiteness (``v - v != 0`` only for NaN/±Inf) is tested in that same loop;
    - several: added into the block in place (inputs four, two or one at a time, each
      a branch-free loop), the first loop keeping the old block in ``scratch``; the
      sum's finiteness stands for the inputs' (a NaN or ±Inf input makes it
      non-finite).

    A block found bad (rare: an attacker's or a broken client's update) is restored and
    each input is tested on its own; the clean ones are added one by one. Into
    float64, per input as a multiple of a single-threaded BLAS ``saxpy``
    (``benchmarks/accumulator_memory.py``, 10M values): one 1.79, two 1.05, four 0.70;
    summing into ``scratch`` and copying it into the block when clean, as this kernel
    did before, two cost 2.00 and four 1.50 (a loop testing ``count`` per value,
    before that: 3.9 for two).
    ``contract`` lets LLVM fuse multiply-adds; there is no ``nnan``/``ninf``, so the
    ``v - v`` test is not folded away.
    """
    n = acc.shape[0]
    block = scratch.shape[0]
    zero = acc.dtype.type(0.0)
    x0 = xs[0]
    t = acc.dtype.type
    w0 = t(w[0])
    sc = t(scale)
    bad_inputs = 0
    want_dist = dist.shape[0] > 0
    for j in range(first_bad.shape[0]):
        first_bad[j] = -1
    for start in range(0, n, block):
        m = min(block, n - start)
        a = acc[start : start + m]
        sk = scratch[:m]
        bad = False
        if bad_inputs == 0 and count == 1:
            y0 = x0[start : start + m]
            if fresh:
                for i in range(m):
                    v = y0[i]
                    a[i] = w0 * v
                    bad |= (v - v) != 0
            else:
                for i in range(m):
                    v = y0[i]
                    old = a[i]
                    sk[i] = old
                    a[i] = old + w0 * v
                    bad |= (v - v) != 0
        elif bad_inputs == 0:
            # Inputs four, two or one at a time over the block (in L1): each inner
            # loop is branch-free, so LLVM vectorises it whatever ``count`` is (a loop
            # testing ``count`` per value vectorised only at eight inputs: two inputs
            # cost 3.9 saxpys each, now 1.05). Per value the same operations in the
            # same order as one input after another. The first group's loop also
            # keeps the block's old values in ``scratch`` (the careful path below
            # starts again from them), so a clean block costs that loop, one per
            # further group and the test: no copy in and out of ``scratch``.
            j = 0
            while j < count:
                if count - j >= 4:
                    y0, y1 = xs[j][start : start + m], xs[j + 1][start : start + m]
                    y2, y3 = xs[j + 2][start : start + m], xs[j + 3][start : start + m]
                    v0, v1, v2, v3 = t(w[j]), t(w[j + 1]), t(w[j + 2]), t(w[j + 3])
                    if j > 0:
                        for i in range(m):
                            a[i] = a[i] + v0 * y0[i] + v1 * y1[i] + v2 * y2[i] + v3 * y3[i]
                    elif fresh:
                        for i in range(m):
                            a[i] = zero + v0 * y0[i] + v1 * y1[i] + v2 * y2[i] + v3 * y3[i]
                    else:
                        for i in range(m):
                            old = a[i]
                            sk[i] = old
                            a[i] = old + v0 * y0[i] + v1 * y1[i] + v2 * y2[i] + v3 * y3[i]
                    j += 4
                elif count - j >= 2:
                    y0, y1 = xs[j][start : start + m], xs[j + 1][start : start + m]
                    v0, v1 = t(w[j]), t(w[j + 1])
                    if j > 0:
                        for i in range(m):
                            a[i] = a[i] + v0 * y0[i] + v1 * y1[i]
                    elif fresh:
                        for i in range(m):
                            a[i] = zero + v0 * y0[i] + v1 * y1[i]
                    else:
                        for i in range(m):
                            old = a[i]
                            sk[i] = old
                            a[i] = old + v0 * y0[i] + v1 * y1[i]
                    j += 2
                else:  # (j > 0: one input alone takes the branch above)
                    y0, v0 = xs[j][start : start + m], t(w[j])
                    for i in range(m):
                        a[i] = a[i] + v0 * y0[i]
                    j += 1
            for i in range(m):
                bad |= (a[i] - a[i]) != 0
        else:  # an input was bad in an earlier block: take the careful path to the end
            bad = True
            for i in range(m):
                sk[i] = a[i]
        if bad:
            for j in range(count):
                if first_bad[j] >= 0:
                    continue
                yj = xs[j][start : start + m]
                found = False
                for i in range(m):
                    found |= (yj[i] - yj[i]) != 0
                if found:
                    first_bad[j] = start
                    bad_inputs += 1
            for i in range(m):
                a[i] = zero if fresh else sk[i]
            for j in range(count):
                if first_bad[j] >= 0:
                    continue
                yj = xs[j][start : start + m]
                wj = t(w[j])
                for i in range(m):
                    a[i] += wj * yj[i]
        if want_dist:
            r = ref[start : start + m]
            for j in range(count):
                if first_bad[j] < 0:
                    dist[j] += _sq_dist(xs[j][start : start + m], r)
        if write_out:
            o = out[start : start + m]
            for i in range(m):
                o[i] = a[i] * sc
        elif scale != 1.0:
            for i in range(m):
                a[i] *= sc
    return bad_inputs
