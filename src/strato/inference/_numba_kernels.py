"""Numba kernels of one layer, neuron-major: ``Z = Wt @ A`` with the challenge epilogue.

``Wt`` is the transposed weight slice (output neuron × input neuron, CSR, sorted
indices), ``A`` the input activations (input neuron × image). Every kernel sums each
output entry over the input neurons in ascending order, exactly as scipy's CSR
product does, and leaves out entries whose sum is exactly zero (as scipy does): the
results are bit-identical to the scipy oracle. No ``fastmath``: contracting into FMAs
would change the rounding.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["compact_columns", "csr_to_dense", "dense_layer", "dense_to_csr", "sparse_layer"]


@njit(cache=True, nogil=True)
def sparse_layer(  # type: ignore[no-untyped-def]  # numba-compiled
    wt_indptr, wt_indices, wt_data, a_indptr, a_indices, a_data, ncols, bias, clip
):
    """Gustavson SpGEMM with fused ``min(clip, max(0, z + bias))`` on nonzero sums."""
    nrows = wt_indptr.size - 1
    acc = np.zeros(ncols, dtype=np.float32)
    mark = np.full(ncols, -1, dtype=np.int64)
    touched = np.empty(ncols, dtype=np.int64)
    cap = max(1024, 4 * a_indices.size)
    out_indptr = np.zeros(nrows + 1, dtype=np.int64)
    out_indices = np.empty(cap, dtype=np.int32)
    out_data = np.empty(cap, dtype=np.float32)
    nnz = 0
    for j in range(nrows):
        ntouched = 0
        for p in range(wt_indptr[j], wt_indptr[j + 1]):
            i = wt_indices[p]
            w = wt_data[p]
            for q in range(a_indptr[i], a_indptr[i + 1]):
                k = a_indices[q]
                if mark[k] != j:
                    mark[k] = j
                    acc[k] = w * a_data[q]
                    touched[ntouched] = k
                    ntouched += 1
                else:
                    acc[k] += w * a_data[q]
        if nnz + ntouched > cap:
            cap = max(2 * cap, nnz + ntouched)
            grown_i = np.empty(cap, dtype=np.int32)
            grown_d = np.empty(cap, dtype=np.float32)
            grown_i[:nnz] = out_indices[:nnz]
            grown_d[:nnz] = out_data[:nnz]
            out_indices, out_data = grown_i, grown_d
        for t in range(ntouched):
            k = touched[t]
            s = acc[k]
            if s != 0.0:
                v = s + bias
                if v > 0.0:
                    out_indices[nnz] = k
                    out_data[nnz] = v if v < clip else clip
                    nnz += 1
        out_indptr[j + 1] = nnz
    return out_indptr, out_indices[:nnz].copy(), out_data[:nnz].copy()


@njit(cache=True, nogil=True)
def dense_layer(wt_indptr, wt_indices, wt_data, a, bias, clip, out):  # type: ignore[no-untyped-def]  # numba-compiled
    """``out = epilogue(Wt @ a)`` for dense ``a`` (input neuron × live image)."""
    nrows = wt_indptr.size - 1
    m = a.shape[1]
    for j in range(nrows):
        row = out[j]
        row[:] = 0.0
        for p in range(wt_indptr[j], wt_indptr[j + 1]):
            w = wt_data[p]
            src = a[wt_indices[p]]
            for k in range(m):
                row[k] += w * src[k]
        for k in range(m):
            s = row[k]
            if s != 0.0:
                v = s + bias
                row[k] = 0.0 if v <= 0.0 else (v if v < clip else clip)


@njit(cache=True, nogil=True)
def compact_columns(indices, ncols):  # type: ignore[no-untyped-def]  # numba-compiled
    """Sorted distinct column ids present, and the map global column → compact index."""
    seen = np.zeros(ncols, dtype=np.bool_)
    for k in indices:
        seen[k] = True
    cols = np.flatnonzero(seen)
    remap = np.full(ncols, -1, dtype=np.int64)
    for c in range(cols.size):
        remap[cols[c]] = c
    return cols, remap


@njit(cache=True, nogil=True)
def csr_to_dense(indptr, indices, data, remap, out):  # type: ignore[no-untyped-def]  # numba-compiled
    """Scatter CSR rows into ``out`` (rows × compact columns), zeroing first."""
    out[:] = 0.0
    for r in range(indptr.size - 1):
        for p in range(indptr[r], indptr[r + 1]):
            out[r, remap[indices[p]]] = data[p]


@njit(cache=True, nogil=True)
def dense_to_csr(dense, cols):  # type: ignore[no-untyped-def]  # numba-compiled
    """CSR (global column ids) of the nonzeros of ``dense`` (rows × compact columns)."""
    nrows, m = dense.shape
    nnz = 0
    for r in range(nrows):
        for k in range(m):
            if dense[r, k] != 0.0:
                nnz += 1
    indptr = np.zeros(nrows + 1, dtype=np.int64)
    indices = np.empty(nnz, dtype=np.int32)
    data = np.empty(nnz, dtype=np.float32)
    n = 0
    for r in range(nrows):
        for k in range(m):
            v = dense[r, k]
            if v != 0.0:
                indices[n] = cols[k]
                data[n] = v
                n += 1
        indptr[r + 1] = n
    return indptr, indices, data
