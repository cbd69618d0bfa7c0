"""Worker plans simulated in one process: exchange lists, twin rows, exact results."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from strato.inference._wire import assemble_rows, decode_rows, encode_rows
from strato.inference.kernel import apply_layer
from strato.inference.network import generate_network
from strato.inference.partition import make_partition
from strato.inference.plan import WorkerPlan, build_plans
from strato.inference.reference import reference_inference


def _simulate(plans: list[WorkerPlan], x: sp.csr_matrix) -> np.ndarray:
    """Every worker's loop of ``worker._infer``, with blocks passed by hand."""
    full = sp.csr_matrix(x.T, dtype=np.float32)
    inputs = [full[p.arrays["need0"]] for p in plans]
    nw, nl = len(plans), plans[0].layers
    for li in range(nl):
        outs = [apply_layer(p.wt(li), inputs[i], p.biases[li]) for i, p in enumerate(plans)]
        if li == nl - 1:
            break
        sent = {
            (i, q): encode_rows(outs[i], rows, p.arrays[f"twin{li}"][rows])
            for i, p in enumerate(plans)
            for q, rows in p.sends(li).items()
        }
        for i, p in enumerate(plans):
            froms = p.receives(li)
            blocks = [decode_rows(sent[(q, i)], froms[q].size, x.shape[0])
                      for q in range(nw) if q != i]
            inputs[i] = assemble_rows(outs[i], p.arrays[f"keep{li}"], blocks,
                                      p.arrays[f"pick{li}"])
    alive = np.zeros(x.shape[0], dtype=bool)
    for z in outs:
        alive[z.indices] = True
    return np.flatnonzero(alive)


@pytest.mark.parametrize(("method", "workers"), [("contiguous", 1), ("random", 3),
                                                 ("hypergraph", 4)])
def test_simulated_workers_equal_the_oracle(make_inputs, method: str, workers: int) -> None:  # type: ignore[no-untyped-def]
    net = generate_network(1024, 9, seed=6)
    x = make_inputs(1024, 150, 120, seed=2)
    plans = build_plans(net.layers, net.biases, make_partition(method, net.layers, workers))
    assert np.array_equal(_simulate(plans, x), reference_inference(net, x))


def test_worker_inputs_hold_one_row_per_twin_class() -> None:
    net = generate_network(1024, 4, seed=1)
    (plan,) = build_plans(net.layers, net.biases, make_partition("contiguous", net.layers, 1))
    assert plan.wt(0).shape == (1024, 1024)  # layer 1 reads the images themselves
    for li in range(1, 4):
        wt = plan.wt(li)
        # 1,024 inputs are 64 twin classes; every output still sums its 32 terms
        assert wt.shape == (1024, 64)
        assert np.all(np.diff(wt.indptr) == 32)
