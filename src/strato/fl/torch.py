"""Torch helpers: a module's parameters as one flat float32 buffer, and batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from strato.fl.app import Dataset
from strato.params import Layout, Params

__all__ = ["batches", "load_params", "model_layout", "model_params"]


def model_layout(model: Any) -> Layout:
    """The float32 layout of ``model.state_dict()`` (buffers such as BatchNorm counters
    included, cast to float32 so that every aggregation is one flat float32 sum)."""
    return Layout.of((k, "F32", tuple(v.shape)) for k, v in model.state_dict().items())


def model_params(model: Any, out: Params | None = None) -> Params:
    """Copy a module's state into a flat float32 buffer (reusing ``out`` if given)."""
    sd = model.state_dict()
    params = out if out is not None else Params(model_layout(model))
    for spec in params.layout.tensors:
        params[spec.name][...] = sd[spec.name].detach().cpu().numpy()
    return params


def load_params(model: Any, params: Params) -> None:
    """Load a flat buffer into a module (load_state_dict casts to each tensor's dtype)."""
    import torch

    # as_tensor on a read-only view (a decoded payload) would warn; copy each tensor once.
    sd = {k: torch.from_numpy(np.array(v)) for k, v in params.arrays().items()}
    model.load_state_dict(sd)


def batches(data: Dataset, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[Any]:
    """(x, y) torch batches over a dataset, shuffled deterministically by ``seed``."""
    import torch

    n = len(data)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for start in range(0, n, batch_size):
        idx = torch.from_numpy(order[start : start + batch_size])
        yield x[idx], y[idx]
