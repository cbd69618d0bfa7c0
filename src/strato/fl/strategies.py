"""A round's aggregation state inside the aggregator function, for any strategy.

Streaming strategies (FedAvg and the server optimisers built on its mean) add each
update into a warm ``Accumulator`` as it arrives; robust ones (median, trimmed
mean, Krum) need every update at once and keep them until the round closes.

Complement Sparsification (``cs``, ``strato.strategy.complement``) is streaming too,
but its updates and models travel differently: from round 2 on a client uploads only
its complement and biases (a ``shared``-mask wire payload, decoded here against the
sparse model of the previous round), and every new global model is pruned and also
written as a sparse download (``download_key``) that the clients fetch instead of
the dense model blob. The dense blob stays the run's record of ``w_s`` (evaluation,
resume, clients that know nothing of CS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.codec import decode
from strato.errors import ConfigError
from strato.params import Layout, Params
from strato.strategy import make_strategy
from strato.strategy.complement import (
    ComplementConfig,
    decode_upload,
    encode_download,
    kernel_positions,
    merge,
    prune_flat,
)
from strato.strategy.fedavg import Accumulator

__all__ = [
    "COMPLEMENT_NAMES",
    "RoundAggregator",
    "check_strategy",
    "complement_config",
    "download_key",
    "is_complement",
]

F32 = npt.NDArray[np.float32]

COMPLEMENT_NAMES = ("cs", "complement")


def is_complement(name: str) -> bool:
    return str(name).strip().lower() in COMPLEMENT_NAMES


def complement_config(options: dict[str, Any]) -> ComplementConfig:
    """CS options (``sparsity``, ``eta``), checked; ConfigError (one line) otherwise."""
    accepted = ("sparsity", "eta")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"strategy cs: unknown option {', '.join(unknown)} "
                          f"(accepted: {', '.join(accepted)})")
    return ComplementConfig(**options)


def check_strategy(name: str, options: dict[str, Any]) -> None:
    """Raise ConfigError (one line) for an unknown strategy or a bad option."""
    if is_complement(name):
        complement_config(options)
    else:
        make_strategy(name, **options)


def download_key(model_key: str) -> str:
    """Where the sparse download of the model blob ``model_key`` lives (CS runs)."""
    return model_key.removesuffix(".safetensors") + ".sparse"


class RoundAggregator:
    def __init__(self, name: str, options: dict[str, Any], layout: Layout, round_: int) -> None:
        self.layout = layout
        self.round = round_
        self.complement = complement_config(options) if is_complement(name) else None
        self.strategy = None if self.complement else make_strategy(name, **options)
        self.clients: set[str] = set()
        streaming = self.strategy is None or self.strategy.streaming
        self._acc = Accumulator(layout.numel) if streaming else None
        self._kept: list[F32] = []
        self._weights: list[float] = []
        self._w_s: Params | None = None  # CS: the sparse model this round's clients received
        self._kernels = kernel_positions(layout) if self.complement else None

    def reset(self, round_: int) -> None:
        """Start another round, keeping the warm accumulator buffer."""
        self.round = round_
        self.clients.clear()
        if self._acc is not None:
            self._acc.reset()
        self._kept.clear()
        self._weights.clear()
        self._w_s = None

    def decode_update(self, payload: Any, previous: Callable[[], Params]) -> Params:
        """An uploaded update as a full-length model in the job's layout.

        ``previous`` loads the round's input model (needed only by CS after round 1,
        whose uploads are complements of it). Raises CodecError / LayoutError.
        """
        if self.complement is None or self.round == 1:
            return decode(payload, expect=self.layout)
        if self._w_s is None:
            self._w_s = previous()
        flat = decode_upload(payload, self._w_s)
        return Params(self.layout, flat.view(np.uint8))

    def add(self, client: str, flat: F32, weight: float) -> None:
        if client in self.clients:
            return
        if self._acc is not None:
            self._acc.add(flat, weight)  # eager: the update is not kept
        else:
            self._kept.append(np.array(flat, dtype=np.float32))
            self._weights.append(weight)
        self.clients.add(client)

    @property
    def min_updates(self) -> int:
        return 1 if self.strategy is None else self.strategy.min_updates

    def finish(
        self, global_flat: F32, state: dict[str, npt.NDArray[Any]]
    ) -> tuple[F32, dict[str, npt.NDArray[Any]]]:
        """The new global model and the strategy's new state.

        With fewer updates than the strategy needs (none at all, or too few for
        Krum's guarantee), the global model stays as it was.
        """
        if len(self.clients) < max(1, self.min_updates):
            return np.array(global_flat, dtype=np.float32), state
        if self.complement is not None:
            return self._complement_step(global_flat), {}
        assert self.strategy is not None
        self.strategy.load_state_dict(state)
        if self._acc is not None:
            reduced = self._acc.result()
        else:
            reduced = self.strategy.reduce(np.stack(self._kept), np.asarray(self._weights))
        new = self.strategy.step(np.array(global_flat, dtype=np.float32), reduced)
        return new, self.strategy.state_dict()

    def _complement_step(self, w_s: F32) -> F32:
        """Round 1: FedAvg of dense models; later: ``w_s + η·a``; then prune per layer."""
        assert self.complement is not None and self._acc is not None
        assert self._kernels is not None
        mean = self._acc.result()
        if self.round == 1:
            dense = np.array(mean, dtype=np.float32)
        else:
            dense = merge(np.asarray(w_s, dtype=np.float32), mean, self._kernels,
                          self.complement.eta)
        prune_flat(dense, self.layout, self.complement.sparsity)
        return dense

    def download_payload(self, model: Params) -> bytes | None:
        """CS: the sparse download of the round's new model; None for other strategies."""
        if self.complement is None:
            return None
        return encode_download(model).payload
