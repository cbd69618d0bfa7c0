"""Complement Sparsification (CS; Jiang & Borcea, AAAI 2023): server and client halves.

Faithful to the authors' code:

- Round 1 is dense: clients train the dense model and send dense weights; the server
  takes their example-weighted mean (FedAvg).
- The server prunes the aggregate **per layer** by magnitude: in every kernel the
  ``floor(s · numel)`` smallest-magnitude weights become zero (ties go to the lower
  index, so the mask is exact and deterministic). Biases are never pruned. The
  sparse model ``w_s`` and its keep-mask go to the clients.
- A client loads ``w_s``, trains every weight, and sends back only the kernel values
  at the positions that were zero in ``w_s`` (the complement; both sides know the
  mask, so no indices travel) plus its dense biases.
- The server averages the complements ``a`` (weighted by examples), sets
  ``w_dense = w_s + η · a`` on kernels and the plain weighted mean on biases, then
  prunes ``w_dense`` again. Kept weights change only by being pruned and regrown.

Beyond the paper (off by default): with ``kept_rate`` set, clients also send what
training did to the kept weights (the upload becomes dense, which pays off only with
a low-bit codec, see ``strato.wire``) and the server moves kept weights by
``kept_rate`` times their mean change. Faithful CS freezes kept weights between
prunings; on short runs that caps accuracy (docs/sparsity.md has the numbers).

Kernel or bias is decided from the layout: a tensor with 2 or more dimensions (conv
and dense kernels, embeddings) is a kernel; a 1-D tensor (biases, norm scales) is a
bias. Scalars count as biases too. Everything here is pure numpy over the flat
float32 element space of a ``Params`` (position ``i`` = element ``i`` of ``flat()``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from strato.errors import ConfigError, LayoutError
from strato.params import Layout, Params

__all__ = [
    "ComplementConfig",
    "ComplementServer",
    "client_complement",
    "kernel_positions",
    "prune",
    "upload_positions",
]

F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class ComplementConfig:
    sparsity: float = 0.5  # fraction of every kernel pruned to zero
    eta: float = 1.5  # aggregation rate applied to the averaged complement
    kept_rate: float | None = None  # None: faithful CS; else also merge kept-weight changes

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not self.eta > 0.0:
            raise ConfigError(f"eta must be positive, got {self.eta}")
        if self.kept_rate is not None and not self.kept_rate > 0.0:
            raise ConfigError(f"kept_rate must be positive, got {self.kept_rate}")


def _check_f32(layout: Layout) -> None:
    if layout.tensors and layout.dtype() != "F32":
        raise LayoutError("complement sparsification needs a layout whose tensors are all float32")


def kernel_positions(layout: Layout) -> Mask:
    """Flat mask: True at every element of a kernel (a tensor with ndim >= 2)."""
    _check_f32(layout)
    out = np.zeros(layout.numel, np.bool_)
    for spec in layout.tensors:
        if len(spec.shape) >= 2:
            out[spec.offset // 4 : spec.end // 4] = True
    return out


def prune(params: Params, sparsity: float) -> tuple[Params, Mask]:
    """Per-layer magnitude pruning. Returns ``(w_s, keep)``; ``keep`` is True on biases."""
    _check_f32(params.layout)
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    pruned = params.copy()
    flat = pruned.flat("F32") if params.layout.tensors else np.zeros(0, np.float32)
    keep = np.ones(flat.size, np.bool_)
    for spec in params.layout.tensors:
        if len(spec.shape) < 2:
            continue
        start = spec.offset // 4
        weights = flat[start : start + spec.numel]
        n_prune = int(sparsity * spec.numel)
        # A stable sort of |w| makes the cut exact and deterministic even with ties.
        order = np.argsort(np.abs(weights), kind="stable")[:n_prune]
        weights[order] = 0.0
        keep[start + order] = False
    return pruned, keep


def upload_positions(keep: Mask, kernels: Mask) -> Mask:
    """What a CS client sends: pruned kernel positions plus every bias position."""
    return ~keep | ~kernels


def client_complement(received_keep: Mask | None, trained: Params) -> F32:
    """The client half: the trained values a CS client uploads, in layout order.

    ``received_keep`` is the keep-mask of the model the client received (None in
    the dense first round: then every trained value goes back).
    """
    _check_f32(trained.layout)
    flat = trained.flat("F32")
    if received_keep is None:
        return flat.copy()
    if received_keep.size != flat.size:
        raise LayoutError(f"keep-mask has {received_keep.size} positions, the model {flat.size}")
    return flat[upload_positions(received_keep, kernel_positions(trained.layout))]


class ComplementServer:
    """The server half. ``model``/``keep`` are what goes to the clients this round."""

    def __init__(self, initial: Params, config: ComplementConfig | None = None) -> None:
        _check_f32(initial.layout)
        self.config = config or ComplementConfig()
        self.model = initial.copy()
        self.keep: Mask | None = None  # None while the model is dense (round 1)
        self.dense: Params = initial.copy()  # w_dense before the last pruning
        self.kernels = kernel_positions(initial.layout)

    def upload_mask(self) -> Mask | None:
        """Positions each client uploads this round (None: every position)."""
        if self.keep is None or self.config.kept_rate is not None:
            return None
        return upload_positions(self.keep, self.kernels)

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
        flat = dense.flat("F32")
        if self.keep is None:
            flat[:] = mean  # round 1: plain FedAvg
        elif mask is None:  # kept_rate mode: every position came back
            assert self.config.kept_rate is not None
            kept, grow = self.keep & self.kernels, ~self.keep & self.kernels
            flat[kept] = flat[kept] + self.config.kept_rate * (mean[kept] - flat[kept])
            flat[grow] = flat[grow] + self.config.eta * mean[grow]
            flat[~self.kernels] = mean[~self.kernels]
        else:
            full = np.zeros(flat.size, np.float64)
            full[mask] = mean
            grow = mask & self.kernels
            flat[grow] = flat[grow] + self.config.eta * full[grow]  # w_s + η·a; w_s is 0 here
            flat[~self.kernels] = full[~self.kernels]  # FedAvg on biases
        self.dense = dense
        self.model, self.keep = prune(dense, self.config.sparsity)
