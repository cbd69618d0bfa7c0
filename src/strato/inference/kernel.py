"""The workers' per-layer kernel, neuron-major: ``A_out = epilogue(Wt @ A_in)``.

Rows of ``A`` are neurons and columns images, so the activation rows a worker sends
are rows of a CSR matrix (cheap to slice). Two paths, chosen per layer by density:

- sparse: a fused Gustavson SpGEMM (numba), for the first layers where 60,000
  images each light ~100 neurons;
- dense: once the surviving images have saturated (FIELD-NOTES: live rows become
  fully dense, dead ones stay dead), the live columns are packed into a dense block
  and each output row is a contiguous axpy over it, which vectorises.

Measured on 1024×120 with 60,000 inputs (benchmarks/inference.py --kernels):
see docs/inference.md. Both paths are bit-identical to the scipy oracle.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from strato.inference import _numba_kernels as nk
from strato.inference.network import CLIP

__all__ = ["DENSE_THRESHOLD", "apply_layer", "release_scratch", "run_local", "transposed_layers"]

# Use the dense path when the live block is at least this full: measured on 1024×120,
# the dense path already wins at ~9% (layer 1) and by 3× at 20–30% (layers 2–5).
DENSE_THRESHOLD = 0.08
# ...and when both dense blocks fit in this many bytes (16384 neurons × 60,000 live
# images would be 4 GB: such layers take the sparse path).
DENSE_MAX_BYTES = 768 * 1024 * 1024


class _Scratch:
    """Two reusable float32 buffers: fresh pages cost ~2 GB/s to fault in (FIELD-NOTES),
    and the dense blocks are rebuilt every layer."""

    def __init__(self) -> None:
        self._bufs: list[np.ndarray] = [np.empty(0, np.float32), np.empty(0, np.float32)]

    def get(self, slot: int, rows: int, cols: int) -> np.ndarray:
        need = rows * cols
        if self._bufs[slot].size < need:
            self._bufs[slot] = np.empty(int(need * 1.25) + 1, dtype=np.float32)
        return self._bufs[slot][:need].reshape(rows, cols)

    def release(self) -> None:
        self._bufs = [np.empty(0, np.float32), np.empty(0, np.float32)]


_scratch = _Scratch()


def release_scratch() -> None:
    """Give the dense scratch buffers back (a warm worker keeps no big pages idle)."""
    _scratch.release()


def apply_layer(wt: sp.csr_matrix, a: sp.csr_matrix, bias: float) -> sp.csr_matrix:
    """One layer on a worker: ``wt`` (owned outputs × needed inputs) and ``a`` (needed
    inputs × images), both CSR; returns owned outputs × images (CSR, int32 indices)."""
    nrows, ncols = wt.shape[0], a.shape[1]
    b, clip = np.float32(bias), np.float32(CLIP)
    if a.nnz == 0 or nrows == 0:
        return sp.csr_matrix((nrows, ncols), dtype=np.float32)
    cols, remap = nk.compact_columns(a.indices, ncols)
    dense_bytes = 4 * (a.shape[0] + nrows) * cols.size
    if a.nnz >= DENSE_THRESHOLD * a.shape[0] * cols.size and dense_bytes <= DENSE_MAX_BYTES:
        dense_in = _scratch.get(0, a.shape[0], cols.size)
        nk.csr_to_dense(a.indptr, a.indices, a.data, remap, dense_in)
        dense_out = _scratch.get(1, nrows, cols.size)
        nk.dense_layer(wt.indptr, wt.indices, wt.data, dense_in, b, clip, dense_out)
        indptr, indices, data = nk.dense_to_csr(dense_out, cols.astype(np.int32))
    else:
        indptr, indices, data = nk.sparse_layer(
            wt.indptr, wt.indices, wt.data, a.indptr, a.indices, a.data, ncols, b, clip
        )
    return sp.csr_matrix((data, indices, indptr), shape=(nrows, ncols))


def transposed_layers(layers: list[sp.csr_matrix]) -> list[sp.csr_matrix]:
    """``W.T`` of each layer as CSR float32 with sorted indices (output × input)."""
    out = []
    for w in layers:
        wt = sp.csr_matrix(w.T, dtype=np.float32)
        wt.sort_indices()
        out.append(wt)
    return out


def run_local(
    layers: list[sp.csr_matrix], biases: list[float], inputs: sp.csr_matrix
) -> np.ndarray:
    """Single-process inference with the worker kernel; returns 0-based categories."""
    a = sp.csr_matrix(inputs.T, dtype=np.float32)
    for wt, b in zip(transposed_layers(layers), biases, strict=True):
        a = apply_layer(wt, a, b)
    release_scratch()
    alive = np.zeros(a.shape[1], dtype=bool)
    alive[a.indices] = True
    return np.flatnonzero(alive).astype(np.int64)
