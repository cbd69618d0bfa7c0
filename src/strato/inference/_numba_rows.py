"""Numba helpers of the activation exchange: row de-duplication, packing, gather.

``row_hashes`` + ``dedup_rows`` find identical rows of a CSR matrix (used on the
weights, to find neurons that compute identical activations); equality is checked
value for value after the hash matches, so a hash collision costs time, never
correctness. ``pack_rows`` / ``unpack_rows`` are the block layout of ``_wire``;
``gather_rows`` builds the next layer's input in one pass.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "dedup_rows",
    "expand_columns",
    "gather_rows",
    "pack_rows",
    "row_hashes",
    "unpack_rows",
]

_FNV_OFFSET = np.uint64(14695981039346656037)
_FNV_PRIME = np.uint64(1099511628211)


@njit(cache=True, nogil=True)
def row_hashes(indptr, indices, data):  # type: ignore[no-untyped-def]  # numba-compiled
    """FNV-1a of every row's length, column ids and value bits (uint64 per row)."""
    n = indptr.size - 1
    bits = data.view(np.uint32)
    out = np.empty(n, dtype=np.uint64)
    for r in range(n):
        h = _FNV_OFFSET ^ np.uint64(indptr[r + 1] - indptr[r])
        for p in range(indptr[r], indptr[r + 1]):
            h = (h ^ np.uint64(indices[p])) * _FNV_PRIME
            h = (h ^ np.uint64(bits[p])) * _FNV_PRIME
        out[r] = h
    return out


@njit(cache=True, nogil=True)
def _rows_equal(indptr, indices, bits, r, s):  # type: ignore[no-untyped-def]  # numba-compiled
    a0, a1, b0 = indptr[r], indptr[r + 1], indptr[s]
    if a1 - a0 != indptr[s + 1] - b0:
        return False
    for k in range(a1 - a0):
        if indices[a0 + k] != indices[b0 + k] or bits[a0 + k] != bits[b0 + k]:
            return False
    return True


@njit(cache=True, nogil=True)
def dedup_rows(indptr, indices, data, rows, hashes):  # type: ignore[no-untyped-def]  # numba-compiled
    """Distinct rows among ``rows``: (``ref``, ``uniq``) with row ``rows[i]`` equal to
    row ``uniq[ref[i]]``; ``uniq`` in order of first appearance."""
    m = rows.size
    bits = data.view(np.uint32)
    size = 1
    while size < 2 * m:
        size *= 2
    slots = np.full(size, -1, dtype=np.int64)
    ref = np.empty(m, dtype=np.uint32)
    uniq = np.empty(m, dtype=np.int64)
    nu = 0
    for i in range(m):
        r = rows[i]
        h = hashes[r]
        s = np.int64(h & np.uint64(size - 1))
        while True:
            u = slots[s]
            if u == -1:
                slots[s] = nu
                uniq[nu] = r
                ref[i] = nu
                nu += 1
                break
            ru = uniq[u]
            if hashes[ru] == h and _rows_equal(indptr, indices, bits, r, ru):
                ref[i] = u
                break
            s = (s + 1) & (size - 1)
    return ref, uniq[:nu].copy()


@njit(cache=True, nogil=True)
def pack_rows(indptr, indices, data, rows):  # type: ignore[no-untyped-def]  # numba-compiled
    """Row lengths (uint32), column ids delta-coded within each row (uint32) and
    values (float32) of ``rows``, concatenated, each row in ascending column order.

    The sparse kernel leaves a row's columns in first-touch order, the dense one
    sorted; sorting here makes a block's bytes independent of the path that computed
    it (the cost model predicts them from a sample, which may take the other path)
    and keeps the deltas small. Column order within a row changes no sum."""
    m = rows.size
    lengths = np.empty(m, dtype=np.uint32)
    total = 0
    for i in range(m):
        n = indptr[rows[i] + 1] - indptr[rows[i]]
        lengths[i] = n
        total += n
    deltas = np.empty(total, dtype=np.uint32)
    values = np.empty(total, dtype=np.float32)
    o = 0
    for i in range(m):
        start, stop = indptr[rows[i]], indptr[rows[i] + 1]
        ordered = True
        for p in range(start + 1, stop):
            if indices[p] < indices[p - 1]:
                ordered = False
                break
        if ordered:
            take = np.arange(start, stop)
        else:
            take = start + np.argsort(indices[start:stop], kind="mergesort")
        prev = 0
        for p in take:
            deltas[o] = np.uint32(indices[p] - prev)
            values[o] = data[p]
            prev = indices[p]
            o += 1
    return lengths, deltas, values


