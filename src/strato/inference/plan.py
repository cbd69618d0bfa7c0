"""Each worker's share of a run: its weight slices and its exchange lists.

The coordinator derives everything from the network and the partition once and
puts one blob per worker (the network travels by reference, never inside an event;
a worker maps only its own share). For worker ``p`` and layer ``l`` (0-based):

- ``own{l}``: output neurons it computes; ``need{l}``: input neurons they read
  (sorted); ``twin{l}``: the twin class of each of its output rows
  (``twin_classes``): rows of one class are bit-identical, so a block sends each
  class once;
- after layer ``l`` it sends to ``q`` the rows at positions ``send{l}.{q}`` of its
  output (possibly none: an explicit empty message), and receives from ``q`` the
  neurons ``from{l}.{q}``; ``keep{l}`` are the positions of its own output rows it
  reads itself at layer ``l + 1``;
- its input at layer ``l + 1`` holds **one row per twin class** it needs, not one per
  neuron (16× fewer rows on RadiX-Net): ``pick{l}`` are the positions, in the
  stacked ``[kept rows, from q₀, from q₁, …]``, of one member of each needed class;
- ``wt{l}.*``: ``W_l.T[own, need]`` as CSR whose column ``c`` is an input row:
  ``need`` position at layer 0, twin-class row (``pick``) after. Each row's entries
  stay in ascending input-neuron order, twins repeated (a twin's row is read once
  per weight), so every sum adds the same terms in the same order as the scipy
  oracle: bit-identical results.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from strato.codec.rows import load_arrays, save_arrays
from strato.inference import _numba_rows as nr
from strato.inference.partition import Partition, send_lists

__all__ = ["WorkerPlan", "build_plans", "twin_classes"]


def twin_classes(wt: sp.csr_matrix) -> np.ndarray:
    """Class id per output neuron (row of ``W.T``): equal ids for identical weight
    rows (same inputs, same weights), whose activations are therefore bit-identical
    in every layer computation. Classes are numbered by first appearance."""
    wt = sp.csr_matrix(wt, dtype=np.float32)
    wt.sort_indices()
    data = np.ascontiguousarray(wt.data, dtype=np.float32)
    hashes = nr.row_hashes(wt.indptr, wt.indices, data)
    rows = np.arange(wt.shape[0], dtype=np.int64)
    ref, _ = nr.dedup_rows(wt.indptr, wt.indices, data, rows, hashes)
    return np.asarray(ref, dtype=np.int32)


@dataclass
class WorkerPlan:
    worker: int
    workers: int
    layers: int
    neurons: int
    biases: list[float]
    arrays: dict[str, np.ndarray]

    def wt(self, layer: int) -> sp.csr_matrix:
        """This worker's weights of ``layer``: own outputs × its input rows."""
        a = self.arrays
        width = a["need0"].size if layer == 0 else a[f"pick{layer - 1}"].size
        return sp.csr_matrix(
            (a[f"wt{layer}.data"], a[f"wt{layer}.indices"], a[f"wt{layer}.indptr"]),
            shape=(a[f"own{layer}"].size, width),
        )

    def sends(self, layer: int) -> dict[int, np.ndarray]:
        return {
            q: self.arrays[f"send{layer}.{q}"] for q in range(self.workers) if q != self.worker
        }

    def receives(self, layer: int) -> dict[int, np.ndarray]:
        return {
            q: self.arrays[f"from{layer}.{q}"] for q in range(self.workers) if q != self.worker
        }

    def to_bytes(self) -> bytes:
        meta = {
            "worker": str(self.worker),
            "workers": str(self.workers),
            "layers": str(self.layers),
            "neurons": str(self.neurons),
            "biases": ",".join(repr(float(b)) for b in self.biases),
        }
        return save_arrays(self.arrays, meta)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> WorkerPlan:
        raw = bytes(data)
        (hlen,) = struct.unpack("<Q", raw[:8])
        meta = json.loads(raw[8 : 8 + hlen]).get("__metadata__", {})
        return cls(
            worker=int(meta["worker"]),
            workers=int(meta["workers"]),
            layers=int(meta["layers"]),
            neurons=int(meta["neurons"]),
            biases=[float(b) for b in meta["biases"].split(",")],
            arrays=load_arrays(raw),
        )


def build_plans(
    layers: list[sp.csr_matrix], biases: list[float], partition: Partition
) -> list[WorkerPlan]:
    """Every worker's plan for running ``layers`` under ``partition``."""
    nw, n, nl = partition.workers, layers[0].shape[0], len(layers)
    owner = partition.owner
    plans = [WorkerPlan(p, nw, nl, n, list(biases), {}) for p in range(nw)]
    owned = [[partition.owned(li, p) for p in range(nw)] for li in range(nl)]
    twins_of: list[np.ndarray] = []
    for li, w in enumerate(layers):
        wt_full = sp.csr_matrix(w.T, dtype=np.float32)
        wt_full.sort_indices()
        twins = twin_classes(wt_full)
        twins_of.append(twins)
        for p, plan in enumerate(plans):
            own = owned[li][p]
            rows = wt_full[own]
            need = np.unique(rows.indices).astype(np.int64)
            sub = rows[:, need].tocsr()
            sub.sort_indices()
            plan.arrays[f"own{li}"] = own.astype(np.int64)
            plan.arrays[f"need{li}"] = need
            plan.arrays[f"twin{li}"] = twins[own]
            plan.arrays[f"wt{li}.indptr"] = sub.indptr.astype(np.int64)
            plan.arrays[f"wt{li}.indices"] = sub.indices.astype(np.int32)
            plan.arrays[f"wt{li}.data"] = sub.data.astype(np.float32)
    for li in range(nl - 1):
        lists = send_lists(layers[li + 1], owner[li], owner[li + 1], nw)
        empty = np.zeros(0, dtype=np.int64)
        for p, plan in enumerate(plans):
            own = owned[li][p]
            need_next = plan.arrays[f"need{li + 1}"]
            kept = np.intersect1d(need_next, own, assume_unique=True)
            plan.arrays[f"keep{li}"] = np.searchsorted(own, kept).astype(np.int64)
            ids = [kept]
            for q in range(nw):
                if q == p:
                    continue
                out_rows = lists.get((p, q), empty)
                plan.arrays[f"send{li}.{q}"] = np.searchsorted(own, out_rows).astype(np.int64)
                inc = lists.get((q, p), empty)
                plan.arrays[f"from{li}.{q}"] = inc
                ids.append(inc)
            # stacked position of each need_next neuron (need_next is sorted)
            order = np.argsort(np.concatenate(ids), kind="stable")
            _, first, row_of = np.unique(
                twins_of[li][need_next], return_index=True, return_inverse=True
            )
            plan.arrays[f"pick{li}"] = order[first].astype(np.int64)
            key = f"wt{li + 1}.indices"  # need position → twin-class row, order kept
            plan.arrays[key] = row_of[plan.arrays[key]].astype(np.int32)
    return plans
