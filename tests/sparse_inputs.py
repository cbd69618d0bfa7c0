"""Sparse DNN test inputs shared by the inference tests and the Ray backend's tests."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["random_inputs"]


def random_inputs(neurons: int, count: int, per_image: int, seed: int = 0) -> sp.csr_matrix:
    """Binary √N×√N images, each a lit rectangle of about ``per_image`` pixels (local
    structure like a digit's strokes: scattered pixels would all die)."""
    rng = np.random.default_rng(seed)
    side = round(neurons**0.5)
    imgs = np.zeros((count, side, side), dtype=bool)
    for img in imgs:
        h = int(rng.integers(4, 16))
        w = max(1, min(side, per_image // h + int(rng.integers(-3, 4))))
        r, c = rng.integers(0, side - h + 1), rng.integers(0, side - w + 1)
        img[r : r + h, c : c + w] = True
    return sp.csr_matrix(imgs.reshape(count, neurons).astype(np.float32))
