"""Partitioning each layer's output neurons (rows of ``W.T``) across W workers.

A partition is ``owner[l, j]``: the worker that computes output neuron ``j`` of layer
``l`` (0-based layer index). At the boundary after layer ``l`` worker ``p`` sends the
activation row of neuron ``i`` to every other worker that owns an output of layer
``l + 1`` reading ``i``; the *communication volume* counts those (row, target) pairs
(the connectivity − 1 metric of the layer's row-net hypergraph). Layer 1 reads the
inputs, which every worker fetches itself, so there are ``L − 1`` exchanges.

- ``random``: one random balanced assignment, the same for every layer.
- ``contiguous``: worker ``p`` owns neurons ``[pN/W, (p+1)N/W)`` in every layer.
- ``hypergraph``: per layer, METIS (pymetis) on the bipartite graph of the layer's
  inputs and outputs (the standard graph model of the row-net hypergraph), so each
  part holds outputs together with the inputs they read; the parts are then renamed
  to agree as much as possible with who owns those inputs (the previous layer's
  outputs), and output counts are rebalanced to at most ``ceil(N/W)`` per worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from strato.errors import ConfigError

__all__ = [
    "PARTITIONERS",
    "Partition",
    "communication_volume",
    "make_partition",
    "needed_inputs",
    "send_lists",
]

PARTITIONERS = ("random", "contiguous", "hypergraph")


@dataclass(frozen=True)
class Partition:
    method: str
    workers: int
    owner: np.ndarray  # (layers, neurons) int32

    def owned(self, layer: int, worker: int) -> np.ndarray:
        """Sorted output neurons of ``layer`` (0-based) owned by ``worker``."""
        return np.flatnonzero(self.owner[layer] == worker)

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "workers": self.workers}


def _balanced_random(neurons: int, workers: int, rng: np.random.Generator) -> np.ndarray:
    owner = np.empty(neurons, dtype=np.int32)
    owner[rng.permutation(neurons)] = (np.arange(neurons) * workers // neurons).astype(np.int32)
    return owner


def _metis_layer(w: sp.csr_matrix, workers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """METIS parts of (inputs, outputs) of one layer's bipartite graph."""
    import pymetis

    n = w.shape[0]
    coo = sp.coo_matrix(w)
    # vertices 0..n-1 are inputs (rows of W), n..2n-1 outputs (columns of W)
    r = np.concatenate([coo.row, coo.col + n])
    c = np.concatenate([coo.col + n, coo.row])
    adj = sp.csr_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(2 * n, 2 * n))
    adj.sum_duplicates()
    opts = pymetis.Options(seed=seed)
    graph = pymetis.CSRAdjacency(adj.indptr, adj.indices)
    _, parts = pymetis.part_graph(workers, graph, options=opts)
    p = np.asarray(parts, dtype=np.int32)
    return p[:n], p[n:]


def _rebalance(owner: np.ndarray, w: sp.csr_matrix, want: np.ndarray, workers: int) -> None:
    """Move outputs from over-full workers (> ceil(N/W)) to the emptiest ones, choosing
    the outputs whose inputs the receiving worker already holds most of."""
    cap = -(-owner.size // workers)
    wt = sp.csr_matrix(w.T)
    counts = np.bincount(owner, minlength=workers)
    for p in np.flatnonzero(counts > cap):
        excess = int(counts[p] - cap)
        members = np.flatnonzero(owner == p)
        for j in members[:excess]:
            q = int(np.argmin(counts))
            ins = wt.indices[wt.indptr[j] : wt.indptr[j + 1]]
            # prefer a worker among the non-full ones that wants j's inputs most
            votes = np.bincount(want[ins], minlength=workers)
            votes[counts >= cap] = -1
            if votes.max() >= 0:
                q = int(np.argmax(votes))
            owner[j] = q
            counts[p] -= 1
            counts[q] += 1


def make_partition(
    method: str, layers: list[sp.csr_matrix], workers: int, seed: int = 0
) -> Partition:
    """Partition every layer's output neurons across ``workers``."""
    if method not in PARTITIONERS:
        raise ConfigError(f"unknown partitioner {method!r} (choose from {', '.join(PARTITIONERS)})")
    n = layers[0].shape[0]
    if not 1 <= workers <= n:
        raise ConfigError(f"--workers must be in 1..{n}, got {workers}")
    owner = np.empty((len(layers), n), dtype=np.int32)
    if method == "contiguous" or workers == 1:
        owner[:] = (np.arange(n) * workers // n).astype(np.int32)
    elif method == "random":
        owner[:] = _balanced_random(n, workers, np.random.default_rng(seed))
    else:
        for li, w in enumerate(layers):
            want_in, out = _metis_layer(w, workers, seed + li)
            if li > 0:
                # rename parts so that inputs land where the previous layer computed them
                agree = np.zeros((workers, workers), dtype=np.int64)
                np.add.at(agree, (want_in, owner[li - 1]), 1)
                rows, cols = linear_sum_assignment(-agree)
                rename = np.empty(workers, dtype=np.int32)
                rename[rows] = cols
                want_in, out = rename[want_in], rename[out]
            _rebalance(out, w, want_in, workers)
            owner[li] = out
    return Partition(method=method, workers=workers, owner=owner)


def needed_inputs(w: sp.csr_matrix, owner_out: np.ndarray, worker: int) -> np.ndarray:
    """Sorted input neurons of layer ``w`` read by ``worker``'s outputs."""
    cols = np.flatnonzero(owner_out == worker)
    sub = sp.csc_matrix(w)[:, cols]
    return np.unique(sub.indices).astype(np.int64)


def _reader_pairs(w: sp.csr_matrix, owner_out: np.ndarray, workers: int) -> np.ndarray:
    """Distinct (input neuron, reading worker) pairs of a layer, as ``i * W + q``."""
    coo = sp.coo_matrix(w)
    return np.unique(coo.row.astype(np.int64) * workers + owner_out[coo.col])


def send_lists(
    w_next: sp.csr_matrix, owner_prev: np.ndarray, owner_next: np.ndarray, workers: int
) -> dict[tuple[int, int], np.ndarray]:
    """(source, target) → sorted neurons the source sends after a layer (source ≠ target)."""
    pairs = _reader_pairs(w_next, owner_next, workers)
    rows, targets = pairs // workers, pairs % workers
    sources = owner_prev[rows]
    remote = sources != targets
    rows, targets, sources = rows[remote], targets[remote], sources[remote]
    key = sources * workers + targets
    order = np.lexsort((rows, key))
    rows, key = rows[order], key[order]
    cut = np.flatnonzero(np.diff(key)) + 1
    out: dict[tuple[int, int], np.ndarray] = {}
    for chunk_rows, chunk_key in zip(np.split(rows, cut), np.split(key, cut), strict=True):
        if chunk_rows.size:
            k = int(chunk_key[0])
            out[(k // workers, k % workers)] = chunk_rows
    return out


def communication_volume(layers: list[sp.csr_matrix], partition: Partition) -> np.ndarray:
    """Activation rows sent at each of the ``L − 1`` boundaries (row, target pairs)."""
    w = partition.workers
    vol = np.zeros(max(len(layers) - 1, 0), dtype=np.int64)
    for li in range(len(layers) - 1):
        pairs = _reader_pairs(layers[li + 1], partition.owner[li + 1], w)
        rows, targets = pairs // w, pairs % w
        vol[li] = int(np.count_nonzero(partition.owner[li][rows] != targets))
    return vol
