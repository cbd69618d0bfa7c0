"""A round's strategy inside the aggregator function: decoding uploads and the server step.

The sums themselves are the aggregation engine's (``strato.aggregation``): streaming
strategies (FedAvg, FedAvgM/FedOpt, FedProx, CS) get the weighted mean of the round's
updates from the engine's tree and apply their server step to it here
(``RoundAggregator.step``); robust ones (median, trimmed mean, Krum) are reduced by
the engine's coordinate-sharded aggregators and stepped here (``robust_step``).

Complement Sparsification (``cs``, ``strato.strategy.complement``) is streaming too,
but its updates and models travel differently: from round 2 on a client uploads only
its complement and biases (a ``shared``-mask wire payload, decoded here against the
sparse model of the previous round), and every new global model is pruned and also
written as a sparse download (``download_key``) that the clients fetch instead of
the dense model blob. The dense blob stays the run's record of ``w_s`` (evaluation,
resume, clients that know nothing of CS).

CS options beyond ``sparsity``/``eta`` choose the wire (``ComplementWire``): ``bits``
(32, 8, 4), ``zstd`` (level, 0 = off) and ``kept_rate`` (kept weights learn; uploads
become dense deltas). ``cs-combined`` is CS with the combined mode's defaults
(``COMBINED_DEFAULTS``); options given with it override them. With a quantized round 1
the initial model the clients decode is what the run records and the server starts
from (``initial_download``); from round 2 deltas are added to the exact ``w_s``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.codec import decode
from strato.errors import ConfigError
from strato.params import Layout, Params
from strato.strategy import make_strategy
from strato.strategy._kernels import _readonly as readonly
from strato.strategy.complement import (
    ComplementConfig,
    kernel_positions,
    merge,
    merge_kept,
    prune_flat,
)
from strato.strategy.complement_wire import ComplementWire, is_wire_payload

__all__ = [
    "COMBINED_DEFAULTS",
    "COMPLEMENT_NAMES",
    "ComplementOptions",
    "RoundAggregator",
    "check_strategy",
    "complement_options",
    "download_key",
    "initial_download",
    "is_complement",
    "wire_seed",
]

F32 = npt.NDArray[np.float32]

COMPLEMENT_NAMES = ("cs", "complement", "cs-combined")
# The combined mode of docs/sparsity.md (benchmarks/sparsity.py's "combined"), with the
# eta and kept rate its validation tuning chose (benchmarks/results/sparsity/tuning.json).
COMBINED_DEFAULTS: dict[str, Any] = {
    "sparsity": 0.5, "eta": 4.0, "bits": 4, "zstd": 19, "kept_rate": 0.5,
}
_OPTIONS = ("sparsity", "eta", "bits", "zstd", "kept_rate")
_INSTALL = "pip install 'strato[compress]'"


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def is_complement(name: str) -> bool:
    return _key(name) in {_key(n) for n in COMPLEMENT_NAMES}


def is_combined(name: str) -> bool:
    return _key(name) == "cscombined"


@dataclass(frozen=True)
class ComplementOptions:
    """A CS run's checked options: the algorithm and what goes on the wire."""

    config: ComplementConfig
    wire: ComplementWire


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"strategy cs: option {name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, allowed: str) -> int:
    number = _number(name, value)
    if not number.is_integer():
        raise ConfigError(f"strategy cs: option {name} must be {allowed}, got {value!r}")
    return int(number)


def _zstd_available() -> bool:
    try:
        import zstandard  # noqa: F401  (only checking that the optional package is there)
    except ImportError:
        return False
    return True


