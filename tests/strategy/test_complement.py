"""Complement Sparsification: exact per-layer pruning, what a client sends, server merge."""

from __future__ import annotations

import numpy as np
import pytest

from strato.errors import ConfigError, LayoutError
from strato.params import Params
from strato.strategy.complement import (
    ComplementConfig,
    ComplementServer,
    client_complement,
    kernel_positions,
    prune,
    upload_positions,
)
from strato.wire import WireFormat, decode_values, encode_values


def model(seed: int = 0, scale_fc: float = 1.0) -> Params:
    rng = np.random.default_rng(seed)
    return Params.from_arrays({
        "conv.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=4).astype(np.float32),
        "fc.weight": (scale_fc * rng.normal(size=(5, 7))).astype(np.float32),
        "fc.bias": rng.normal(size=5).astype(np.float32),
        "out.weight": rng.normal(size=(3, 5)).astype(np.float32),
        "out.bias": rng.normal(size=3).astype(np.float32),
    })


KERNELS = ("conv.weight", "fc.weight", "out.weight")


def test_kernels_are_tensors_of_two_or_more_dimensions() -> None:
    p = model()
    k = kernel_positions(p.layout)
    for spec in p.layout.tensors:
        seg = k[spec.offset // 4 : spec.end // 4]
        assert seg.all() if spec.name in KERNELS else not seg.any()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_pruning_is_per_layer_and_exact(sparsity: float) -> None:
    # fc is 1000x smaller than the rest: a global threshold would wipe it out entirely.
    p = model(scale_fc=1e-3)
    pruned, keep = prune(p, sparsity)
    for spec in p.layout.tensors:
        orig, got = p[spec.name].ravel(), pruned[spec.name].ravel()
        kept = keep[spec.offset // 4 : spec.end // 4]
        if spec.name not in KERNELS:  # biases are never pruned
            assert kept.all() and np.array_equal(got, orig)
            continue
        n_pruned = int(sparsity * orig.size)
        assert int((~kept).sum()) == n_pruned
        assert np.array_equal(got[kept], orig[kept]) and not got[~kept].any()
        # numpy reference: exactly the n smallest magnitudes of this layer are gone
        ref = np.sort(np.abs(orig))
        if n_pruned:
            assert np.abs(orig[~kept]).max() <= ref[n_pruned - 1]
            assert np.abs(orig[kept]).min() >= ref[n_pruned - 1] if kept.any() else True
        assert set(np.flatnonzero(~kept)) == set(np.argsort(np.abs(orig), kind="stable")[:n_pruned])
    assert np.array_equal(p.flat(), model(scale_fc=1e-3).flat())  # the input is untouched


def test_pruning_breaks_ties_deterministically() -> None:
    p = Params.from_arrays({"w": np.ones((4, 4), np.float32)})
    _, keep = prune(p, 0.5)
    assert np.array_equal(np.flatnonzero(~keep), np.arange(8))


def test_client_sends_exactly_its_trained_values_where_the_received_model_was_zero() -> None:
    received, keep = prune(model(1), 0.6)
    trained = model(2)  # every weight moved, the kept ones too
    values = client_complement(keep, trained)
    kernels = kernel_positions(trained.layout)
    send = upload_positions(keep, kernels)
    # exactly the pruned kernel positions and every bias, trained values, layout order
    assert np.array_equal(send, (~keep & kernels) | ~kernels)
    assert np.array_equal(values, trained.flat()[send])
    zero_in_received = (received.flat() == 0) & kernels
    assert np.array_equal(send & kernels, zero_in_received)
    # and nothing else: changing any kept weight changes nothing that is sent
    other = trained.copy()
    other.flat()[keep & kernels] += 1.0
    assert np.array_equal(client_complement(keep, other), values)
    # on the wire: values only, against the shared mask (no bitmap, no indices)
    enc = encode_values(trained.layout, values, send, WireFormat(mask="shared"))
    header = int.from_bytes(enc.payload[4:8], "little") + 8
    assert enc.nbytes - header == 4 * int(send.sum())
    assert np.array_equal(decode_values(enc.payload, shared_mask=send).values, values)


def test_dense_first_round_sends_everything() -> None:
    trained = model(3)
    assert np.array_equal(client_complement(None, trained), trained.flat())


def test_server_merges_complements_like_the_paper() -> None:
    cfg = ComplementConfig(sparsity=0.5, eta=1.5)
    server = ComplementServer(model(0), cfg)
    assert server.keep is None and server.upload_mask() is None
    # round 1: dense FedAvg, then pruned
    ups = [(model(10).flat().copy(), 30.0), (model(11).flat().copy(), 10.0)]
    fedavg = (30 * model(10).flat().astype(np.float64) + 10 * model(11).flat()) / 40
    server.aggregate(ups)
    assert np.allclose(server.dense.flat(), fedavg, rtol=1e-6)
    ref_ws, ref_keep = prune(server.dense, 0.5)
    assert np.array_equal(server.model.flat(), ref_ws.flat())
    assert np.array_equal(server.keep, ref_keep)
    # round 2: w_dense = w_s + η·mean(complement) on kernels, FedAvg on biases, prune again
    w_s, keep = server.model.copy(), server.keep.copy()
    kernels = kernel_positions(w_s.layout)
    a, b = model(20), model(21)
    ca, cb = client_complement(keep, a), client_complement(keep, b)
    server.aggregate([(ca, 1.0), (cb, 3.0)])
    send = upload_positions(keep, kernels)
    mean = np.zeros(w_s.layout.numel)
    mean[send] = (1.0 * ca.astype(np.float64) + 3.0 * cb) / 4
    ref = w_s.flat().astype(np.float64).copy()
    ref[send & kernels] = w_s.flat()[send & kernels] + 1.5 * mean[send & kernels]
    ref[~kernels] = mean[~kernels]
    assert np.allclose(server.dense.flat(), ref, rtol=1e-6, atol=1e-7)
    ref_ws, ref_keep = prune(server.dense, 0.5)
    assert np.array_equal(server.model.flat(), ref_ws.flat())
    # kept weights change only by being pruned and regrown
    still = keep & server.keep & kernels
    assert np.array_equal(server.model.flat()[still], w_s.flat()[still])


def test_server_refuses_bad_uploads() -> None:
    server = ComplementServer(model(0))
    with pytest.raises(LayoutError):
        server.aggregate([(np.zeros(3, np.float32), 1.0)])
    with pytest.raises(ConfigError):
        server.aggregate([])
    with pytest.raises(ConfigError):
        server.aggregate([(model(1).flat().copy(), 0.0)])
    with pytest.raises(ConfigError):
        ComplementConfig(sparsity=1.0)
    with pytest.raises(ConfigError):
        ComplementConfig(eta=0.0)
    with pytest.raises(LayoutError):
        prune(Params.from_arrays({"w": np.zeros((2, 2), np.float64)}), 0.5)


def test_kept_rate_mode_also_moves_kept_weights() -> None:
    server = ComplementServer(model(0), ComplementConfig(sparsity=0.5, eta=2.0, kept_rate=0.5))
    server.aggregate([(model(10).flat().copy(), 1.0)])
    w_s, keep = server.model.copy(), server.keep.copy()
    kernels = kernel_positions(w_s.layout)
    assert server.upload_mask() is None  # every position comes back
    a, b = model(20).flat().astype(np.float64), model(21).flat().astype(np.float64)
    server.aggregate([(model(20).flat().copy(), 1.0), (model(21).flat().copy(), 1.0)])
    mean = (a + b) / 2
    ref = w_s.flat().astype(np.float64).copy()
    kept, grow = keep & kernels, ~keep & kernels
    ref[kept] += 0.5 * (mean[kept] - ref[kept])
    ref[grow] = 2.0 * mean[grow]
    ref[~kernels] = mean[~kernels]
    assert np.allclose(server.dense.flat(), ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError):
        ComplementConfig(kept_rate=0.0)
