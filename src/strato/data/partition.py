"""Split a training set among clients: IID, Dirichlet label skew, label shards.

Every partitioner takes the labels (only their count matters for IID), a number of
clients and a seed, and returns one sorted int64 index array per client. The arrays
are disjoint and together cover every index exactly once; the same arguments always
give the same split. Impossible requests are a ``ConfigError``.

- ``iid``: a seeded permutation cut into near-equal parts.
- ``dirichlet`` (Hsu et al. 2019): for each label, the share of each client is drawn
  from Dir(α); small α gives each client few labels, large α approaches IID. Clients
  the draw leaves with fewer than ``min_size`` samples get samples moved to them from
  the largest clients, so every client has data.
- ``shards`` (McMahan et al. 2017): sort by label, cut into ``shards_per_client ×
  clients`` shards, deal each client ``shards_per_client`` at random. Shards here never
  straddle two labels (each label is cut into its own shards, in proportion to its
  size), so a client holds at most ``shards_per_client`` labels, as in the paper's
  intent; this needs at least as many shards as labels.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from strato.errors import ConfigError

__all__ = ["SCHEMES", "dirichlet", "iid", "partition", "shards"]

I64 = npt.NDArray[np.int64]
SCHEMES = ("iid", "dirichlet", "shards")


def _check(labels: npt.ArrayLike, num_clients: int) -> I64:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {y.shape}")
    if y.size and y.dtype.kind not in "iub":
        raise ConfigError(f"labels must be integers, got {y.dtype}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise ConfigError(f"number of clients must be an integer, got {num_clients!r}")
    if num_clients < 1:
        raise ConfigError(f"number of clients must be ≥ 1, got {num_clients}")
    if num_clients > y.shape[0]:
        raise ConfigError(f"cannot split {y.shape[0]} samples among {num_clients} clients")
    return y.astype(np.int64, copy=False)


def _finish(parts: list[I64]) -> list[I64]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: npt.ArrayLike, num_clients: int, *, seed: int = 0) -> list[I64]:
    """Uniformly random, near-equal parts (sizes differ by at most one)."""
    y = _check(labels, num_clients)
    order = np.random.default_rng(seed).permutation(y.shape[0])
    return _finish(np.array_split(order, num_clients))


def dirichlet(
    labels: npt.ArrayLike, num_clients: int, *, alpha: float = 0.5, seed: int = 0,
    min_size: int = 1,
) -> list[I64]:
    """Label skew: per label, client shares ~ Dir(alpha); each client ≥ ``min_size`` samples."""
    y = _check(labels, num_clients)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (
            np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"dirichlet alpha must be a positive number, got {alpha!r}")
    if min_size < 0 or num_clients * min_size > y.shape[0]:
        raise ConfigError(f"cannot give each of {num_clients} clients {min_size} of "
                          f"{y.shape[0]} samples")
    rng = np.random.default_rng(seed)
    owner = np.empty(y.shape[0], dtype=np.int64)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        sizes = np.diff(cuts, prepend=0, append=len(members))
        owner[members] = np.repeat(np.arange(num_clients), sizes)
    counts = np.bincount(owner, minlength=num_clients)
    # Top up starved clients from the currently largest one, a random sample at a time.
    for client in np.flatnonzero(counts < min_size):
        while counts[client] < min_size:
            donor = int(np.argmax(counts))
            pool = np.flatnonzero(owner == donor)
            owner[pool[rng.integers(len(pool))]] = client
            counts[donor] -= 1
            counts[client] += 1
    order = np.argsort(owner, kind="stable")
    return _finish(np.split(order, np.cumsum(counts)[:-1]))


def shards(
    labels: npt.ArrayLike, num_clients: int, *, shards_per_client: int = 2, seed: int = 0,
) -> list[I64]:
    """Each client gets ``shards_per_client`` single-label shards of near-equal size."""
    y = _check(labels, num_clients)
    if shards_per_client < 1:
        raise ConfigError(f"shards per client must be ≥ 1, got {shards_per_client}")
    total = num_clients * shards_per_client
    values, sizes = np.unique(y, return_counts=True)
    if total < len(values):
        raise ConfigError(f"shards: {num_clients} clients × {shards_per_client} shards = {total} "
                          f"shards cannot cover {len(values)} labels; use more clients "
                          f"or another partition")
    if total > y.shape[0]:
        raise ConfigError(f"shards: {total} shards of {y.shape[0]} samples would be empty")
    per_label = _apportion(sizes, total)
    rng = np.random.default_rng(seed)
    pieces: list[I64] = []
    for label, count in zip(values, per_label, strict=True):
        members = rng.permutation(np.flatnonzero(y == label))
        pieces.extend(np.array_split(members, int(count)))
    deal = rng.permutation(total).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in deal])


def _apportion(sizes: npt.NDArray[np.int64], total: int) -> npt.NDArray[np.int64]:
    """``total`` shards split among labels in proportion to their sizes: one each, then
    every further shard to the label whose shards are currently largest (never more
    shards than a label has samples)."""
    counts = np.ones(len(sizes), dtype=np.int64)
    for _ in range(total - len(sizes)):
        load = np.where(counts < sizes, sizes / counts, -1.0)
        counts[int(np.argmax(load))] += 1
    return counts


def partition(
    labels: npt.ArrayLike, num_clients: int, scheme: str = "iid", *, seed: int = 0,
    alpha: float = 0.5, shards_per_client: int = 2,
) -> list[I64]:
    """Dispatch to ``iid``, ``dirichlet`` (uses ``alpha``) or ``shards``."""
    name = str(scheme).strip().lower()
    if name == "iid":
        return iid(labels, num_clients, seed=seed)
    if name == "dirichlet":
        return dirichlet(labels, num_clients, alpha=alpha, seed=seed)
    if name == "shards":
        return shards(labels, num_clients, shards_per_client=shards_per_client, seed=seed)
    raise ConfigError(f"unknown partition {scheme!r} (valid: {', '.join(SCHEMES)})")
