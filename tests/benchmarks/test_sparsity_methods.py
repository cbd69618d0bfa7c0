"""The sparsity benchmark's methods (``benchmarks/_sparsity_methods.py``): what clients
decode is what accuracy is scored on, and the quantized FedAvg baseline is exact about
which model its deltas apply to."""

from __future__ import annotations

import numpy as np

from _sparsity_methods import QuantizedFedAvg, make_method
from fltools import cs_model
from strato.params import Params


def _trained(got: Params, shift: float) -> Params:
    out = got.copy()
    out.flat()[:] += np.float32(shift)
    return out


def _dense_model() -> Params:
    rng = np.random.default_rng(0)
    return Params.from_arrays({"fc.weight": rng.normal(size=(64, 64)).astype(np.float32),
                               "fc.bias": rng.normal(size=64).astype(np.float32)})


def test_quantized_fedavg_scores_what_clients_decode_and_adds_deltas_to_it() -> None:
    start = _dense_model()
    method = QuantizedFedAvg(start, seed=7, bits=4)
    blob = method.download(1)
    received = method.receive(blob)
    got = received.params
    assert not np.array_equal(got.flat(), start.flat())  # 4 bits are lossy
    assert len(blob) < start.layout.nbytes / 4  # 4-bit kernels plus zstd
    uploads = [(method.upload(c, 1, received, _trained(got, 0.01 * (c + 1))), 10)
               for c in range(3)]
    method.aggregate(1, uploads)
    # the new record is what clients decoded plus the mean delta (0.02), up to the
    # deltas' own 4-bit rounding
    err = np.abs(method.model().flat() - (got.flat() + 0.02))
    assert float(err.max()) < 0.01
    # the scored model is exactly the one round 2's clients decode
    scored = method.client_model(1)
    assert np.array_equal(scored.flat(), method.receive(method.download(2)).params.flat())
    assert not np.array_equal(scored.flat(), method.model().flat())


def test_every_method_scores_the_model_its_next_download_decodes_to() -> None:
    for name in ("fedavg", "fedavg_q8", "cs50", "combined"):
        method = make_method(name, cs_model(0), seed=3, eta=1.5)
        got = method.receive(method.download(1))
        uploads = [(method.upload(c, 1, got, _trained(got.params, 0.05 * c)), 5 + c)
                   for c in range(2)]
        method.aggregate(1, uploads)
        scored = method.client_model(1)
        decoded = method.receive(method.download(2)).params
        assert np.array_equal(scored.flat(), decoded.flat()), name