def complement_options(options: dict[str, Any], name: str = "cs") -> ComplementOptions:
    """CS options checked (``name`` = cs or cs-combined); ConfigError (one line) otherwise."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"strategy {name}: unknown option {', '.join(unknown)} "
                          f"(accepted: {', '.join(_OPTIONS)})")
    given = {**(COMBINED_DEFAULTS if is_combined(name) else {}), **options}
    sparsity = _number("sparsity", given.get("sparsity", ComplementConfig.sparsity))
    eta = _number("eta", given.get("eta", ComplementConfig.eta))
    bits = _integer("bits", given.get("bits", 32), "32, 8 or 4")
    if bits not in (32, 8, 4):
        raise ConfigError(f"strategy cs: option bits must be 32, 8 or 4, got {bits}")
    level = _integer("zstd", given.get("zstd", 0), "a level from 1 to 22, or 0 for off")
    if not 0 <= level <= 22:
        raise ConfigError(f"strategy cs: option zstd must be a level from 1 to 22, "
                          f"or 0 for off, got {level}")
    kept = given.get("kept_rate")
    kept_rate = None if kept is None else _number("kept_rate", kept)
    if kept_rate is not None and kept_rate < 0:
        raise ConfigError(f"strategy cs: option kept_rate must be positive "
                          f"(or 0: kept weights frozen, as in faithful CS), got {kept_rate}")
    config = ComplementConfig(sparsity, eta, kept_rate or None)
    if level and not _zstd_available():
        raise ConfigError(f"strategy cs: option zstd needs the optional 'zstandard' "
                          f"package: {_INSTALL}")
    return ComplementOptions(config, ComplementWire.build(bits, level or None, config.kept_rate))


def wire_seed(seed: int, round_: int, who: str) -> int:
    """The stochastic-rounding seed of one payload: round ``round_``'s download
    (``who`` = "download") or client ``who``'s upload in that round."""
    digest = hashlib.sha256(f"wire/{seed}/{round_}/{who}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def initial_download(
    name: str, options: dict[str, Any], seed: int, initial: Params
) -> tuple[Params, bytes | None]:
    """The run's round-0 model and, for CS with a coded round 1, the download clients
    fetch in round 1. A quantized round 1 returns what the clients decode: the run
    records it as the initial model, so their deltas apply to the model they got."""
    if not is_complement(name):
        return initial, None
    wire = complement_options(options, name).wire
    if wire.first_down is None:
        return initial, None
    return wire.adopt(initial, wire_seed(seed, 1, "download"))


def check_strategy(name: str, options: dict[str, Any], max_update_norm: float = 0.0,
                   mode: str = "sync") -> None:
    """Raise ConfigError (one line) for an unknown strategy, a bad option, a norm
    bound the strategy cannot take, or a strategy async mode cannot run."""
    if is_complement(name):
        complement_options(options, name)
        streaming = False
    else:
        streaming = make_strategy(name, **options).streaming
    if max_update_norm > 0 and not streaming:
        why = ("its uploads are coded: the leaves cannot measure them" if is_complement(name)
               else "it is robust without it")  # fmt: skip
        raise ConfigError(
            "max_update_norm bounds the updates of a weighted mean (fedavg and the "
            f"strategies built on it), not {name}'s: {why}"
        )
    if mode == "async" and (not streaming or max_update_norm > 0):
        what = ("max_update_norm (the distance of an update from a model it may not "
                "have started from)" if streaming else name)
        raise ConfigError(
            f"async mode adds each update to a buffer as it arrives, against the model it "
            f"started from: it runs fedavg and the strategies built on it (fedavgm, "
            f"fedadam, fedyogi, fedadagrad, fedprox), not {what}")


def download_key(model_key: str) -> str:
    """Where the sparse download of the model blob ``model_key`` lives (CS runs)."""
    return model_key.removesuffix(".safetensors") + ".sparse"


