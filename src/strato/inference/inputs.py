"""Graph Challenge inputs: MNIST images resized to √N × √N and binarized to 1.0.

How an image becomes an input row decides the whole workload (see FIELD-NOTES): a
28×28 digit padded to 32×32 with "pixel > 0" keeps ~150 nonzeros per image and
26k of 60k images alive after 120 layers, far from the published challenge. We use
the *near-challenge* variant: for ``N = 1024`` the digit is padded by 2 pixels on each
side to 32×32 and binarized with ``pixel > 153`` (0.6 of full scale): ~95 nonzeros per
image and ~2,000 images alive after 120 layers, close to the published 1,812. For
larger ``N`` the padded 32×32 image is upscaled by pixel replication by ``√N / 32``
(64×64, 128×128, 256×256), so every size sees the same digits at the same threshold.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from strato.errors import ConfigError, NotFound

__all__ = ["DEFAULT_THRESHOLD", "binarize_images", "mnist_inputs", "read_mnist_images"]

DEFAULT_THRESHOLD = 153  # pixel > 153 of 255: the near-challenge variant
_PAD = 2


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: {data.size} bytes for shape {dims}")
    return data.reshape(dims)


def read_mnist_images(data_dir: str | Path, split: str = "train") -> np.ndarray:
    """MNIST images (count × 28 × 28 uint8) from a directory of IDX files."""
    base = "train-images-idx3-ubyte" if split == "train" else "t10k-images-idx3-ubyte"
    root = Path(data_dir)
    for name in (base + ".gz", base):
        if (root / name).exists():
            return _read_idx(root / name)
    raise NotFound(f"no {base}[.gz] in {root} (pass --data-dir with the MNIST IDX files)")


def binarize_images(
    images: np.ndarray, neurons: int, threshold: int = DEFAULT_THRESHOLD
) -> sp.csr_matrix:
    """Images (count × 28 × 28) → challenge inputs (count × neurons CSR, values 1.0)."""
    side = round(neurons**0.5)
    if side * side != neurons or side % 32:
        raise ConfigError(f"--neurons must be a square of a multiple of 32, got {neurons}")
    scale = side // 32
    count = images.shape[0]
    mask = images > threshold  # (count, 28, 28)
    padded = np.zeros((count, 32, 32), dtype=bool)
    padded[:, _PAD : _PAD + 28, _PAD : _PAD + 28] = mask
    if scale > 1:
        padded = padded.repeat(scale, axis=1).repeat(scale, axis=2)
    flat = padded.reshape(count, neurons)
    rows, cols = np.nonzero(flat)
    data = np.ones(rows.size, dtype=np.float32)
    return sp.csr_matrix((data, (rows, cols)), shape=(count, neurons), dtype=np.float32)


def mnist_inputs(
    neurons: int,
    count: int,
    data_dir: str | Path,
    threshold: int = DEFAULT_THRESHOLD,
) -> sp.csr_matrix:
    """The first ``count`` MNIST training images as challenge inputs."""
    images = read_mnist_images(data_dir)
    if not 1 <= count <= images.shape[0]:
        raise ConfigError(f"--inputs must be in 1..{images.shape[0]}, got {count}")
    return binarize_images(images[:count], neurons, threshold)
