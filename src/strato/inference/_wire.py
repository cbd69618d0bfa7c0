"""Wire formats: activation row blocks and arrays containers (no pickle anywhere).

A row block carries selected rows of a neuron-major CSR activation matrix. The
receiver already knows *which* neurons the block holds (both ends derive the same
send lists from the partition), so the block is only the rows' content, and each
*twin class* once: output neurons whose weight rows are identical (same inputs,
same weights) compute bit-identical activations, and RadiX-Net layers consist of
such groups of 16 (at most 64 distinct rows of 1,024 per layer at N = 1024). The
classes come from the weights at planning time (``plan.twin_classes``), so no
activation is ever hashed or compared. Layout, zstd-compressed:

    uint32 rows, uint32 distinct, uint32 ref[rows]   (row i is distinct row ref[i])
    uint32 lengths[distinct], uint32 column deltas[…], float32 values[…]

Each row travels in ascending column order (whatever order the kernel left it in),
its column ids delta-coded (mostly 1s once rows are dense), values float32 (mostly
32.0 once saturated). An empty block (nothing to send) is the
empty byte string.

Array containers (a worker's share of the network, the inputs) are safetensors
files: a JSON header and raw little-endian arrays, loaded zero-copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import zstandard

from strato.errors import CodecError
from strato.inference import _numba_rows as nr

__all__ = [
    "RowBlock",
    "assemble_rows",
    "block_layout",
    "decode_rows",
    "encode_rows",
    "load_arrays",
    "pack_block",
    "save_arrays",
]

# zstd level 1: once twins are sent once, the long-distance matching the raw rows
# needed (identical rows megabytes apart) has nothing left to find, and plain level 1
# is the fastest.
_compressor = zstandard.ZstdCompressor(level=1)
_decompressor = zstandard.ZstdDecompressor()


def block_layout(rows: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(``distinct``, ``ref``): the rows a block carries once, and for each of
    ``rows`` the index of its copy among them."""
    rows = np.asarray(rows, dtype=np.int64)
    if classes is None:
        return rows, np.arange(rows.size, dtype=np.uint32)
    _, first, inverse = np.unique(classes, return_index=True, return_inverse=True)
    return rows[first], inverse.astype(np.uint32)


def pack_block(a: sp.csr_matrix, distinct: np.ndarray, ref: np.ndarray) -> bytes:
    """The compressed block of rows ``distinct`` (positions in ``a``) and ``ref``."""
    lengths, deltas, values = nr.pack_rows(a.indptr, a.indices, a.data, distinct)
    raw = b"".join((
        np.array([ref.size, distinct.size], dtype=np.uint32).tobytes(),
        ref.astype(np.uint32, copy=False).tobytes(),
        lengths.tobytes(),
        deltas.tobytes(),
        values.tobytes(),
    ))
    return bytes(_compressor.compress(raw))


def encode_rows(a: sp.csr_matrix, rows: np.ndarray, classes: np.ndarray | None = None) -> bytes:
    """The rows ``rows`` (positions in ``a``) as one compressed block; ``classes[i]``
    (optional) is row ``rows[i]``'s twin class: rows of one class are sent once."""
    if rows.size == 0:
        return b""
    distinct, ref = block_layout(rows, classes)
    return pack_block(a, distinct, ref)


@dataclass
class RowBlock:
    """A decoded block: its distinct rows and, per carried row, which one it is."""

    distinct: sp.csr_matrix
    ref: np.ndarray  # int64 index into ``distinct`` for every carried row

    def to_csr(self) -> sp.csr_matrix:
        """Every carried row, materialised (tests, small blocks)."""
        return sp.csr_matrix(self.distinct[self.ref])


def decode_rows(block: bytes | memoryview, nrows: int, ncols: int) -> RowBlock:
    """A block of ``nrows`` rows of width ``ncols``; checks the layout as it goes."""
    empty = sp.csr_matrix((0, ncols), dtype=np.float32)
    if len(block) == 0:
        if nrows:
            raise CodecError(f"empty block where {nrows} rows were expected")
        return RowBlock(empty, np.zeros(0, dtype=np.int64))
    try:
        raw = _decompressor.decompress(bytes(block))
    except zstandard.ZstdError as exc:
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
    indptr, cols = nr.unpack_rows(lengths, deltas)
    if total and int(cols.max()) >= ncols:
        raise CodecError(f"block column id out of range (width {ncols})")
    rows = sp.csr_matrix((values.copy(), cols, indptr), shape=(distinct, ncols))
    return RowBlock(rows, ref)


def assemble_rows(
    own: sp.csr_matrix, keep: np.ndarray, blocks: list[RowBlock], order: np.ndarray
) -> sp.csr_matrix:
    """The next layer's input: of the stacked rows ``own[keep]`` followed by every
    block's carried rows, row ``i`` is stacked row ``order[i]`` (a permutation or a
    selection: one row per twin class), built in one pass without materialising the
    stacked matrix."""
    ncols = own.shape[1]
    offsets = np.cumsum([0] + [b.distinct.shape[0] for b in blocks])
    if blocks:
        pool = sp.vstack([b.distinct for b in blocks], format="csr")  # distinct rows: small
        remote = np.concatenate([b.ref + off for b, off in zip(blocks, offsets, strict=False)])
    else:
        pool = sp.csr_matrix((0, ncols), dtype=np.float32)
        remote = np.zeros(0, dtype=np.int64)
    src = np.concatenate([np.zeros(keep.size, np.int8), np.ones(remote.size, np.int8)])[order]
    row = np.concatenate([keep.astype(np.int64), remote])[order]
    pool_indptr = pool.indptr.astype(np.int64)
    pool_indices = pool.indices.astype(np.int32)
    indptr, indices, data = nr.gather_rows(
        src, row, own.indptr, own.indices, own.data,
        pool_indptr, pool_indices, pool.data.astype(np.float32),
    )
    return sp.csr_matrix((data, indices, indptr), shape=(order.size, ncols))


def save_arrays(arrays: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> bytes:
    from safetensors.numpy import save

    return bytes(save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta))


def load_arrays(data: Any) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return dict(load(bytes(data)))
