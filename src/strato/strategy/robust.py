"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, (multi-)Krum.

These need every update of the round at once, so they take a stacked ``(K, n)``
array and are not ``streaming``. They work column block by column block, so the
extra memory is ``O(K × block)``, not another copy of the stack.

- ``coordinate_median``: per coordinate, the median of the ``K`` values (Yin et al.
  2018); unweighted, as in Flower's FedMedian.
- ``trimmed_mean``: per coordinate, drop the ``⌊β·K⌋`` smallest and largest values
  and average the rest (Yin et al. 2018); unweighted.
- ``krum_select``: Krum (Blanchard et al. 2017) scores each update by the sum of
  squared distances to its ``K − f − 2`` nearest other updates and keeps the ``m``
  best; ``m = 1`` is Krum, ``m > 1`` multi-Krum, whose kept updates are averaged
  with their weights (as Flower does). Its guarantee needs ``K > 2f + 2``, which
  ``Krum.min_updates`` enforces. ``krum_select_from_distances`` is the same choice
  from a precomputed ``K × K`` distance matrix: squared distances add up over
  coordinates, so aggregators that each hold a slice of the coordinates can sum
  their partial matrices and choose without ever holding a whole update.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from strato.errors import ConfigError
from strato.strategy._base import F32, Strategy, check_float, check_int, check_stack
from strato.strategy.fedavg import weighted_mean

__all__ = [
    "FedMedian",
    "Krum",
    "TrimmedMean",
    "coordinate_median",
    "krum_select",
    "krum_select_from_distances",
    "pairwise_sq_distances",
    "trimmed_mean",
]

Stack = npt.NDArray[np.floating[Any]]
_BLOCK = 1 << 16  # columns per block: K × 64 Ki values of scratch


def _blocks(n: int) -> range:
    return range(0, n, _BLOCK)


def coordinate_median(stack: Stack) -> F32:
    """The coordinate-wise median of the rows of ``stack`` (float32)."""
    n = stack.shape[1]
    out = np.empty(n, dtype=np.float32)
    for lo in _blocks(n):
        hi = min(n, lo + _BLOCK)
        out[lo:hi] = np.median(stack[:, lo:hi].astype(np.float64), axis=0)
    return out


def trimmed_mean(stack: Stack, beta: float) -> F32:
    """Per coordinate, the mean after cutting the ``⌊β·K⌋`` lowest and highest values."""
    k, n = stack.shape
    cut = int(np.floor(beta * k))
    if k - 2 * cut < 1:
        raise ConfigError(f"trimmedmean: beta={beta} cuts every one of {k} updates")
    out = np.empty(n, dtype=np.float32)
    for lo in _blocks(n):
        hi = min(n, lo + _BLOCK)
        block = stack[:, lo:hi].astype(np.float64)
        if cut:
            block.partition((cut, k - cut - 1), axis=0)
        out[lo:hi] = block[cut : k - cut].mean(axis=0)
    return out


def pairwise_sq_distances(stack: Stack) -> npt.NDArray[np.float64]:
    """``D[i, j] = ‖x_i − x_j‖²`` for the rows of ``stack``, in float64.

    Built from Gram matrices of column blocks centred on their coordinate-wise
    median: the centring keeps ``‖a‖² + ‖b‖² − 2a·b`` from cancelling when the
    updates are close to each other but far from the origin (models always are).
    """
    k, n = stack.shape
    gram = np.zeros((k, k), dtype=np.float64)
    for lo in _blocks(n):
        hi = min(n, lo + _BLOCK)
        block = stack[:, lo:hi].astype(np.float64)
        block -= np.median(block, axis=0)
        gram += block @ block.T
    sq = np.diag(gram)
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_select(stack: Stack, f: int, m: int = 1) -> npt.NDArray[np.int64]:
    """Indices of the ``m`` updates with the lowest Krum scores (best first)."""
    _check_krum(stack.shape[0], f, m)
    return krum_select_from_distances(pairwise_sq_distances(stack), f, m)


def krum_select_from_distances(
    dist: npt.ArrayLike, f: int, m: int = 1
) -> npt.NDArray[np.int64]:
    """``krum_select`` given ``D[i, j] = ‖x_i − x_j‖²`` (``K × K``) instead of the stack."""
    d = np.array(dist, dtype=np.float64)  # a copy: its diagonal is overwritten below
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"krum: distances must be a square matrix, got shape {d.shape}")
    k = d.shape[0]
    _check_krum(k, f, m)
    np.fill_diagonal(d, np.inf)  # never count an update as its own neighbour
    closest = np.sort(d, axis=1)[:, : k - f - 2]
    scores = closest.sum(axis=1)
    return np.argsort(scores, kind="stable")[:m].astype(np.int64)


def _check_krum(k: int, f: int, m: int) -> None:
    if k - f - 2 < 1:
        raise ConfigError(f"krum: f={f} leaves no neighbours to score among {k} updates")
    if not 1 <= m <= k - f:
        raise ConfigError(f"krum: m={m} must be between 1 and K − f = {k - f}")


class FedMedian(Strategy):
    """The new global model is the coordinate-wise median of the updates."""

    name = "fedmedian"
    streaming = False

    def reduce(self, updates: npt.ArrayLike, weights: npt.ArrayLike) -> F32:
        stack, _ = check_stack(updates, weights, self.min_updates, self.name)
        return coordinate_median(stack)


class TrimmedMean(Strategy):
    """The new global model is the coordinate-wise ``beta``-trimmed mean of the updates."""

    name = "trimmedmean"
    streaming = False

    def __init__(self, *, beta: float = 0.1) -> None:
        self.beta = check_float(self.name, "beta", beta, low=0.0, high=0.5, high_open=True)

    def options(self) -> dict[str, float | int]:
        return {"beta": self.beta}

    def reduce(self, updates: npt.ArrayLike, weights: npt.ArrayLike) -> F32:
        stack, _ = check_stack(updates, weights, self.min_updates, self.name)
        return trimmed_mean(stack, self.beta)


class Krum(Strategy):
    """Krum (``m = 1``) or multi-Krum (``m > 1``) tolerating ``f`` Byzantine clients."""

    name = "krum"
    streaming = False

    def __init__(self, *, f: int = 1, m: int = 1) -> None:
        self.f = check_int(self.name, "f", f, low=0)
        self.m = check_int(self.name, "m", m, low=1)

    @property
    def min_updates(self) -> int:
        return max(2 * self.f + 3, self.f + self.m)

    def options(self) -> dict[str, float | int]:
        return {"f": self.f, "m": self.m}

    def reduce(self, updates: npt.ArrayLike, weights: npt.ArrayLike) -> F32:
        stack, w = check_stack(updates, weights, self.min_updates, self.name)
        chosen = krum_select(stack, self.f, self.m)
        if self.m == 1:
            return np.array(stack[chosen[0]], dtype=np.float32)
        return weighted_mean(stack[np.sort(chosen)], w[np.sort(chosen)])
