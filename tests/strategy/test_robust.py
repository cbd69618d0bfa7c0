"""Robust strategies: numpy references, hand-computed Krum, and poisoned rounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from strato.errors import ConfigError
from strato.strategy import make_strategy
from strato.strategy.robust import (
    _BLOCK,
    coordinate_median,
    krum_select,
    krum_select_from_distances,
    pairwise_sq_distances,
    trimmed_mean,
)


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_median_and_trimmed_mean_match_numpy_across_blocks(k: int) -> None:
    rng = np.random.default_rng(k)
    stack = rng.standard_normal((k, _BLOCK + 37)).astype(np.float32)
    np.testing.assert_allclose(coordinate_median(stack), np.median(stack, axis=0), rtol=1e-6)
    for beta in (0.0, 0.2, 0.4):
        cut = int(np.floor(beta * k))
        expected = np.sort(stack, axis=0)[cut : k - cut].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(trimmed_mean(stack, beta), expected, rtol=1e-6, atol=1e-7)


def test_krum_by_hand() -> None:
    # Five 1-D updates, f = 1: each is scored on its K − f − 2 = 2 nearest others.
    stack = np.array([[0.0], [1.0], [2.0], [4.0], [10.0]], np.float32)
    # scores: 0 → 1+4=5, 1 → 1+1=2, 2 → 1+4=5, 4 → 4+9=13, 10 → 36+64=100
    assert krum_select(stack, f=1).tolist() == [1]
    assert krum_select(stack, f=1, m=3).tolist() == [1, 0, 2]  # ties keep input order
    multi = make_strategy("krum", f=1, m=2).reduce(stack, [3.0, 1.0, 5.0, 1.0, 1.0])
    assert multi[0] == pytest.approx(0.25)  # chosen 0.0 (weight 3) and 1.0 (weight 1)


def test_pairwise_distances_survive_a_large_common_offset() -> None:
    rng = np.random.default_rng(3)
    stack = (1e4 + rng.standard_normal((6, 5000)) * 1e-3).astype(np.float32)
    exact = np.array([[np.sum((a.astype(np.float64) - b) ** 2) for b in stack] for a in stack])
    np.testing.assert_allclose(pairwise_sq_distances(stack), exact, rtol=1e-9, atol=1e-12)


def poisoned_round(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10 updates: 8 honest around a common model, 2 replaced by 1e6-scale noise."""
    rng = np.random.default_rng(seed)
    center = rng.standard_normal(2000).astype(np.float32)
    stack = center + 0.05 * rng.standard_normal((10, 2000)).astype(np.float32)
    for i in (3, 7):
        stack[i] = rng.standard_normal(2000).astype(np.float32) * 1e6
    honest_mean = np.delete(stack, (3, 7), axis=0).astype(np.float64).mean(axis=0)
    return stack, np.full(10, 100.0), honest_mean


@pytest.mark.parametrize(
    ("name", "options"),
    [("fedmedian", {}), ("trimmedmean", {"beta": 0.2}), ("krum", {"f": 2}),
     ("krum", {"f": 2, "m": 4})],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_robust_strategies_tolerate_poisoned_updates(
    name: str, options: dict[str, float], seed: int
) -> None:
    stack, weights, honest = poisoned_round(seed)
    glob = np.zeros(stack.shape[1], np.float32)
    robust = make_strategy(name, **options).aggregate(glob, stack, weights)
    plain = make_strategy("fedavg").aggregate(glob, stack, weights)
    assert np.max(np.abs(robust - honest)) < 0.2
    assert np.max(np.abs(plain - honest)) > 1e4  # FedAvg is dragged away


def test_krum_never_picks_a_poisoned_update() -> None:
    stack, _, _ = poisoned_round(2)
    for f, m in itertools.product((2, 3), (1, 3, 5)):
        chosen = set(krum_select(stack, f=f, m=m).tolist())
        assert not chosen & {3, 7}, (f, m, chosen)


def test_robust_options_and_minimum_updates() -> None:
    with pytest.raises(ConfigError, match="beta"):
        make_strategy("trimmedmean", beta=0.5)
    with pytest.raises(ConfigError, match="integer"):
        make_strategy("krum", f=1.5)
    krum = make_strategy("krum", f=2)
    assert krum.min_updates == 7 and not krum.streaming
    with pytest.raises(ConfigError, match="at least 7"):
        krum.reduce(np.zeros((6, 3), np.float32), np.ones(6))
    single = make_strategy("fedmedian").reduce(np.ones((1, 3), np.float32), [1.0])
    assert single.tolist() == [1, 1, 1]


def test_krum_select_from_distances_matches_krum_select() -> None:
    rng = np.random.default_rng(4)
    stack = rng.standard_normal((9, 300)).astype(np.float32)
    dist = pairwise_sq_distances(stack)
    before = dist.copy()
    for f, m in ((1, 1), (2, 3), (3, 6)):
        assert krum_select_from_distances(dist, f, m).tolist() == krum_select(stack, f, m).tolist()
    np.testing.assert_array_equal(dist, before)  # the caller's matrix is left alone
    # distances add over coordinates: partial matrices of column slices sum to the whole
    parts = sum(pairwise_sq_distances(stack[:, lo : lo + 100]) for lo in (0, 100, 200))
    assert krum_select_from_distances(parts, 2, 3).tolist() == krum_select(stack, 2, 3).tolist()
    with pytest.raises(ValueError, match="square"):
        krum_select_from_distances(np.zeros((3, 4)), 0)
    with pytest.raises(ConfigError, match="neighbours"):
        krum_select_from_distances(np.zeros((4, 4)), 2)
