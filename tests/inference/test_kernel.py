from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from strato.inference import kernel
from strato.inference._wire import decode_rows, encode_rows
from strato.inference.network import generate_network
from strato.inference.reference import graphblas_inference, reference_inference


@pytest.mark.parametrize("threshold", [0.0, 2.0])  # always dense / always sparse
def test_layer_kernel_equals_scipy_bit_for_bit(
    threshold: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel, "DENSE_THRESHOLD", threshold)
    rng = np.random.default_rng(0)
    wt = sp.random(300, 400, density=0.05, format="csr", dtype=np.float32, random_state=1)
    wt.data -= 0.4  # mixed signs: some sums cancel, some go negative
    wt.sort_indices()
    a = sp.random(400, 500, density=0.1, format="csr", dtype=np.float32, random_state=2)
    a.data *= 40  # some entries hit the clip at 32
    got = kernel.apply_layer(wt, a, -0.3)
    want = (wt @ a).tocsr()
    want.data += np.float32(-0.3)
    np.clip(want.data, 0, 32, out=want.data)
    want.eliminate_zeros()
    assert got.shape == want.shape
    assert abs(got - want).max() == 0.0
    assert got.nnz == want.nnz
    del rng


def test_local_kernel_and_graphblas_match_the_oracle(make_inputs) -> None:  # type: ignore[no-untyped-def]
    net = generate_network(1024, 12, seed=1)
    x = make_inputs(1024, 300, 120, seed=3)
    ref = reference_inference(net, x)
    assert 0 < ref.size < 300  # the workload is non-trivial: some live, some die
    assert np.array_equal(kernel.run_local(net.layers, net.biases, x), ref)
    assert np.array_equal(graphblas_inference(net.layers, net.biases, x), ref)


def test_row_blocks_roundtrip_including_empty_rows() -> None:
    a = sp.random(50, 700, density=0.2, format="csr", dtype=np.float32, random_state=4)
    a = sp.vstack([a, sp.csr_matrix((3, 700), dtype=np.float32)], format="csr")
    rows = np.array([51, 0, 7, 52, 49])
    back = decode_rows(encode_rows(a, rows), rows.size, 700)
    assert abs(back - a[rows]).max() == 0.0
    assert encode_rows(a, np.zeros(0, np.int64)) == b""
    assert decode_rows(b"", 0, 700).shape == (0, 700)
