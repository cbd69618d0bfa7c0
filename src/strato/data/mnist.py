"""MNIST from its IDX files (gzipped or plain) in one directory.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order. MNIST
images are type 0x08 (uint8) with 3 dimensions (magic 2051), labels uint8 with 1
(magic 2049). Every problem with the directory or its files is a ``ConfigError``
naming the file, because it comes from the user's ``--data-dir``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.errors import ConfigError

__all__ = ["MNIST_FILES", "find_mnist_files", "read_idx", "read_mnist"]

# name in the dataset -> file stem as published (t10k = the 10,000 test images).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
U8 = npt.NDArray[np.uint8]
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _candidates(stem: str) -> list[str]:
    # Mirrors differ: "train-images-idx3-ubyte" and "train-images.idx3-ubyte", either gzipped.
    dotted = stem.replace("-idx", ".idx")
    return [stem, stem + ".gz", dotted, dotted + ".gz"]


def find_mnist_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """The four MNIST files in ``directory``; ConfigError when it or any file is missing."""
    root = Path(directory).expanduser()
    if not root.exists():
        raise ConfigError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"data directory {root} is not a directory")
    found: dict[str, Path] = {}
    for key, stem in MNIST_FILES.items():
        for name in _candidates(stem):
            if (root / name).is_file():
                found[key] = root / name
                break
    if not found:
        expected = ", ".join(f"{s}[.gz]" for s in MNIST_FILES.values())
        raise ConfigError(f"data directory {root} holds no MNIST files (expected {expected})")
    missing = [f"{MNIST_FILES[k]}[.gz]" for k in MNIST_FILES if k not in found]
    if missing:
        raise ConfigError(f"data directory {root} lacks MNIST file(s) {', '.join(missing)}")
    return found


def _read_bytes(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
        if head == b"\x1f\x8b":  # gzip magic: decide by content, not by the name
            with gzip.open(path, "rb") as gz:
                return gz.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """The array in an IDX file (gzipped or plain), in native byte order."""
    return _parse_idx(Path(path))[1]


def _parse_idx(p: Path) -> tuple[int, npt.NDArray[Any]]:
    data = _read_bytes(p)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ConfigError(f"{p} is not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES or ndim == 0:
        raise ConfigError(f"{p} is not an IDX file (type 0x{code:02x}, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"{p} is truncated (its header needs {header} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ConfigError(f"{p} holds {len(data)} bytes, its header {list(shape)} says {expected}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return int.from_bytes(data[:4], "big"), arr.astype(dtype.newbyteorder("="), copy=False)


def read_mnist(directory: str | os.PathLike[str]) -> tuple[U8, U8, U8, U8]:
    """Raw ``(train_images, train_labels, test_images, test_labels)`` as uint8 arrays."""
    files = find_mnist_files(directory)
    out: dict[str, U8] = {}
    for key, path in files.items():
        got, arr = _parse_idx(path)
        want = _IMAGES_MAGIC if key.endswith("images") else _LABELS_MAGIC
        if got != want:
            raise ConfigError(f"{path}: magic number {got}, expected {want} for MNIST "
                              f"{'images' if want == _IMAGES_MAGIC else 'labels'}")
        out[key] = arr
    for split in ("train", "test"):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise ConfigError(f"MNIST {split} set: {images.shape[0]} images but "
                              f"{labels.shape[0]} labels in {files[f'{split}_labels']}")
        if labels.size and int(labels.max()) > 9:
            bad = int(labels.max())
            raise ConfigError(f"{files[f'{split}_labels']}: label {bad} is not a digit")
    return out["train_images"], out["train_labels"], out["test_images"], out["test_labels"]
