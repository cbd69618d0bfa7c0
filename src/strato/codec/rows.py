"""Inference wire formats: activation row blocks and arrays containers (no pickle).

A row block carries selected rows of a neuron-major CSR activation matrix. The
receiver already knows *which* neurons the block holds (both ends derive the same
send lists from the partition), so the block is only the rows' content, and each
*twin class* once: output neurons whose weight rows are identical (same inputs,
same weights) compute bit-identical activations, and RadiX-Net layers consist of
such groups of 16 (at most 64 distinct rows of 1,024 per layer at N = 1024). The
classes come from the weights at planning time (``inference.plan.twin_classes``), so
no activation is ever hashed or compared. Layout, zstd-compressed:

    uint32 rows, uint32 distinct, uint32 ref[rows]   (row i is distinct row ref[i])
    uint32 lengths[distinct], uint32 column deltas[…], float32 values[…]

Each row travels in ascending column order (whatever order the kernel left it in),
its column ids delta-coded (mostly 1s once rows are dense), values float32 (mostly
32.0 once saturated). An empty block (nothing to send) is the empty byte string.

This module is the block's byte layout and its checks; turning CSR rows into
(lengths, column deltas, values) and back is the inference kernels' job
(``inference._numba_rows``, used by ``inference._wire``).

Array containers (a worker's share of the network, the inputs) are safetensors
files: a JSON header and raw little-endian arrays, loaded zero-copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.codec.zstd import _INSTALL, _module
from strato.errors import CodecError, ConfigError

__all__ = [
    "RowArrays",
    "block_layout",
    "load_arrays",
    "pack_row_block",
    "save_arrays",
    "unpack_row_block",
]


@cache
def _coders() -> tuple[Any, Any, type[Exception]]:
    """zstd level 1 (compressor, decompressor, error type), made once. Level 1: once twins are sent
    once, the long-distance matching the raw rows needed (identical rows megabytes
    apart) has nothing left to find, and plain level 1 is the fastest."""
    zstd = _module()
    if zstd is None:
        raise ConfigError(f"activation blocks need the 'zstandard' package: {_INSTALL}")
    return zstd.ZstdCompressor(level=1), zstd.ZstdDecompressor(), zstd.ZstdError


def block_layout(rows: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(``distinct``, ``ref``): the rows a block carries once, and for each of
    ``rows`` the index of its copy among them."""
    rows = np.asarray(rows, dtype=np.int64)
    if classes is None:
        return rows, np.arange(rows.size, dtype=np.uint32)
    _, first, inverse = np.unique(classes, return_index=True, return_inverse=True)
    return rows[first], inverse.astype(np.uint32)


def pack_row_block(
    ref: npt.NDArray[Any],
    lengths: npt.NDArray[np.uint32],
    deltas: npt.NDArray[np.uint32],
    values: npt.NDArray[np.float32],
) -> bytes:
    """The compressed block: ``ref`` per carried row, and the distinct rows' lengths,
    column deltas and values, each concatenated in row order."""
    raw = b"".join((
        np.array([ref.size, lengths.size], dtype=np.uint32).tobytes(),
        ref.astype(np.uint32, copy=False).tobytes(),
        lengths.tobytes(),
        deltas.tobytes(),
        values.tobytes(),
    ))
    return bytes(_coders()[0].compress(raw))


@dataclass(frozen=True)
class RowArrays:
    """A block's arrays: ``ref`` (int64, one per carried row) into the ``lengths.size``
    distinct rows, whose column deltas and values are concatenated (read-only views
    of the decompressed block)."""

    ref: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.uint32]
    deltas: npt.NDArray[np.uint32]
    values: npt.NDArray[np.float32]


def unpack_row_block(block: bytes | memoryview, nrows: int) -> RowArrays:
    """The arrays of a block of ``nrows`` rows; checks the layout as it goes."""
    if len(block) == 0:
        if nrows:
            raise CodecError(f"empty block where {nrows} rows were expected")
        none = np.zeros(0, dtype=np.uint32)
        return RowArrays(np.zeros(0, dtype=np.int64), none, none, np.zeros(0, np.float32))
    _, decompressor, zstd_error = _coders()
    try:
        raw = decompressor.decompress(bytes(block))
    except zstd_error as exc:
        raise CodecError(f"corrupt activation block: {exc}") from None
    if len(raw) < 8:
        raise CodecError("truncated activation block")
    count, distinct = (int(v) for v in np.frombuffer(raw, dtype=np.uint32, count=2))
    if count != nrows:
        raise CodecError(f"block holds {count} rows, expected {nrows}")
    off = 8 + 4 * (count + distinct)
    if len(raw) < off or distinct > count:
        raise CodecError("truncated activation block")
    ref = np.frombuffer(raw, dtype=np.uint32, count=count, offset=8).astype(np.int64)
    lengths = np.frombuffer(raw, dtype=np.uint32, count=distinct, offset=8 + 4 * count)
    total = int(lengths.sum(dtype=np.int64))
    if len(raw) != off + 8 * total or (count and int(ref.max()) >= distinct):
        raise CodecError("truncated or inconsistent activation block")
    deltas = np.frombuffer(raw, dtype=np.uint32, count=total, offset=off)
    values = np.frombuffer(raw, dtype=np.float32, count=total, offset=off + 4 * total)
    return RowArrays(ref, lengths, deltas, values)


def save_arrays(arrays: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> bytes:
    from safetensors.numpy import save

    return bytes(save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta))


def load_arrays(data: Any) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return dict(load(bytes(data)))
