"""The Complement Sparsification server of the sparsity benchmark, as plain state.

``strato run --strategy cs`` aggregates through the aggregation engine
(``strato.fl.aggregator``); this class keeps a whole CS server in one object so the
benchmark can drive many runs in one process. It uses the same math
(``strato.strategy.complement``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from strato.errors import ConfigError, LayoutError
from strato.params import Params
from strato.strategy.complement import (
    F32,
    ComplementConfig,
    Mask,
    kernel_positions,
    merge,
    merge_kept,
    prune,
    upload_positions,
)

__all__ = ["ComplementServer"]


def _flat(params: Params) -> F32:
    return params.flat("F32") if params.layout.tensors else np.zeros(0, np.float32)


class ComplementServer:
    """The server half. ``model``/``keep`` are what goes to the clients this round."""

    def __init__(self, initial: Params, config: ComplementConfig | None = None) -> None:
        if initial.layout.tensors and initial.layout.dtype() != "F32":
            raise LayoutError("complement sparsification needs all-float32 tensors")
        self.config = config or ComplementConfig()
        self.model = initial.copy()
        self.keep: Mask | None = None  # None while the model is dense (round 1)
        self.dense: Params = initial.copy()  # w_dense before the last pruning
        self.kernels = kernel_positions(initial.layout)

    def upload_mask(self) -> Mask | None:
        """Positions each client uploads this round (None: every position)."""
        if self.keep is None or self.config.kept_rate is not None:
            return None
        return upload_positions(self.model, self.kernels)

    def aggregate(self, uploads: Iterable[tuple[F32, float]]) -> None:
        """Merge ``(values, num_examples)`` uploads of this round, then re-prune.

        ``values`` are trained weights at ``upload_mask()``'s positions, in layout order.
        """
        mask = self.upload_mask()
        width = self.model.layout.numel if mask is None else int(mask.sum())
        total = np.zeros(width, np.float64)
        weight = 0.0
        for values, n in uploads:
            if values.shape != (width,):
                raise LayoutError(f"upload has {values.size} values, this round expects {width}")
            if n <= 0:
                raise ConfigError(f"upload weight must be positive, got {n}")
            total += float(n) * values
            weight += float(n)
        if weight == 0.0:
            raise ConfigError("a round needs at least one upload to aggregate")
        mean = total / weight
        dense = self.model.copy()
        flat = _flat(dense)
        if self.keep is None:
            flat[:] = mean  # round 1: plain FedAvg
        elif mask is None:  # kept_rate mode: every position came back
            assert self.config.kept_rate is not None
            flat[:] = merge_kept(flat, mean, self.kernels, self.config.eta,
                                 self.config.kept_rate, self.keep)
        else:
            full = np.zeros(flat.size, np.float64)
            full[mask] = mean
            flat[:] = merge(flat, full, self.kernels, self.config.eta)
        self.dense = dense
        self.model, self.keep = prune(dense, self.config.sparsity)
