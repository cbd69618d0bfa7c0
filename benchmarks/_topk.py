"""Top-k sparsification of client updates with error feedback (upload only).

A client sends, per tensor, the ``ceil(density · numel)`` largest-magnitude entries
of its update plus the residual it carried over; what it does not send stays in its
residual for its next participation (error feedback, so nothing is lost, only
delayed). The server adds the example-weighted mean of the sparse updates to the
dense model it broadcast. The receiver does not know the positions, so the mask
travels with the values (a bitmap on the wire).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from strato.errors import ConfigError, LayoutError
from strato.params import Layout, Params

__all__ = ["TopKCompressor", "apply_sparse_updates", "topk_mask"]

F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]


def topk_mask(values: F32, layout: Layout, density: float) -> Mask:
    """Per tensor, True at the ``ceil(density · numel)`` largest |values| (ties: lower index)."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"top-k density must be in (0, 1], got {density}")
    if values.size != layout.numel:
        raise LayoutError(f"{values.size} values for a layout of {layout.numel}")
    mask = np.zeros(values.size, np.bool_)
    for spec in layout.tensors:
        start = spec.offset // 4
        k = min(spec.numel, math.ceil(density * spec.numel))
        seg = values[start : start + spec.numel]
        order = np.argsort(-np.abs(seg), kind="stable")[:k]
        mask[start + order] = True
    return mask


class TopKCompressor:
    """The client side: one per client, it keeps that client's residual between rounds."""

    def __init__(self, layout: Layout, density: float) -> None:
        if layout.tensors and layout.dtype() != "F32":
            raise LayoutError("top-k needs a layout whose tensors are all float32")
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"top-k density must be in (0, 1], got {density}")
        self.layout = layout
        self.density = density
        self.residual = np.zeros(layout.numel, np.float32)

    def compress(self, update: F32) -> tuple[Mask, F32]:
        """``(mask, values)`` to send for ``update``; the rest joins the residual."""
        if update.shape != self.residual.shape:
            raise LayoutError(f"update has {update.size} values, the layout {self.residual.size}")
        acc = self.residual + update
        mask = topk_mask(acc, self.layout, self.density)
        values = acc[mask]
        acc[mask] = 0.0
        self.residual = acc
        return mask, values


def apply_sparse_updates(model: Params, uploads: Iterable[tuple[Mask, F32, float]]) -> Params:
    """The server side: ``model`` plus the example-weighted mean of sparse updates."""
    flat = model.flat("F32")
    total = np.zeros(flat.size, np.float64)
    weight = 0.0
    for mask, values, n in uploads:
        if mask.size != flat.size or int(mask.sum()) != values.size:
            raise LayoutError("sparse update does not match the model's layout")
        if n <= 0:
            raise ConfigError(f"upload weight must be positive, got {n}")
        total[mask] += float(n) * values
        weight += float(n)
    if weight == 0.0:
        raise ConfigError("a round needs at least one upload to aggregate")
    out = model.copy()
    out.flat("F32")[:] = flat + total / weight
    return out
