"""Wire codecs: round trips (exact for lossless, within one step for lossy), exact
byte counts, and CodecError on truncated or corrupt payloads."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strato import codec
from strato.codec import MAGIC, WireFormat, decode_values, encode_params, encode_values
from strato.codec import zstd as zstd_module
from strato.errors import CodecError, ConfigError, LayoutError
from strato.params import Layout, Params


def model(seed: int = 0) -> Params:
    rng = np.random.default_rng(seed)
    return Params.from_arrays({
        "conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=8).astype(np.float32),
        "fc.weight": rng.normal(scale=0.1, size=(10, 31)).astype(np.float32),  # odd numel
        "fc.bias": rng.normal(size=10).astype(np.float32),
    })


def random_mask(p: Params, density: float, seed: int = 1, dense_biases: bool = False) -> np.ndarray:
    mask = np.random.default_rng(seed).random(p.layout.numel) < density
    if dense_biases:
        for spec in p.layout.tensors:
            if len(spec.shape) == 1:
                mask[spec.offset // 4 : spec.end // 4] = True
    return mask


def steps(fmt: WireFormat, p: Params, mask: np.ndarray | None) -> np.ndarray:
    """One quantization step per position carried (0 for float32 tensors)."""
    out = []
    for spec in p.layout.tensors:
        sl = slice(spec.offset // 4, spec.end // 4)
        vals = p.flat()[sl] if mask is None else p.flat()[sl][mask[sl]]
        if fmt.encoding(spec, "all" if mask is None else fmt.mask) == "f32" or vals.size == 0:
            out.append(np.zeros(vals.size))
        elif fmt.mask == "implicit" and mask is not None:
            mag = np.abs(vals)
            out.append(np.full(vals.size, (mag.max() - mag.min()) / ((1 << (fmt.bits - 1)) - 2)))
        else:
            out.append(np.full(vals.size, (vals.max() - vals.min()) / ((1 << fmt.bits) - 1)))
    return np.concatenate(out)


LOSSLESS = [WireFormat(), WireFormat(mask="shared"), WireFormat(zstd_level=3),
            WireFormat(mask="shared", zstd_level=19)]
LOSSY = [WireFormat(bits=8), WireFormat(bits=4), WireFormat(bits=4, quantize_biases=True),
         WireFormat(bits=8, mask="shared", zstd_level=5), WireFormat(bits=4, mask="implicit"),
         WireFormat(bits=8, mask="implicit", zstd_level=19)]


@pytest.mark.parametrize("fmt", LOSSLESS)
@pytest.mark.parametrize("density", [None, 0.0, 0.3, 1.0])
def test_lossless_round_trip_is_exact(fmt: WireFormat, density: float | None) -> None:
    p = model()
    mask = None if density is None else random_mask(p, density)
    enc = encode_params(p, mask, fmt)
    d = decode_values(enc.payload, shared_mask=mask, expect=p.layout)
    expected = p.flat() if mask is None else p.flat()[mask]
    assert d.values.dtype == np.float32 and np.array_equal(d.values, expected)
    assert (d.mask is None) if mask is None else np.array_equal(d.mask, mask)
    assert enc.nbytes == len(enc.payload)
    back = d.to_params()
    assert np.array_equal(back.flat()[mask] if mask is not None else back.flat(), expected)
    if mask is not None:
        assert not back.flat()[~mask].any()
        base = model(9)
        onto = d.to_params(base)  # off-mask positions keep base's values
        assert np.array_equal(onto.flat()[~mask], base.flat()[~mask])
        assert np.array_equal(onto.flat()[mask], expected)


@pytest.mark.parametrize("fmt", LOSSY)
@pytest.mark.parametrize("density", [None, 0.5])
def test_lossy_round_trip_is_within_one_step(fmt: WireFormat, density: float | None) -> None:
    p = model()
    implicit = fmt.mask == "implicit" and density is not None
    mask = None if density is None else random_mask(p, density, dense_biases=implicit)
    d = decode_values(encode_params(p, mask, fmt, seed=7).payload, shared_mask=mask)
    expected = p.flat() if mask is None else p.flat()[mask]
    err = np.abs(d.values.astype(np.float64) - expected)
    step = steps(fmt, p, mask)
    assert np.all(err <= step * (1 + 1e-5) + 1e-7)
    assert np.any(err > 0)  # it is lossy: the test can tell a no-op from quantization
    if mask is not None:
        assert np.array_equal(d.mask, mask)  # the mask survives exactly, implicit ones too


def test_biases_stay_float32_unless_asked() -> None:
    p = model()
    d = decode_values(encode_params(p, None, WireFormat(bits=4)).payload)
    out = d.to_params()
    assert np.array_equal(out["fc.bias"], p["fc.bias"])
    assert not np.array_equal(out["fc.weight"], p["fc.weight"])


def test_stochastic_rounding_is_seeded_and_unbiased() -> None:
    p = model()
    fmt = WireFormat(bits=4)
    a, b = encode_params(p, None, fmt, seed=3), encode_params(p, None, fmt, seed=3)
    assert a.payload == b.payload
    assert encode_params(p, None, fmt, seed=4).payload != a.payload
    runs = np.stack([decode_values(encode_params(p, None, fmt, seed=s).payload).values
                     for s in range(400)])
    step = steps(fmt, p, None)
    quantized = step > 0
    bias = np.abs(runs.mean(0) - p.flat())[quantized]
    # the mean of 400 draws with variance <= step²/4 is within 5 standard errors
    assert np.all(bias <= 5 * step[quantized] / 2 / np.sqrt(400))


def test_byte_counts_match_the_format() -> None:
    p = model()
    mask = random_mask(p, 0.25)
    k, n = int(mask.sum()), p.layout.numel
    head = lambda e: struct.unpack_from("<I", e.payload, 4)[0] + 8  # noqa: E731  (tiny helper)
    bitmap = encode_params(p, mask, WireFormat())
    assert bitmap.nbytes - head(bitmap) == (n + 7) // 8 + 4 * k
    shared = encode_params(p, mask, WireFormat(mask="shared"))
    assert shared.nbytes - head(shared) == 4 * k
    dense = encode_params(p, None, WireFormat())
    assert dense.nbytes - head(dense) == 4 * n
    q4 = encode_params(p, None, WireFormat(bits=4, quantize_biases=True))
    assert q4.nbytes - head(q4) == sum((t.numel + 1) // 2 for t in p.layout.tensors)
    # the float32 body is the safetensors data section: same bytes, smaller header
    assert dense.payload[head(dense):] == codec.encode(p).payload[-4 * n:]


def test_zstd_shrinks_a_compressible_payload() -> None:
    p = Params.from_arrays({"w": np.zeros((100, 100), np.float32)})
    plain = encode_params(p, None, WireFormat())
    packed = encode_params(p, None, WireFormat(zstd_level=3))
    assert packed.nbytes < plain.nbytes / 20
    assert np.array_equal(decode_values(packed.payload).values, p.flat())


def test_bad_inputs_are_refused() -> None:
    p = model()
    with pytest.raises(LayoutError):
        encode_values(p.layout, np.zeros(3, np.float32), None)
    with pytest.raises(LayoutError):
        encode_values(p.layout, np.zeros(3, np.float32), np.zeros(5, bool))
    with pytest.raises(LayoutError):
        encode_params(Params.from_arrays({"w": np.zeros((2, 2), np.float64)}))
    with pytest.raises(ConfigError):
        WireFormat(bits=16)
    with pytest.raises(ConfigError):
        WireFormat(bits=32, mask="implicit")
    with pytest.raises(ConfigError):  # a sparse float32 bias cannot carry an implicit mask
        encode_params(p, random_mask(p, 0.5), WireFormat(bits=4, mask="implicit"))
    with pytest.raises(LayoutError):
        decode_values(encode_params(p).payload, expect=Layout.of([("x", "F32", [3])]))


def corrupt_cases() -> list[tuple[str, bytes, np.ndarray | None]]:
    p = model()
    mask = random_mask(p, 0.4, dense_biases=True)
    bitmap = encode_params(p, mask, WireFormat()).payload
    shared = encode_params(p, mask, WireFormat(mask="shared")).payload
    implicit = encode_params(p, mask, WireFormat(bits=4, mask="implicit")).payload
    packed = encode_params(p, mask, WireFormat(bits=8, zstd_level=3)).payload
    hlen = struct.unpack_from("<I", bitmap, 4)[0]
    flipped = bytearray(bitmap)
    flipped[8 + hlen] ^= 0x01  # one bit of the bitmap: counts no longer match
    ihead = struct.unpack_from("<I", implicit, 4)[0]
    bad_code = bytearray(implicit)
    bad_code[8 + ihead] = 0xFF  # code 15 does not exist in a 4-bit zero-code tensor
    head = json.loads(bitmap[8 : 8 + hlen])
    head["n"][0] += 1
    lying = json.dumps(head).encode()
    lying = MAGIC + struct.pack("<I", len(lying)) + lying + bitmap[8 + hlen :]
    zbody = bytearray(packed)
    zbody[-5] ^= 0xFF
    return [
        ("empty", b"", None),
        ("magic", b"XXXX" + bitmap[4:], None),
        ("header too long", bitmap[:4] + struct.pack("<I", 10**9) + bitmap[8:], None),
        ("header not json", bitmap[:8] + b"{" * hlen + bitmap[8 + hlen :], None),
        ("truncated", bitmap[:-1], None),
        ("padded", bitmap + b"\0", None),
        ("bitmap bit flipped", bytes(flipped), None),
        ("lying count", lying, None),
        ("shared mask missing", shared, None),
        ("shared mask wrong size", shared, np.ones(5, bool)),
        ("shared mask wrong", shared, ~mask),
        ("zero-code out of range", bytes(bad_code), None),
        ("zstd corrupt", bytes(zbody), None),
        ("zstd truncated", packed[:-3], None),
        ("safetensors is not this format", codec.encode(p).payload, None),
    ]


@pytest.mark.parametrize("name,payload,shared", corrupt_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_corrupt_payloads_raise_codec_error(
    name: str, payload: bytes, shared: np.ndarray | None
) -> None:
    with pytest.raises(CodecError):
        decode_values(payload, shared_mask=shared)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_truncation_or_byte_flip_is_a_codec_error_or_decodes(data: st.DataObject) -> None:
    p = model()
    mask = random_mask(p, 0.5, dense_biases=True)
    fmt = data.draw(st.sampled_from([WireFormat(), WireFormat(bits=4, mask="implicit"),
                                     WireFormat(bits=8, zstd_level=3)]))
    payload = bytearray(encode_params(p, mask, fmt).payload)
    if data.draw(st.booleans()):
        payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
        with pytest.raises(CodecError):
            decode_values(bytes(payload))
        return
    pos = data.draw(st.integers(0, len(payload) - 1))
    payload[pos] ^= data.draw(st.integers(1, 255))
    try:
        d = decode_values(bytes(payload))
    except CodecError:
        return
    assert d.values.dtype == np.float32 and d.layout.numel == p.layout.numel


def test_zstd_missing_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    p = model()
    payload = encode_params(p, None, WireFormat(zstd_level=3)).payload
    monkeypatch.setattr(zstd_module, "_module", lambda: None)
    with pytest.raises(ConfigError, match="zstandard"):
        encode_params(p, None, WireFormat(zstd_level=3))
    with pytest.raises(CodecError, match="zstandard"):
        decode_values(payload)
    assert np.array_equal(decode_values(encode_params(p).payload).values, p.flat())
