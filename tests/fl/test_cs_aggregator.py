"""The CS half of the aggregator function's round state (``fl.strategies``), no services."""

from __future__ import annotations

import numpy as np
import pytest

from fltools import toy_params
from strato import codec
from strato.errors import CodecError, ConfigError
from strato.fl.strategies import RoundAggregator, check_strategy, download_key
from strato.params import Params
from strato.strategy.complement import (
    decode_download,
    encode_upload,
    kernel_positions,
    merge,
    prune,
    upload_positions,
)


def _mean(pairs: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """The weighted mean the aggregation engine hands the server step."""
    total = sum(w for _, w in pairs)
    return sum(w * x.astype(np.float64) for x, w in pairs) / total  # type: ignore[no-any-return]


def test_round_one_is_fedavg_then_pruned_and_round_two_merges_complements() -> None:
    layout = toy_params(0).layout
    opts = {"sparsity": 0.5, "eta": 1.5}
    agg = RoundAggregator("cs", opts, layout, 1)
    a, b = toy_params(1), toy_params(2)
    decoded = [
        (agg.decode_update(codec.encode(p).payload, lambda: toy_params(0)).flat(), n)
        for p, n in ((a, 10.0), (b, 30.0))
    ]
    w1, state = agg.step(toy_params(0).flat(), _mean(decoded), {})
    assert state == {}
    fedavg = ((10 * a.flat().astype(np.float64) + 30 * b.flat()) / 40).astype(np.float32)
    ref, _ = prune(Params(layout, fedavg.view(np.uint8)), 0.5)
    assert np.allclose(w1, ref.flat(), rtol=1e-6)
    w_s = Params(layout, w1.view(np.uint8))
    # what the clients fetch is exactly w_s, sparse
    download = agg.download_payload(w_s)
    assert download is not None and len(download) < codec.encoded_size(w_s)
    assert np.array_equal(decode_download(download).flat(), w1)

    agg.reset(2)
    loads = []

    def previous() -> Params:
        loads.append(1)
        return w_s

    c, d = toy_params(3), toy_params(4)
    decoded = [
        (np.array(agg.decode_update(encode_upload(w_s, p).payload, previous).flat()), n)
        for p, n in ((c, 1.0), (d, 3.0))
    ]
    assert loads == [1]  # the round's input model is loaded once, then kept warm
    w2, _ = agg.step(w1, _mean(decoded), {})
    kernels = kernel_positions(layout)
    send = upload_positions(w_s, kernels)
    mean = np.zeros(layout.numel)
    mean[send] = (1.0 * c.flat()[send].astype(np.float64) + 3.0 * d.flat()[send]) / 4
    ref2, _ = prune(Params(layout, merge(w1, mean, kernels, 1.5).view(np.uint8)), 0.5)
    assert np.allclose(w2, ref2.flat(), rtol=1e-6, atol=1e-7)


def test_a_round_two_upload_that_is_not_a_complement_is_refused() -> None:
    layout = toy_params(0).layout
    w_s, _ = prune(toy_params(1), 0.5)
    agg = RoundAggregator("cs", {}, layout, 2)
    other, _ = prune(toy_params(1), 0.2)
    with pytest.raises(CodecError):
        agg.decode_update(encode_upload(other, toy_params(2)).payload, lambda: w_s)
    # a dense model (a client that knows nothing of CS) is reduced to its complement
    full = agg.decode_update(codec.encode(toy_params(2)).payload, lambda: w_s).flat()
    send = upload_positions(w_s, kernel_positions(layout))
    assert np.array_equal(full[send], toy_params(2).flat()[send]) and not full[~send].any()


def test_other_strategies_write_no_sparse_download() -> None:
    agg = RoundAggregator("fedavg", {}, toy_params(0).layout, 1)
    assert agg.download_payload(toy_params(0)) is None
    assert download_key("models/round-00003.safetensors") != "models/round-00003.safetensors"


@pytest.mark.parametrize(
    ("name", "options", "needle"),
    [
        ("cs", {"sparsity": 1.0}, "sparsity"),
        ("cs", {"eta": 0.0}, "eta"),
        ("cs", {"mu": 0.1}, "unknown option mu"),
        ("complement", {"sparsity": "half"}, "number"),
        ("fedavg", {"sparsity": 0.5}, "sparsity"),
    ],
)
def test_bad_cs_options_are_config_errors(
    name: str, options: dict[str, object], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        check_strategy(name, options)
