"""Asynchronous FL (FedBuff-style buffered aggregation), as pure policies.

In ``mode = "async"`` there is no round barrier. ``concurrency`` clients train at once;
each starts from the newest model (version v) and its update is added, as it arrives,
into the open buffer, whatever version that buffer will make: an update that started
from version ``b`` and lands in the buffer that makes version ``v + 1`` is ``v - b``
versions stale. Every ``buffer`` updates the root applies the server step and
publishes the next version; an update staler than ``max_staleness`` is refused.

Each update is weighted by its examples times a staleness weight (Xie et al., 2019,
"Asynchronous Federated Optimization"), ``s`` versions stale:

=================  ==========================================================
``constant``       1
``polynomial``     (1 + s) ** -a
``hinge``          1 when s <= b, else 1 / (a (s - b) + 1)
=================  ==========================================================

The engine sums ``w_i x_i`` over the buffer's trained models ``x_i``; what the
server step needs is the mean *change*, each update against the model it started
from. Since ``sum w_i (x_i - x_{b_i}) = sum w_i x_i - sum_b W_b x_b`` (``W_b`` the
buffer's weight that started from version ``b``), the root subtracts a weighted sum
of at most ``max_staleness + 1`` stored models once, at the close: the buffer's
"mean" handed to the strategy is ``x_v + (sum w_i x_i - sum_b W_b x_b) / W``, which is
FedAvg's weighted mean exactly when nothing is stale.

Which client trains next (``next_client``) is a seeded draw among the clients that are
neither training nor already in the open buffer: reproducible, and never the same
client twice at once.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RULES", "STALE", "Staleness", "next_client", "speed_factor", "staleness_weight"]

RULES = ("constant", "polynomial", "hinge")
STALE = "stale"  # how a refusal for staleness starts


@dataclass(frozen=True)
class Staleness:
    rule: str = "polynomial"
    a: float = 0.5  # the exponent (polynomial) or the slope (hinge)
    b: int = 4  # hinge: how stale an update may be before its weight falls
    max_staleness: int = 10  # staler updates are refused

    def weight(self, s: int) -> float:
        return staleness_weight(s, self.rule, self.a, self.b)

    def refusal(self, base: int, open_round: int) -> str | None:
        """Why an update sent round ``base``'s notice (it started from version
        ``base - 1``) may not go into round ``open_round``'s buffer (None: it may).
        The aggregator and the gateway (before it reads a byte) both ask this."""
        stale = open_round - base
        if base < 1 or stale < 0:
            return f"round {base} does not exist"
        if stale > self.max_staleness:
            return (f"{STALE}: it started from version {base - 1}, {stale} versions behind "
                    f"the open buffer (max_staleness {self.max_staleness})")
        return None


def staleness_weight(s: int, rule: str = "polynomial", a: float = 0.5, b: int = 4) -> float:
    """The weight of an update ``s`` versions stale (``s`` >= 0) under ``rule``."""
    if s < 0:
        raise ValueError(f"staleness cannot be negative, got {s}")
    if rule == "constant":
        return 1.0
    if rule == "polynomial":
        return float((1.0 + s) ** -a)
    if rule == "hinge":
        return 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)
    raise ValueError(f"unknown staleness rule {rule!r} (choose from {', '.join(RULES)})")


def next_client(seed: int, draw: int, pool: list[str], busy: set[str]) -> str | None:
    """The client that trains next: the ``draw``-th seeded pick among ``pool`` minus
    ``busy`` (None when every client is busy)."""
    free = sorted(set(pool) - busy)
    if not free:
        return None
    rng = np.random.default_rng([seed, draw])
    return free[int(rng.integers(len(free)))]


def speed_factor(spec: str, seed: int, client: str) -> float:
    """A client's slowness for simulated heterogeneity: ``""`` (none: 0), or
    ``"lognormal:SIGMA"``: exp(SIGMA * z), z a standard normal drawn from (seed, client).
    The client waits ``factor`` times its training time after training, so its round
    takes ``1 + factor`` times as long as the training itself."""
    if not spec:
        return 0.0
    kind, _, arg = spec.partition(":")
    if kind != "lognormal":
        raise ValueError(f"unknown speed distribution {spec!r} (use 'lognormal:SIGMA')")
    try:
        sigma = float(arg)
    except ValueError:
        raise ValueError(f"speed {spec!r}: SIGMA must be a number") from None
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"speed {spec!r}: SIGMA must be a non-negative number")
    digest = hashlib.sha256(f"speed/{seed}/{client}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return float(np.exp(sigma * rng.standard_normal()))
