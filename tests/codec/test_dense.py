"""Parameter buffers and the safetensors codec."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strato.codec import decode, encode, encode_into, encoded_size, read_header
from strato.errors import CodecError, LayoutError
from strato.params import DTYPES, Layout, Params

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=12)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
layouts = st.lists(
    st.tuples(names, st.sampled_from(sorted(DTYPES)), shapes),
    min_size=0,
    max_size=6,
    unique_by=lambda e: e[0],
).filter(lambda entries: all(e[0] != "__metadata__" for e in entries)).map(Layout.of)


@settings(max_examples=200, deadline=None)
@given(layout=layouts, seed=st.integers(0, 2**32 - 1))
def test_codec_round_trips_bit_for_bit(layout: Layout, seed: int) -> None:
    rng = np.random.default_rng(seed)
    params = Params(layout, rng.integers(0, 256, layout.nbytes, dtype=np.uint8))
    enc = encode(params, metadata={"round": "3"})
    assert enc.nbytes == len(enc.payload) == encoded_size(params, {"round": "3"})
    back = decode(enc.payload)
    assert back.layout == layout
    assert back.bitwise_equal(params)  # NaN payloads and -0.0 included: bytes compare
    out = bytearray(enc.nbytes)
    assert encode_into(params, out, {"round": "3"}) == enc.nbytes
    assert bytes(out) == enc.payload


def test_decode_is_zero_copy() -> None:
    params = Params.from_arrays({"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
    payload = bytearray(encode(params).payload)
    view = decode(payload)
    payload[-4:] = np.float32(99).tobytes()
    assert view["w"][2, 3] == 99  # the decoded tensor is a view of the payload


def test_views_share_the_one_buffer() -> None:
    p = Params.from_arrays({"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)})
    p["b"][1] = 5
    assert p.flat()[5] == 5
    assert p.flat().shape == (7,)
    assert np.shares_memory(p["a"], p.buffer)


def test_interoperates_with_the_safetensors_library() -> None:
    from safetensors.numpy import load, save

    arrays = {"conv.w": np.random.rand(4, 3).astype(np.float32), "n": np.arange(5)}
    theirs = decode(save(arrays))
    for k, v in arrays.items():
        np.testing.assert_array_equal(theirs[k], v)
    ours = load(encode(Params.from_arrays(arrays)).payload)
    for k, v in arrays.items():
        np.testing.assert_array_equal(ours[k], v)


def test_torch_state_dict_round_trip() -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    sd = model.state_dict()
    sd["half"] = torch.randn(3).to(torch.bfloat16)
    params = Params.from_state_dict(sd)
    assert params.layout.spec("1.num_batches_tracked").dtype == "I64"
    back = decode(encode(params).payload).to_state_dict()
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    assert back["half"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"abc", "too short"),
        ((10**6).to_bytes(8, "little") + b"{}", "truncated"),
        ((4).to_bytes(8, "little") + b"nope", "not valid JSON"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    ],
)
def test_corrupt_payloads_give_clear_errors(payload: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        read_header(payload)


def test_truncated_and_wrong_layout_payloads_are_refused() -> None:
    params = Params.from_arrays({"w": np.zeros(10, np.float32)})
    payload = encode(params).payload
    with pytest.raises(CodecError, match="truncated"):
        decode(payload[:-4])
    other = Layout.of([("w", "F32", (11,))])
    with pytest.raises(LayoutError, match=r"expected F32\[11\], got F32\[10\]"):
        decode(payload, expect=other)


def test_layout_rejects_bad_entries() -> None:
    with pytest.raises(LayoutError, match="twice"):
        Layout.of([("a", "F32", (1,)), ("a", "F32", (1,))])
    with pytest.raises(LayoutError, match="unknown dtype"):
        Layout.of([("a", "F128", (1,))])
    with pytest.raises(LayoutError, match="needs 8"):
        Params(Layout.of([("a", "F32", (2,))]), b"\0" * 7)
    assert Layout.from_json(Layout.of([("a", "F32", (2, 3))]).to_json()).spec("a").shape == (2, 3)
