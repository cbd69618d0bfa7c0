"""Top-k with error feedback: per-layer selection, nothing lost, server mean."""

from __future__ import annotations

import math

import numpy as np
import pytest

from _topk import TopKCompressor, apply_sparse_updates, topk_mask
from strato.errors import ConfigError, LayoutError
from strato.params import Params


def layout() -> Params:
    return Params.from_arrays({"w": np.zeros((6, 5), np.float32), "b": np.zeros(7, np.float32)})


def test_topk_mask_takes_the_largest_per_tensor() -> None:
    p = layout()
    values = np.random.default_rng(0).normal(size=p.layout.numel).astype(np.float32)
    values[30:] *= 1e-3  # a global top-k would never pick the small tensor
    mask = topk_mask(values, p.layout, 0.2)
    for spec in p.layout.tensors:
        seg, m = values[spec.offset // 4 : spec.end // 4], mask[spec.offset // 4 : spec.end // 4]
        k = math.ceil(0.2 * spec.numel)
        assert int(m.sum()) == k
        assert np.abs(seg[m]).min() >= np.abs(seg[~m]).max()


def test_error_feedback_loses_nothing() -> None:
    p = layout()
    comp = TopKCompressor(p.layout, 0.1)
    rng = np.random.default_rng(1)
    sent = np.zeros(p.layout.numel, np.float64)
    total = np.zeros(p.layout.numel, np.float64)
    for _ in range(20):
        update = rng.normal(size=p.layout.numel).astype(np.float32)
        mask, values = comp.compress(update)
        assert values.size == int(mask.sum()) == math.ceil(3.0) + math.ceil(0.7)
        sent[mask] += values
        total += update
    assert np.allclose(sent + comp.residual, total, atol=1e-4)
    assert np.abs(comp.residual).sum() > 0  # something is really being held back


def test_server_adds_the_weighted_mean_of_sparse_updates() -> None:
    p = layout()
    p.flat()[:] = 1.0
    n = p.layout.numel
    m1, m2 = np.zeros(n, bool), np.zeros(n, bool)
    m1[[0, 3]] = True
    m2[[3, 9]] = True
    out = apply_sparse_updates(p, [(m1, np.array([2.0, 4.0], np.float32), 1.0),
                                   (m2, np.array([8.0, 1.0], np.float32), 3.0)])
    expected = np.ones(n)
    expected[0] += 2.0 / 4
    expected[3] += (4.0 + 3 * 8.0) / 4
    expected[9] += 3 * 1.0 / 4
    assert np.allclose(out.flat(), expected) and np.all(p.flat() == 1.0)


def test_bad_arguments() -> None:
    p = layout()
    with pytest.raises(ConfigError):
        TopKCompressor(p.layout, 0.0)
    with pytest.raises(LayoutError):
        TopKCompressor(p.layout, 0.5).compress(np.zeros(3, np.float32))
    with pytest.raises(ConfigError):
        apply_sparse_updates(p, [])