class RoundAggregator:
    def __init__(self, name: str, options: dict[str, Any], layout: Layout, round_: int,
                 seed: int = 0) -> None:
        self.layout = layout
        self.round = round_
        self.seed = seed  # the run's: seeds the stochastic rounding of CS downloads
        cs = complement_options(options, name) if is_complement(name) else None
        self.complement = None if cs is None else cs.config
        self.wire = None if cs is None else cs.wire
        self.strategy = None if self.complement else make_strategy(name, **options)
        self._w_s: Params | None = None  # CS: the sparse model this round's clients received
        self._kernels = kernel_positions(layout) if self.complement else None

    @property
    def streaming(self) -> bool:
        """The server step needs only the weighted mean of the updates."""
        return self.strategy is None or self.strategy.streaming

    @property
    def coded(self) -> bool:
        """Uploads are CS wire payloads that need decoding (not plain safetensors)."""
        return self.wire is not None

    def reset(self, round_: int) -> None:
        """Start another round (the next round's CS input model is loaded afresh)."""
        self.round = round_
        self._w_s = None

    def decode_update(self, payload: Any, previous: Callable[[], Params]) -> Params:
        """An uploaded update as a full-length model in the job's layout.

        ``previous`` loads the round's input model (needed only by CS: its uploads
        after round 1 are complements of it, and deltas are added to it). For CS the
        result is in model space (``ComplementWire.decode_upload``). Raises CodecError
        / LayoutError.
        """
        first = self.round == 1
        if self.wire is None or (first and not is_wire_payload(payload)):
            return decode(payload, expect=self.layout)
        if self._w_s is None:
            self._w_s = previous()
        flat = self.wire.decode_upload(payload, self._w_s, first)
        return Params(self.layout, flat.view(np.uint8))

    @property
    def min_updates(self) -> int:
        return 1 if self.strategy is None else self.strategy.min_updates

    def step(
        self, global_flat: F32, mean: npt.NDArray[Any], state: dict[str, npt.NDArray[Any]]
    ) -> tuple[F32, dict[str, npt.NDArray[Any]]]:
        """A streaming strategy's new global model from the round's weighted ``mean``, and
        the strategy's new state."""
        if self.complement is not None:
            return self._complement_step(global_flat, mean), {}
        assert self.strategy is not None
        self.strategy.load_state_dict(state)
        # read-only views, no copies: a server step makes its own output (FedAvg's is
        # the mean itself), and 40 MB of fresh memory costs more than the step
        new = self.strategy.step(_f32_readonly(global_flat), _f32_readonly(mean))
        return new, self.strategy.state_dict()

    def robust_step(
        self, global_flat: F32, reduced: npt.NDArray[Any] | None, updates: int,
        state: dict[str, npt.NDArray[Any]],
    ) -> tuple[F32, dict[str, npt.NDArray[Any]]]:
        """A robust strategy's new global model from its reduction of the round's
        updates (the sharded aggregators' result). With fewer updates than it needs
        (none, or too few for Krum's guarantee), the model stays."""
        assert self.strategy is not None
        if reduced is None or updates < max(1, self.min_updates):
            return np.array(global_flat, dtype=np.float32), state
        self.strategy.load_state_dict(state)
        new = self.strategy.step(_f32_readonly(global_flat), _f32_readonly(reduced))
        return new, self.strategy.state_dict()

    def _complement_step(self, w_s: F32, mean: npt.NDArray[Any]) -> F32:
        """Round 1: FedAvg of dense models; later: ``w_s + η·a`` (and, with kept_rate,
        kept weights move by kept_rate times their mean change); then prune per layer."""
        cfg = self.complement
        assert cfg is not None and self._kernels is not None
        w_s = np.asarray(w_s, dtype=np.float32)
        if self.round == 1:
            dense = np.array(mean, dtype=np.float32)
        elif cfg.kept_rate is None:
            dense = merge(w_s, mean, self._kernels, cfg.eta)
        else:
            dense = merge_kept(w_s, mean, self._kernels, cfg.eta, cfg.kept_rate)
        prune_flat(dense, self.layout, cfg.sparsity)
        return dense

    def download_payload(self, model: Params) -> bytes | None:
        """CS: the sparse download of the round's new model (what the next round's
        clients fetch); None for other strategies."""
        if self.wire is None:
            return None
        seed = wire_seed(self.seed, self.round + 1, "download")
        return self.wire.encode_download(model, first=False, seed=seed).payload


def _f32_readonly(flat: npt.NDArray[Any]) -> F32:
    """``flat`` as float32 (a copy only when it is not), viewed read-only."""
    return readonly(np.asarray(flat, dtype=np.float32))
