"""The codec package: its public names, and the partial-sum and row-block formats
on their own (numpy only; the FedAvg math and the CSR kernels are tested elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

import strato.codec
from strato.codec.partials import PARTIAL_HEADER_SIZE, Partial
from strato.codec.rows import block_layout, pack_row_block, unpack_row_block
from strato.errors import CodecError


def test_the_package_exports_the_dense_and_masked_codecs() -> None:
    assert sorted(strato.codec.__all__) == sorted([
        "Encoded", "decode", "encode", "encode_into", "encoded_size", "header_bytes",
        "read_header", "MAGIC", "Decoded", "WireFormat", "decode_values", "encode_params",
        "encode_values",
    ])  # fmt: skip
    assert all(hasattr(strato.codec, name) for name in strato.codec.__all__)


def test_a_partial_round_trips_zero_copy() -> None:
    part = Partial(np.arange(5, dtype=np.float64), 2.5, 3)
    raw = part.to_bytes()
    assert len(raw) == PARTIAL_HEADER_SIZE + 40 == Partial.encoded_size(5)
    back = Partial.from_bytes(raw)
    assert np.array_equal(back.sum, part.sum) and (back.weight, back.count) == (2.5, 3)
    assert not back.sum.flags.owndata
    with pytest.raises(CodecError):
        Partial.from_bytes(raw[:-1])


def test_a_row_block_round_trips_its_arrays_and_refuses_bad_counts() -> None:
    pytest.importorskip("zstandard")
    distinct, ref = block_layout(np.array([4, 9, 4, 7]), np.array([0, 1, 0, 2]))
    assert distinct.tolist() == [4, 9, 7] and ref.tolist() == [0, 1, 0, 2]
    lengths = np.array([2, 0, 1], dtype=np.uint32)
    deltas = np.array([1, 3, 5], dtype=np.uint32)
    values = np.array([0.5, 32.0, -1.0], dtype=np.float32)
    arrays = unpack_row_block(pack_row_block(ref, lengths, deltas, values), 4)
    assert arrays.ref.tolist() == [0, 1, 0, 2]
    assert np.array_equal(arrays.lengths, lengths) and np.array_equal(arrays.deltas, deltas)
    assert np.array_equal(arrays.values, values)
    assert unpack_row_block(b"", 0).ref.size == 0
    with pytest.raises(CodecError):
        unpack_row_block(b"", 1)
    with pytest.raises(CodecError):
        unpack_row_block(pack_row_block(ref, lengths, deltas, values), 5)
    with pytest.raises(CodecError):
        unpack_row_block(b"not zstd", 1)
