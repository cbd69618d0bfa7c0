"""Wire formats: activation row blocks and arrays containers (no pickle anywhere).

A row block carries selected rows of a neuron-major CSR activation matrix. The
receiver already knows *which* neurons the block holds (both ends derive the same
send lists from the partition), so the block is only: row lengths (uint32), column
(image) ids delta-encoded within each row (uint32, mostly 1s once rows are dense),
and values (float32, mostly 32.0 once saturated), zstd-compressed. An empty block
(nothing to send) is the empty byte string.

Array containers (a worker's share of the network, the inputs) are safetensors
files: a JSON header and raw little-endian arrays, loaded zero-copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import zstandard

from strato.errors import CodecError

__all__ = ["decode_rows", "encode_rows", "load_arrays", "save_arrays"]

# zstd level 1 with long-distance matching over a 128 MiB window: the first layers'
# 16 blocks of neurons carry identical rows (RadiX-Net), megabytes apart at 60,000
# images; plain level 1 (small window) missed them and compressed 5× worse on layer 2
# while a small sample still found them, which made sizes unpredictable.
_PARAMS = zstandard.ZstdCompressionParameters.from_level(1, window_log=27, enable_ldm=True)
_compressor = zstandard.ZstdCompressor(compression_params=_PARAMS)
_decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 27)


def encode_rows(a: sp.csr_matrix, rows: np.ndarray) -> bytes:
    """The rows ``rows`` (positions in ``a``) as one compressed block."""
    if rows.size == 0:
        return b""
    starts, stops = a.indptr[rows], a.indptr[rows + 1]
    lengths = (stops - starts).astype(np.int64)
    total = int(lengths.sum())
    out_starts = np.zeros(rows.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=out_starts[1:])
    # gather the selected rows' entries (vectorised ranges)
    offsets = np.repeat(starts - out_starts, lengths)
    take = np.arange(total, dtype=np.int64) + offsets
    cols = a.indices[take].astype(np.uint32)
    vals = a.data[take].astype(np.float32, copy=False)
    deltas = cols.copy()
    if total:
        deltas[1:] -= cols[:-1]
        first = out_starts[lengths > 0]
        deltas[first] = cols[first]
    raw = b"".join((
        np.uint32(rows.size).tobytes(),
        lengths.astype(np.uint32).tobytes(),
        deltas.tobytes(),
        vals.tobytes(),
    ))
    return bytes(_compressor.compress(raw))


def decode_rows(block: bytes | memoryview, nrows: int, ncols: int) -> sp.csr_matrix:
    """A block back as an ``nrows`` × ``ncols`` CSR (int32 indices, float32)."""
    if len(block) == 0:
        if nrows:
            raise CodecError(f"empty block where {nrows} rows were expected")
        return sp.csr_matrix((0, ncols), dtype=np.float32)
    try:
        raw = _decompressor.decompress(bytes(block))
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt activation block: {exc}") from None
    count = int(np.frombuffer(raw, dtype=np.uint32, count=1)[0])
    if count != nrows:
        raise CodecError(f"block holds {count} rows, expected {nrows}")
    lengths = np.frombuffer(raw, dtype=np.uint32, count=nrows, offset=4).astype(np.int64)
    total = int(lengths.sum())
    off = 4 + 4 * nrows
    if len(raw) != off + 8 * total:
        raise CodecError("truncated activation block")
    deltas = np.frombuffer(raw, dtype=np.uint32, count=total, offset=off).astype(np.int64)
    vals = np.frombuffer(raw, dtype=np.float32, count=total, offset=off + 4 * total)
    indptr = np.zeros(nrows + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    cs = np.cumsum(deltas)
    if total:
        # undo the per-row delta: subtract the running sum before each row's start
        base = np.concatenate(([0], cs))[indptr[:-1]]
        cols = cs - np.repeat(base, lengths)
    else:
        cols = cs
    return sp.csr_matrix(
        (vals.copy(), cols.astype(np.int32), indptr), shape=(nrows, ncols)
    )


def save_arrays(arrays: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> bytes:
    from safetensors.numpy import save

    return bytes(save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta))


def load_arrays(data: Any) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return dict(load(bytes(data)))
