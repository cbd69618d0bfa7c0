from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from strato.errors import CodecError
from strato.inference import kernel
from strato.inference._wire import assemble_rows, decode_rows, encode_rows
from strato.inference.network import generate_network
from strato.inference.plan import twin_classes
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
    # pinned to one thread, with the conversion and the loop timed apart: same answer
    timings: dict[str, float] = {}
    one = graphblas_inference(net.layers, net.biases, x, threads=1, timings=timings)
    assert np.array_equal(one, ref)
    assert set(timings) == {"convert_s", "loop_s"} and min(timings.values()) > 0


def test_row_blocks_roundtrip_including_empty_rows() -> None:
    a = sp.random(50, 700, density=0.2, format="csr", dtype=np.float32, random_state=4)
    a = sp.vstack([a, sp.csr_matrix((3, 700), dtype=np.float32)], format="csr")
    rows = np.array([51, 0, 7, 52, 49])
    back = decode_rows(encode_rows(a, rows), rows.size, 700)
    assert abs(back.to_csr() - a[rows]).max() == 0.0
    assert encode_rows(a, np.zeros(0, np.int64)) == b""
    assert decode_rows(b"", 0, 700).to_csr().shape == (0, 700)
    with pytest.raises(CodecError):
        decode_rows(encode_rows(a, rows), rows.size + 1, 700)
    with pytest.raises(CodecError):
        decode_rows(b"not zstd", 1, 700)


def test_twin_rows_travel_once_and_arrive_everywhere() -> None:
    a = sp.random(40, 900, density=0.3, format="csr", dtype=np.float32, random_state=6)
    rows = np.array([3, 10, 11, 3, 25, 10, 39])
    classes = np.array([0, 1, 1, 0, 2, 1, 3])  # rows 10 and 11 declared twins
    a = sp.lil_matrix(a)
    a[11] = a[10]
    a = sp.csr_matrix(a)
    plain, twinned = encode_rows(a, rows), encode_rows(a, rows, classes)
    assert len(twinned) < len(plain)
    back = decode_rows(twinned, rows.size, 900)
    assert back.distinct.shape[0] == 4
    assert abs(back.to_csr() - a[rows]).max() == 0.0


def test_assemble_equals_stack_then_reorder() -> None:
    rng = np.random.default_rng(8)
    own = sp.random(30, 500, density=0.2, format="csr", dtype=np.float32, random_state=9)
    other = sp.random(20, 500, density=0.2, format="csr", dtype=np.float32, random_state=10)
    keep, sent = np.array([2, 7, 29, 0]), np.array([19, 4, 4, 11, 0])
    block = decode_rows(encode_rows(other, sent), sent.size, 500)
    order = rng.permutation(keep.size + sent.size)
    got = assemble_rows(own, keep, [block], order)
    want = sp.vstack([own[keep], other[sent]], format="csr")[order]
    assert got.shape == want.shape and abs(got - want).max() == 0.0
    assert got.nnz == want.nnz


def test_twin_classes_group_identical_weight_rows_whose_outputs_agree(make_inputs) -> None:  # type: ignore[no-untyped-def]
    net = generate_network(1024, 8, seed=2)
    x = make_inputs(1024, 200, 120, seed=1)
    a = sp.csr_matrix(x.T, dtype=np.float32)
    for wt, b in zip(kernel.transposed_layers(net.layers), net.biases, strict=True):
        classes = twin_classes(wt)
        # RadiX-Net: groups of 16 equal neurons (32 in base layer 6, shift 32 ≡ −32)
        assert np.unique(classes).size in (32, 64)
        a = kernel.apply_layer(wt, a, b)
        first = np.unique(classes, return_index=True)[1]
        # every neuron's activation row equals its class representative's
        assert abs(a - a[first[classes]]).max() == 0.0


def test_blocks_do_not_depend_on_the_column_order_within_rows() -> None:
    a = sp.random(30, 800, density=0.2, format="csr", dtype=np.float32, random_state=12)
    shuffled = a.copy()
    rng = np.random.default_rng(3)
    for r in range(shuffled.shape[0]):  # as the sparse kernel leaves them: first-touch order
        s, e = shuffled.indptr[r], shuffled.indptr[r + 1]
        perm = s + rng.permutation(e - s)
        shuffled.indices[s:e], shuffled.data[s:e] = shuffled.indices[perm], shuffled.data[perm]
    rows = np.array([4, 0, 29, 17])
    assert encode_rows(shuffled, rows) == encode_rows(a, rows)
    back = decode_rows(encode_rows(shuffled, rows), rows.size, 800).to_csr()
    assert back.has_sorted_indices and abs(back - a[rows]).max() == 0.0
