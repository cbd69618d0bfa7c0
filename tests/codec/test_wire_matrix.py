"""Every wire codec combination round-trips: exact when lossless (float32), within one
quantization step when lossy (8 and 4 bits), with and without zstd, for every way
the receiver learns the mask (dense, bitmap, shared, implicit)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from strato import codec
from strato.codec import WireFormat, decode_values, encode_params
from strato.errors import CodecError
from strato.params import Params

try:
    import zstandard  # noqa: F401  # only probing whether the optional codec can run

    ZSTD: list[int | None] = [None, 3]
except ImportError:  # the zstd cases need the optional package; the rest still run
    ZSTD = [None]


def model() -> Params:
    rng = np.random.default_rng(5)
    return Params.from_arrays({
        "conv.weight": rng.normal(size=(6, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=6).astype(np.float32),
        "fc.weight": rng.normal(scale=0.05, size=(7, 9)).astype(np.float32),  # odd numel
        "fc.bias": rng.normal(size=7).astype(np.float32),
    })


def sparse_mask(p: Params) -> np.ndarray:
    """Half of every kernel, every bias (what a CS download carries)."""
    mask = np.random.default_rng(1).random(p.layout.numel) < 0.5
    for spec in p.layout.tensors:
        if len(spec.shape) == 1:
            mask[spec.offset // 4 : spec.end // 4] = True
    return mask


def one_step(p: Params, mask: np.ndarray | None, bits: int, implicit: bool) -> np.ndarray:
    """The quantization step at every carried position (0 on float32 biases)."""
    out = []
    for spec in p.layout.tensors:
        sl = slice(spec.offset // 4, spec.end // 4)
        vals = p.flat()[sl] if mask is None else p.flat()[sl][mask[sl]]
        if bits == 32 or len(spec.shape) < 2:
            out.append(np.zeros(vals.size))
        elif implicit:
            mag = np.abs(vals)
            out.append(np.full(vals.size, (mag.max() - mag.min()) / ((1 << (bits - 1)) - 2)))
        else:
            out.append(np.full(vals.size, (vals.max() - vals.min()) / ((1 << bits) - 1)))
    return np.concatenate(out)


CASES = [
    (bits, kind, level)
    for bits, kind, level in itertools.product((32, 8, 4), ("all", "bitmap", "shared",
                                                            "implicit"), ZSTD)
    if not (kind == "implicit" and bits == 32)  # an implicit mask needs quantization
]


@pytest.mark.parametrize(("bits", "kind", "level"), CASES)
def test_every_codec_round_trips(bits: int, kind: str, level: int | None) -> None:
    p = model()
    mask = None if kind == "all" else sparse_mask(p)
    fmt = WireFormat(bits=bits, mask="bitmap" if kind == "all" else kind, zstd_level=level)
    enc = encode_params(p, mask, fmt, seed=11)
    assert enc.nbytes == len(enc.payload)
    d = decode_values(enc.payload, shared_mask=mask if kind == "shared" else None,
                      expect=p.layout)
    expected = p.flat() if mask is None else p.flat()[mask]
    if mask is None:
        assert d.mask is None
    else:
        assert np.array_equal(d.mask, mask)  # the positions come back exactly
    if bits == 32:
        assert np.array_equal(d.values, expected)
    else:
        err = np.abs(d.values.astype(np.float64) - expected)
        assert np.all(err <= one_step(p, mask, bits, kind == "implicit") * (1 + 1e-5) + 1e-7)
        assert np.any(err > 0)  # lossy indeed: the test tells quantization from a no-op


def test_dense_safetensors_round_trips_bit_for_bit() -> None:
    p = model()
    enc = codec.encode(p)
    assert enc.nbytes == len(enc.payload) == codec.encoded_size(p)
    assert np.array_equal(codec.decode(enc.payload).flat(), p.flat())


@pytest.mark.parametrize("bits", [8, 4])
def test_non_finite_values_are_refused_by_the_quantizers(bits: int) -> None:
    p = model()
    p.flat()[3] = np.nan
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode_params(p, None, WireFormat(bits=bits))
    p.flat()[3] = np.inf
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode_params(p, None, WireFormat(bits=bits))
    # float32 carries them as they are (lossless), for the receiver to judge
    d = decode_values(encode_params(p, None, WireFormat()).payload)
    assert np.isinf(d.values[3])
