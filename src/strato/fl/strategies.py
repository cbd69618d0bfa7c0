"""A round's aggregation state inside the aggregator function, for any strategy.

Streaming strategies (FedAvg and the server optimisers built on its mean) add each
update into a warm ``Accumulator`` as it arrives; robust ones (median, trimmed
mean, Krum) need every update at once and keep them until the round closes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from strato.params import Layout
from strato.strategy import make_strategy
from strato.strategy.fedavg import Accumulator

__all__ = ["RoundAggregator", "check_strategy"]

F32 = npt.NDArray[np.float32]


def check_strategy(name: str, options: dict[str, Any]) -> None:
    """Raise ConfigError (one line) for an unknown strategy or a bad option."""
    make_strategy(name, **options)


class RoundAggregator:
    def __init__(self, name: str, options: dict[str, Any], layout: Layout, round_: int) -> None:
        self.strategy = make_strategy(name, **options)
        self.round = round_
        self.clients: set[str] = set()
        self._acc = Accumulator(layout.numel) if self.strategy.streaming else None
        self._kept: list[F32] = []
        self._weights: list[float] = []

    def reset(self, round_: int) -> None:
        """Start another round, keeping the warm accumulator buffer."""
        self.round = round_
        self.clients.clear()
        if self._acc is not None:
            self._acc.reset()
        self._kept.clear()
        self._weights.clear()

    def add(self, client: str, flat: F32, weight: float) -> None:
        if client in self.clients:
            return
        if self._acc is not None:
            self._acc.add(flat, weight)  # eager: the update is not kept
        else:
            self._kept.append(np.array(flat, dtype=np.float32))
            self._weights.append(weight)
        self.clients.add(client)

    def finish(
        self, global_flat: F32, state: dict[str, npt.NDArray[Any]]
    ) -> tuple[F32, dict[str, npt.NDArray[Any]]]:
        """The new global model and the strategy's new state.

        With fewer updates than the strategy needs (none at all, or too few for
        Krum's guarantee), the global model stays as it was.
        """
        if len(self.clients) < max(1, self.strategy.min_updates):
            return np.array(global_flat, dtype=np.float32), state
        self.strategy.load_state_dict(state)
        if self._acc is not None:
            reduced = self._acc.result()
        else:
            reduced = self.strategy.reduce(np.stack(self._kept), np.asarray(self._weights))
        new = self.strategy.step(np.array(global_flat, dtype=np.float32), reduced)
        return new, self.strategy.state_dict()
