"""Single-process inference: the scipy.sparse oracle and the python-graphblas baseline.

``reference_inference`` is the test oracle: the challenge's formula written as
directly as scipy allows, ``Y <- min(32, ReLU(Y @ W + b))`` with ``b`` added to the
stored (nonzero) entries only. Everything else must produce the same categories.

``graphblas_inference`` is the comparison baseline (SuiteSparse:GraphBLAS, the
Graph Challenge CPU champion's library). python-graphblas pitfall (FIELD-NOTES):
every Matrix sits in a reference cycle, so per-layer temporaries are only freed by
the cycle collector; we reuse two output matrices and collect every layer.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from strato.inference.network import CLIP, Network

__all__ = ["categories_of", "graphblas_inference", "reference_inference"]


def categories_of(y: sp.csr_matrix) -> np.ndarray:
    """0-based indices of the images whose final row has any nonzero."""
    return np.flatnonzero(np.diff(y.indptr) > 0).astype(np.int64)


def reference_inference(network: Network, inputs: sp.csr_matrix) -> np.ndarray:
    """Categories (0-based image indices) by the scipy.sparse formula."""
    y = sp.csr_matrix(inputs, dtype=np.float32)
    for w, b in zip(network.layers, network.biases, strict=True):
        z = (y @ w).tocsr()
        z.data += np.float32(b)
        np.clip(z.data, 0.0, CLIP, out=z.data)
        z.eliminate_zeros()
        y = z
    return categories_of(y)


def graphblas_inference(
    layers: Sequence[sp.csr_matrix], biases: Sequence[float], inputs: sp.csr_matrix,
    *, threads: int | None = None, timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Categories by python-graphblas (same formula; the challenge's champion library).

    ``threads`` pins SuiteSparse to that many threads for the call (None: its default,
    every core). ``timings``, when given, gets ``convert_s`` (scipy → GraphBLAS
    matrices) and ``loop_s`` (the layers' loop alone)."""
    import graphblas as gb  # imported here: it loads SuiteSparse (~0.5 s) on first use

    def to_gb(m: sp.csr_matrix) -> gb.Matrix:
        m = sp.csr_matrix(m, dtype=np.float32)
        return gb.Matrix.from_csr(
            m.indptr, m.indices, m.data, nrows=m.shape[0], ncols=m.shape[1]
        )

    saved = gb.ss.config["nthreads"]
    if threads is not None:
        gb.ss.config["nthreads"] = int(threads)
    try:
        t0 = time.perf_counter()
        weights = [to_gb(w) for w in layers]
        y = to_gb(inputs)
        z = gb.Matrix(gb.dtypes.FP32, nrows=inputs.shape[0], ncols=inputs.shape[1])
        t1 = time.perf_counter()
        for w, b in zip(weights, biases, strict=True):
            z << y.mxm(w, gb.semiring.plus_times)
            z << z.apply(gb.binary.plus, right=np.float32(b))  # stored entries only
            z << z.select(">", 0)
            z << z.apply(gb.binary.min, right=np.float32(CLIP))
            y, z = z, y
            gb_collect = gc.collect  # the reference-cycle pitfall: free dropped temporaries
            gb_collect(0)
        t2 = time.perf_counter()
    finally:
        gb.ss.config["nthreads"] = saved
    if timings is not None:
        timings.update(convert_s=t1 - t0, loop_s=t2 - t1)
    rows = np.asarray(y.reduce_rowwise(gb.monoid.any).new().to_coo()[0], dtype=np.int64)
    del weights, y, z
    gc.collect()
    return np.sort(rows)
