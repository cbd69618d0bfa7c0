"""Partitioners: disjoint covers, determinism, label skew, shards, impossible requests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strato.data import dirichlet, iid, partition, shards
from strato.errors import ConfigError


def mnist_like_labels(n: int = 6000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(10, size=n, p=np.linspace(0.8, 1.2, 10) / 10.0).astype(np.int64)


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's and the global label mix."""
    k = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - overall).sum()
                          for p in parts]))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(20, 400),
    clients=st.integers(1, 10),
    scheme=st.sampled_from(["iid", "dirichlet", "shards"]),
    alpha=st.floats(0.05, 50.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_scheme_is_a_disjoint_cover(n: int, clients: int, scheme: str, alpha: float,
                                          seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, 4, n)
    if scheme == "shards" and 2 * clients < len(np.unique(labels)):
        with pytest.raises(ConfigError):
            partition(labels, clients, scheme, seed=seed)
        return
    parts = partition(labels, clients, scheme, seed=seed, alpha=alpha)
    assert len(parts) == clients
    assert all(len(p) >= 1 for p in parts)
    assert_disjoint_cover(parts, n)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_same_seed_same_split_other_seed_other_split(scheme: str) -> None:
    labels = mnist_like_labels()
    a = partition(labels, 50, scheme, seed=3)
    b = partition(labels, 50, scheme, seed=3)
    c = partition(labels, 50, scheme, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_is_balanced_and_unskewed() -> None:
    labels = mnist_like_labels()
    parts = iid(labels, 30, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(labels, parts) < 0.15


def test_shards_give_at_most_two_labels_per_client() -> None:
    labels = mnist_like_labels()
    parts = shards(labels, 100, seed=0)
    assert_disjoint_cover(parts, len(labels))
    assert max(len(np.unique(labels[p])) for p in parts) <= 2
    sizes = [len(p) for p in parts]
    assert max(sizes) <= 1.5 * min(sizes)  # near-equal shards, as in the FedAvg paper
    assert len(np.unique(labels[np.concatenate(parts[:10])])) > 2  # yet the labels spread
    three = shards(labels, 20, shards_per_client=3, seed=1)
    assert max(len(np.unique(labels[p])) for p in three) <= 3


def test_dirichlet_skew_is_measurable_and_follows_alpha() -> None:
    labels = mnist_like_labels()
    skew = {alpha: label_skew(labels, dirichlet(labels, 40, alpha=alpha, seed=0))
            for alpha in (0.1, 1.0, 100.0)}
    iid_skew = label_skew(labels, iid(labels, 40, seed=0))
    assert skew[0.1] > 0.5 > skew[100.0]
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < iid_skew + 0.1


def test_dirichlet_leaves_no_client_empty() -> None:
    labels = mnist_like_labels(300)
    parts = dirichlet(labels, 100, alpha=0.01, seed=0)
    assert min(len(p) for p in parts) >= 1
    assert_disjoint_cover(parts, 300)
    parts = dirichlet(labels, 30, alpha=0.01, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda y: iid(y, 101), "cannot split 100 samples among 101"),
        (lambda y: iid(y, 0), "≥ 1"),
        (lambda y: dirichlet(y, 5, alpha=0.0), "alpha"),
        (lambda y: dirichlet(y, 50, min_size=3), "cannot give"),
        (lambda y: shards(y, 4), "cannot cover 10 labels"),
        (lambda y: shards(y, 60), "would be empty"),
        (lambda y: partition(y, 5, "quantity"), "unknown partition"),
        (lambda y: iid(y.reshape(10, 10), 2), "one-dimensional"),
        (lambda y: iid(y.astype(np.float32), 2), "integers"),
    ],
)
def test_impossible_requests_are_config_errors(
    call: Callable[[np.ndarray], object], match: str
) -> None:
    labels = np.arange(100) % 10
    with pytest.raises(ConfigError, match=match):
        call(labels)