@njit(cache=True, nogil=True)
def unpack_rows(lengths, deltas):  # type: ignore[no-untyped-def]  # numba-compiled
    """CSR ``indptr`` (int64) and column ids (int32) from ``pack_rows``' lengths and deltas."""
    m = lengths.size
    indptr = np.zeros(m + 1, dtype=np.int64)
    cols = np.empty(deltas.size, dtype=np.int32)
    o = 0
    for i in range(m):
        c = np.uint32(0)
        for _ in range(lengths[i]):
            c = np.uint32(c + deltas[o])
            cols[o] = np.int32(c)
            o += 1
        indptr[i + 1] = o
    return indptr, cols


@njit(cache=True, nogil=True)
def gather_rows(  # type: ignore[no-untyped-def]  # numba-compiled
    src, row, a_indptr, a_indices, a_data, b_indptr, b_indices, b_data
):
    """CSR whose row ``i`` is row ``row[i]`` of matrix A (``src[i] == 0``) or of B
    (``src[i] == 1``): one pass, one copy of every entry."""
    m = src.size
    indptr = np.zeros(m + 1, dtype=np.int64)
    for i in range(m):
        if src[i] == 0:
            n = a_indptr[row[i] + 1] - a_indptr[row[i]]
        else:
            n = b_indptr[row[i] + 1] - b_indptr[row[i]]
        indptr[i + 1] = indptr[i] + n
    indices = np.empty(indptr[m], dtype=np.int32)
    data = np.empty(indptr[m], dtype=np.float32)
    for i in range(m):
        o = indptr[i]
        if src[i] == 0:
            s0, s1 = a_indptr[row[i]], a_indptr[row[i] + 1]
            indices[o : o + s1 - s0] = a_indices[s0:s1]
            data[o : o + s1 - s0] = a_data[s0:s1]
        else:
            s0, s1 = b_indptr[row[i]], b_indptr[row[i] + 1]
            indices[o : o + s1 - s0] = b_indices[s0:s1]
            data[o : o + s1 - s0] = b_data[s0:s1]
    return indptr, indices, data


@njit(cache=True, nogil=True)
def expand_columns(indptr, indices, data, newcol, width):  # type: ignore[no-untyped-def]  # numba-compiled
    """Rows of a sample (columns = sampled images) widened to ``width`` columns: sample
    column ``c`` reappears at every ``newcol[t, c] >= 0``. Columns of each output row
    sorted. Used by the cost model to compress blocks at their full size."""
    n = indptr.size - 1
    copies = newcol.shape[0]
    out_indptr = np.zeros(n + 1, dtype=np.int64)
    for r in range(n):
        k = 0
        for p in range(indptr[r], indptr[r + 1]):
            for t in range(copies):
                if newcol[t, indices[p]] >= 0:
                    k += 1
        out_indptr[r + 1] = out_indptr[r] + k
    out_indices = np.empty(out_indptr[n], dtype=np.int32)
    out_data = np.empty(out_indptr[n], dtype=np.float32)
    for r in range(n):
        o0 = out_indptr[r]
        m = out_indptr[r + 1] - o0
        cols = np.empty(m, dtype=np.int64)
        vals = np.empty(m, dtype=np.float32)
        k = 0
        for p in range(indptr[r], indptr[r + 1]):
            for t in range(copies):
                c = newcol[t, indices[p]]
                if c >= 0:
                    cols[k] = c
                    vals[k] = data[p]
                    k += 1
        order = np.argsort(cols)
        for i in range(m):
            out_indices[o0 + i] = cols[order[i]]
            out_data[o0 + i] = vals[order[i]]
    return out_indptr, out_indices, out_data
