"""Small networks and inputs shared by the inference tests (no MNIST download needed)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from sparse_inputs import random_inputs


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """A gzipped IDX3 file, the MNIST distribution format."""
    head = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", *images.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + images.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a small MNIST-shaped training set of blobs of bright pixels."""
    d = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(7)
    images = np.zeros((64, 28, 28), dtype=np.uint8)
    for img in images:
        r, c = rng.integers(4, 20, size=2)
        img[r : r + 8, c : c + 6] = rng.integers(100, 256, size=(8, 6))
    write_idx_images(d / "train-images-idx3-ubyte.gz", images)
    return d


@pytest.fixture(scope="session")
def make_inputs():  # type: ignore[no-untyped-def]
    return random_inputs
