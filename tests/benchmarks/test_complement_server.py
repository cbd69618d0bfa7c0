"""The sparsity benchmark's CS server (``benchmarks/_complement_server.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from _complement_server import ComplementServer
from fltools import cs_model
from strato.errors import ConfigError, LayoutError
from strato.params import Params
from strato.strategy.complement import (
    ComplementConfig,
    client_complement,
    kernel_positions,
    merge,
    prune,
    upload_positions,
)

model = cs_model


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
    ca, cb = client_complement(w_s, a), client_complement(w_s, b)
    server.aggregate([(ca, 1.0), (cb, 3.0)])
    send = upload_positions(w_s, kernels)
    assert np.array_equal(send, ~keep | ~kernels)
    mean = np.zeros(w_s.layout.numel)
    mean[send] = (1.0 * ca.astype(np.float64) + 3.0 * cb) / 4
    ref = w_s.flat().astype(np.float64).copy()
    ref[send & kernels] = w_s.flat()[send & kernels] + 1.5 * mean[send & kernels]
    ref[~kernels] = mean[~kernels]
    assert np.allclose(server.dense.flat(), ref, rtol=1e-6, atol=1e-7)
    assert np.allclose(merge(w_s.flat(), mean, kernels, 1.5), ref, rtol=1e-6, atol=1e-7)
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
    with pytest.raises(ConfigError):
        ComplementConfig(sparsity=-0.1)
    with pytest.raises(ConfigError):
        ComplementConfig(eta=float("nan"))
    with pytest.raises(ConfigError):
        ComplementConfig(sparsity="0.5")  # type: ignore[arg-type]  # a TOML string, on purpose
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
