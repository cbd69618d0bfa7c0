"""Activation row blocks from and to CSR matrices, and the next layer's input.

The block's byte layout (counts, twin references, row lengths, column deltas, values,
zstd) is ``strato.codec.rows``; this module turns selected rows of a neuron-major
CSR activation matrix into that layout and back with the numba kernels of
``_numba_rows``, and assembles the next layer's input from the blocks received.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from strato.codec.rows import block_layout, pack_row_block, unpack_row_block
from strato.errors import CodecError
from strato.inference import _numba_rows as nr

__all__ = [
    "RowBlock",
    "assemble_rows",
    "decode_rows",
    "encode_rows",
    "pack_block",
]


def pack_block(a: sp.csr_matrix, distinct: np.ndarray, ref: np.ndarray) -> bytes:
    """The compressed block of rows ``distinct`` (positions in ``a``) and ``ref``."""
    lengths, deltas, values = nr.pack_rows(a.indptr, a.indices, a.data, distinct)
    return pack_row_block(ref, lengths, deltas, values)


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
    arrays = unpack_row_block(block, nrows)
    if len(block) == 0:
        return RowBlock(sp.csr_matrix((0, ncols), dtype=np.float32), arrays.ref)
    indptr, cols = nr.unpack_rows(arrays.lengths, arrays.deltas)
    if arrays.values.size and int(cols.max()) >= ncols:
        raise CodecError(f"block column id out of range (width {ncols})")
    rows = sp.csr_matrix((arrays.values.copy(), cols, indptr),
                         shape=(arrays.lengths.size, ncols))
    return RowBlock(rows, arrays.ref)


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
