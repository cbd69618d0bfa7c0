"""Complement Sparsification (CS; Jiang & Borcea, AAAI 2023): server and client halves.

Faithful to the authors' code:

- Round 1 is dense: clients train the dense model and send dense weights; the server
  takes their example-weighted mean (FedAvg).
- The server prunes the aggregate **per layer** by magnitude: in every kernel the
  ``floor(s · numel)`` smallest-magnitude weights become zero (ties go to the lower
  index, so the mask is exact and deterministic). Biases are never pruned. The
  sparse model ``w_s`` goes to the clients.
- A client loads ``w_s``, trains every weight, and sends back only the kernel values
  at the positions that are zero in ``w_s`` (the complement) plus its dense biases.
  Both sides read those positions off ``w_s`` itself (as the authors' client does:
  ``mask = parameters != 0``), so no mask and no indices travel with the upload.
- The server averages the complements ``a`` (weighted by examples), sets
  ``w_dense = w_s + η · a`` on kernels and the plain weighted mean on biases, then
  prunes ``w_dense`` again. Kept weights change only by being pruned and regrown.

Beyond the paper (off by default): with ``kept_rate`` set, clients also send what
training did to the kept weights (the upload becomes dense, which pays off only with
a low-bit codec, see ``strato.codec``) and the server moves kept weights by
``kept_rate`` times their mean change. Faithful CS freezes kept weights between
prunings; on short runs that caps accuracy (docs/sparsity.md has the numbers).

Kernel or bias is decided from the layout: a tensor with 2 or more dimensions (conv
and dense kernels, embeddings) is a kernel; a 1-D tensor (biases, norm scales) is a
bias. Scalars count as biases too. Everything here is pure numpy over the flat
float32 element space of a ``Params`` (position ``i`` = element ``i`` of ``flat()``).
The wire halves (``encode_download`` … ``decode_upload``) are pure bytes in, bytes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from strato import codec
from strato.codec import MAGIC, WireFormat, decode_values, encode_values
from strato.errors import CodecError, ConfigError, LayoutError
from strato.params import Layout, Params

__all__ = [
    "ComplementConfig",
    "client_complement",
    "decode_download",
    "decode_upload",
    "download_mask",
    "encode_download",
    "encode_upload",
    "kernel_positions",
    "merge",
    "merge_kept",
    "prune",
    "prune_flat",
    "upload_positions",
]

F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class ComplementConfig:
    sparsity: float = 0.5  # fraction of every kernel pruned to zero
    # aggregation rate applied to the averaged complement: 4, as chosen on the validation
    # split of benchmarks/sparsity.py (the authors' 1.5 learns far slower; docs/sparsity.md)
    eta: float = 4.0
    kept_rate: float | None = None  # None: faithful CS; else also merge kept-weight changes

    def __post_init__(self) -> None:
        for name in ("sparsity", "eta", "kept_rate"):
            value: Any = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if value is not None and not number:
                raise ConfigError(f"cs: option {name} must be a number, got {value!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"cs: option sparsity must be in [0, 1), got {self.sparsity}")
        if not self.eta > 0.0:
            raise ConfigError(f"cs: option eta must be positive, got {self.eta}")
        if self.kept_rate is not None and not self.kept_rate > 0.0:
            raise ConfigError(f"cs: option kept_rate must be positive, got {self.kept_rate}")


def _check_f32(layout: Layout) -> None:
    if layout.tensors and layout.dtype() != "F32":
        raise LayoutError("complement sparsification needs a layout whose tensors are all float32")


def _flat(params: Params) -> F32:
    return params.flat("F32") if params.layout.tensors else np.zeros(0, np.float32)


def kernel_positions(layout: Layout) -> Mask:
    """Flat mask: True at every element of a kernel (a tensor with ndim >= 2)."""
    _check_f32(layout)
    out = np.zeros(layout.numel, np.bool_)
    for spec in layout.tensors:
        if len(spec.shape) >= 2:
            out[spec.offset // 4 : spec.end // 4] = True
    return out


def prune_flat(flat: F32, layout: Layout, sparsity: float) -> Mask:
    """Prune ``flat`` in place, per kernel; returns the keep-mask (True on biases)."""
    _check_f32(layout)
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"cs: option sparsity must be in [0, 1), got {sparsity}")
    keep = np.ones(flat.size, np.bool_)
    for spec in layout.tensors:
        if len(spec.shape) < 2:
            continue
        start = spec.offset // 4
        weights = flat[start : start + spec.numel]
        n_prune = int(sparsity * spec.numel)
        # A stable sort of |w| makes the cut exact and deterministic even with ties.
        order = np.argsort(np.abs(weights), kind="stable")[:n_prune]
        weights[order] = 0.0
        keep[start + order] = False
    return keep


def prune(params: Params, sparsity: float) -> tuple[Params, Mask]:
    """Per-layer magnitude pruning. Returns ``(w_s, keep)``; ``keep`` is True on biases."""
    _check_f32(params.layout)
    pruned = params.copy()
    keep = prune_flat(_flat(pruned), params.layout, sparsity)
    return pruned, keep


def upload_positions(received: Params | F32, kernels: Mask) -> Mask:
    """What a CS client sends: kernel positions that are zero in the received model,
    plus every bias position. The server computes the same mask from its ``w_s``."""
    flat = _flat(received) if isinstance(received, Params) else received
    if flat.size != kernels.size:
        raise LayoutError(f"model has {flat.size} positions, the kernel mask {kernels.size}")
    out: Mask = ~kernels | (flat == 0)
    return out


def download_mask(model: Params | F32, kernels: Mask) -> Mask:
    """The positions a sparse download carries: nonzero values plus every bias."""
    flat = _flat(model) if isinstance(model, Params) else model
    out: Mask = ~kernels | (flat != 0)
    return out


def client_complement(received: Params | None, trained: Params) -> F32:
    """The client half: the trained values a CS client uploads, in layout order.

    ``received`` is the model the client received (None in the dense first round:
    then every trained value goes back).
    """
    _check_f32(trained.layout)
    flat = _flat(trained)
    if received is None:
        return flat.copy()
    if received.layout != trained.layout:
        raise LayoutError(f"wrong layout: {received.layout.describe_mismatch(trained.layout)}")
    return flat[upload_positions(received, kernel_positions(trained.layout))]


def merge(w_s: F32, mean: npt.NDArray[np.floating[Any]], kernels: Mask, eta: float) -> F32:
    """``w_dense``: ``w_s + η · a`` on the complement, the mean on biases, kept untouched.

    ``mean`` is the example-weighted mean of the uploads scattered to full length
    (values at ``upload_positions(w_s)``; what it holds elsewhere is ignored).
    """
    grow = kernels & (w_s == 0)
    dense = np.array(w_s, dtype=np.float32)
    # w_s is zero on the complement, so w_s + η·a is η·a there; written out as the paper has it.
    dense[grow] = (w_s[grow] + eta * mean[grow]).astype(np.float32)
    dense[~kernels] = mean[~kernels]
    return dense


def merge_kept(
    w_s: F32,
    mean: npt.NDArray[np.floating[Any]],
    kernels: Mask,
    eta: float,
    kept_rate: float,
    keep: Mask | None = None,
) -> F32:
    """``w_dense`` when kept weights learn too (``ComplementConfig.kept_rate``).

    ``mean`` is the example-weighted mean of full-length uploads (every position came
    back). Kept kernel weights move by ``kept_rate`` times their mean change, the
    complement regrows as ``w_s + η · a``, biases take the mean. ``keep`` is the
    pruning's keep-mask (default: the nonzero positions of ``w_s``).
    """
    flat = np.array(w_s, dtype=np.float32)
    nonzero = flat != 0 if keep is None else keep
    kept, grow = nonzero & kernels, ~nonzero & kernels
    flat[kept] = flat[kept] + kept_rate * (mean[kept] - flat[kept])
    flat[grow] = flat[grow] + eta * mean[grow]
    flat[~kernels] = mean[~kernels]
    return flat


# --- on the wire -----------------------------------------------------------------------


def encode_download(w_s: Params, fmt: WireFormat | None = None, seed: int = 0) -> codec.Encoded:
    """The sparse model a CS server sends: its nonzero values plus a bitmap of them
    (biases always carried). Float32 by default, so the client gets ``w_s`` exactly."""
    fmt = fmt or WireFormat(mask="bitmap")
    mask = download_mask(w_s, kernel_positions(w_s.layout))
    return encode_values(w_s.layout, _flat(w_s)[mask], mask, fmt, seed)


def decode_download(payload: Any, expect: Layout | None = None) -> Params:
    """The model a client received: a sparse wire payload, or dense safetensors."""
    if bytes(memoryview(payload)[:4]) != MAGIC:
        return codec.decode(payload, expect=expect).copy()
    return decode_values(payload, expect=expect).to_params()


def encode_upload(
    received: Params, trained: Params, fmt: WireFormat | None = None, seed: int = 0
) -> codec.Encoded:
    """A CS client's upload: its complement and biases, values only (``shared`` mask)."""
    fmt = fmt or WireFormat(mask="shared")
    if fmt.mask != "shared":
        raise ConfigError("a complement upload travels against the shared mask")
    values = client_complement(received, trained)
    mask = upload_positions(received, kernel_positions(trained.layout))
    return encode_values(trained.layout, values, mask, fmt, seed)


def decode_upload(payload: Any, w_s: Params) -> F32:
    """A CS upload as a full-length vector: the complement and biases in place, zero
    on the kept positions. ``w_s`` is the sparse model this round's clients received.

    A dense safetensors upload (a client that knows nothing of CS) is accepted too:
    the server keeps only its complement and biases, as if the client had sent those.
    """
    layout = w_s.layout
    send = upload_positions(w_s, kernel_positions(layout))
    out = np.zeros(layout.numel, np.float32)
    if bytes(memoryview(payload)[:4]) != MAGIC:
        out[send] = codec.decode(payload, expect=layout).flat("F32")[send]
        return out
    d = decode_values(payload, shared_mask=send, expect=layout)
    if d.mask is None or not np.array_equal(d.mask, send):
        raise CodecError("complement upload does not carry exactly the complement positions")
    out[send] = d.values
    return out
