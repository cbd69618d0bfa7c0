"""Encode and decode masked, quantized, optionally zstd-compressed parameter payloads.

Everything works on the flat float32 element space of a layout: position ``i`` is
element ``i`` of ``Params.flat()``. A *mask* (flat bool array) says which positions
a payload carries; the values travel in layout order. How the receiver learns the
mask is part of the format:

- ``all``: no mask, every position (a dense payload);
- ``bitmap``: the mask travels as a packed bitmap (1 bit per position);
- ``shared``: the receiver already has the mask (CS uploads: both sides know it);
- ``implicit``: zero-code quantization; the mask is read back from the codes.

Payloads travel in the ``b"STW1"`` frame of ``_format``; ``quantized`` holds the
quantizers and ``zstd`` the optional body compression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.codec import quantized as _quant
from strato.codec import zstd as _zstd
from strato.codec._format import MAGIC, Header, frame, unframe
from strato.codec.dense import Encoded
from strato.errors import CodecError, ConfigError, LayoutError
from strato.params import Layout, Params, TensorSpec

__all__ = [
    "Decoded",
    "WireFormat",
    "decode_values",
    "encode_params",
    "encode_values",
    "is_wire_payload",
]

F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class WireFormat:
    """How to put values on the wire.

    ``bits``: 32 (float32), 8 or 4 (per-layer uniform quantization, stochastic
    rounding). ``mask``: how the receiver learns a sparse payload's mask (see the
    module docstring); dense payloads ignore it. ``zstd_level``: compress the body.
    Tensors with fewer than 2 dimensions (biases) stay float32 unless
    ``quantize_biases``: they are a tiny share of the bytes and the costliest place
    for noise.
    """

    bits: int = 32
    mask: str = "bitmap"
    zstd_level: int | None = None
    quantize_biases: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (32, 8, 4):
            raise ConfigError(f"wire bits must be 32, 8 or 4, got {self.bits}")
        if self.mask not in ("bitmap", "shared", "implicit"):
            raise ConfigError(f"wire mask must be bitmap, shared or implicit, got {self.mask!r}")
        if self.mask == "implicit" and self.bits == 32:
            raise ConfigError("an implicit mask needs quantization (bits 8 or 4)")
        if self.zstd_level is not None and not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"zstd level must be between 1 and 22, got {self.zstd_level}")

    def encoding(self, spec: TensorSpec, mask_kind: str) -> str:
        if self.bits == 32 or (len(spec.shape) < 2 and not self.quantize_biases):
            return "f32"
        return f"{'z' if mask_kind == 'implicit' else 'a'}{self.bits}"


@dataclass(frozen=True)
class Decoded:
    """A decoded payload: the values at the mask's positions, in layout order."""

    layout: Layout
    values: F32
    mask: Mask | None  # None: every position

    def to_params(self, base: Params | None = None) -> Params:
        """Scatter into a new Params: off-mask positions are zero, or ``base``'s values."""
        if base is not None and base.layout != self.layout:
            raise LayoutError(f"wrong layout: {self.layout.describe_mismatch(base.layout)}")
        out = Params(self.layout) if base is None else base.copy()
        flat = out.flat("F32")
        if self.mask is None:
            flat[:] = self.values
        else:
            flat[self.mask] = self.values
        return out


def is_wire_payload(payload: Any) -> bool:
    """A ``b"STW1"`` frame of this codec (not a dense safetensors file)."""
    return bytes(memoryview(payload)[:4]) == MAGIC


def _bits_bytes(n: int, enc: str) -> int:
    return {"f32": 4 * n, "a8": n, "z8": n, "a4": (n + 1) // 2, "z4": (n + 1) // 2}[enc]


def _elements(spec: TensorSpec) -> slice:
    return slice(spec.offset // 4, spec.end // 4)


def _check_layout(layout: Layout) -> None:
    if layout.tensors and layout.dtype() != "F32":
        raise LayoutError("the wire codecs need a layout whose tensors are all float32")


def encode_values(
    layout: Layout,
    values: npt.ArrayLike,
    mask: Mask | None = None,
    fmt: WireFormat | None = None,
    seed: int = 0,
) -> Encoded:
    """Encode ``values`` (one per True position of ``mask``, or per position if None)."""
    fmt = fmt or WireFormat()
    _check_layout(layout)
    vals = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    total = layout.numel
    if mask is not None:
        mask = np.asarray(mask, dtype=np.bool_).reshape(-1)
        if mask.size != total:
            raise LayoutError(f"mask has {mask.size} positions, the layout has {total}")
    expected = total if mask is None else int(mask.sum())
    if vals.size != expected:
        raise LayoutError(f"got {vals.size} values for {expected} masked positions")
    kind = "all" if mask is None else fmt.mask
    rng = np.random.default_rng(seed)
    parts: list[bytes] = []
    if kind == "bitmap":
        assert mask is not None
        parts.append(np.packbits(mask, bitorder="little").tobytes())
    enc, counts, ranges = [], [], []
    cursor = 0
    for spec in layout.tensors:
        sl = _elements(spec)
        tmask = None if mask is None else mask[sl]
        n = spec.numel if tmask is None else int(tmask.sum())
        tvals, cursor = vals[cursor : cursor + n], cursor + n
        e = fmt.encoding(spec, kind)
        rng_pair: tuple[float, float] | None = None
        if e != "f32" and not np.isfinite(tvals).all():
            # A quantizer range of NaN/Inf would decode to garbage (and is refused by the
            # decoder): say so at the sender, where the bad values come from.
            raise CodecError(f"tensor {spec.name!r} holds NaN or Inf values: "
                             f"they cannot be quantized")
        if e == "f32":
            if kind == "implicit" and n != spec.numel:
                raise ConfigError(
                    f"tensor {spec.name!r} is float32 and sparse: an implicit mask needs it dense"
                )
            parts.append(tvals.tobytes())
        elif e.startswith("z"):
            assert tmask is not None
            dense = np.zeros(spec.numel, np.float32)
            dense[tmask] = tvals
            codes, lo, hi = _quant.zero_code_encode(dense, tmask, fmt.bits, rng)
            rng_pair = (lo, hi)
            parts.append((_quant.pack_nibbles(codes) if fmt.bits == 4 else codes).tobytes())
        else:
            codes, lo, hi = _quant.affine_encode(tvals, fmt.bits, rng)
            rng_pair = (lo, hi)
            parts.append((_quant.pack_nibbles(codes) if fmt.bits == 4 else codes).tobytes())
        enc.append(e)
        counts.append(n)
        ranges.append(rng_pair)
    body = b"".join(parts)
    raw = len(body)
    if fmt.zstd_level is not None:
        body = _zstd.compress(body, fmt.zstd_level)
    header = Header(layout, kind, tuple(enc), tuple(counts), tuple(ranges), raw,
                    fmt.zstd_level is not None)
    return Encoded(frame(header, body), codec="strato-wire")


def encode_params(
    params: Params, mask: Mask | None = None, fmt: WireFormat | None = None, seed: int = 0
) -> Encoded:
    """Encode ``params``' values at ``mask``'s positions (all positions if None)."""
    flat = params.flat("F32") if params.layout.tensors else np.zeros(0, np.float32)
    return encode_values(params.layout, flat if mask is None else flat[mask], mask, fmt, seed)


def _expected_raw(head: Header) -> int:
    size = (head.layout.numel + 7) // 8 if head.mask == "bitmap" else 0
    for e, n, spec in zip(head.enc, head.counts, head.layout.tensors, strict=True):
        size += _bits_bytes(spec.numel if e.startswith("z") else n, e)
    return size


def _codes(chunk: bytes, e: str, count: int, name: str) -> npt.NDArray[np.uint8]:
    raw = np.frombuffer(chunk, dtype=np.uint8)
    if e.endswith("8"):
        codes = raw
    else:
        codes = _quant.unpack_nibbles(raw, count)
        if count % 2 and raw.size and raw[-1] >> 4:
            raise CodecError(f"payload tensor {name!r}: padding nibble is not zero")
    if e.startswith("z"):
        top = 2 * _quant.levels(int(e[1:]), zero_code=True)
        if codes.size and int(codes.max()) > top:
            raise CodecError(f"payload tensor {name!r}: code out of range")
    return codes


def decode_values(
    data: bytes | bytearray | memoryview,
    shared_mask: Mask | None = None,
    expect: Layout | None = None,
) -> Decoded:
    """Decode a wire payload; ``shared_mask`` is needed for (and only for) ``shared`` ones."""
    head, body_view = unframe(data)
    layout = head.layout
    if expect is not None and layout != expect:
        raise LayoutError(f"wrong layout: {expect.describe_mismatch(layout)}")
    expected = _expected_raw(head)
    if head.raw != expected:
        raise CodecError(f"payload header says {head.raw} body bytes, its tensors need {expected}")
    if head.zstd:
        body = _zstd.decompress(bytes(body_view), head.raw)
    elif len(body_view) != head.raw:
        raise CodecError(f"payload is truncated or padded: {len(body_view)} body bytes, "
                         f"expected {head.raw}")
    else:
        body = bytes(body_view)
    total = layout.numel
    mask: Mask | None = None
    pos = 0
    if head.mask == "bitmap":
        nb = (total + 7) // 8
        bits = np.unpackbits(np.frombuffer(body, np.uint8, nb), bitorder="little")
        if bits[total:].any():
            raise CodecError("payload bitmap has bits set past the last position")
        mask, pos = bits[:total].astype(np.bool_), nb
    elif head.mask == "shared":
        if shared_mask is None:
            raise CodecError("payload was sent against a shared mask; pass shared_mask to decode")
        mask = np.asarray(shared_mask, dtype=np.bool_).reshape(-1)
        if mask.size != total:
            raise CodecError(f"shared mask has {mask.size} positions, the payload has {total}")
    elif head.mask == "implicit":
        mask = np.zeros(total, np.bool_)
    out: list[F32] = []
    for e, n, rng, spec in zip(head.enc, head.counts, head.ranges, layout.tensors, strict=True):
        sl = _elements(spec)
        if mask is not None and head.mask != "implicit" and int(mask[sl].sum()) != n:
            raise CodecError(f"payload tensor {spec.name!r}: mask has {int(mask[sl].sum())} "
                             f"positions for {n} values")
        width = spec.numel if e.startswith("z") else n
        size = _bits_bytes(width, e)
        chunk, pos = body[pos : pos + size], pos + size
        if e == "f32":
            vals = np.frombuffer(chunk, dtype="<f4").astype(np.float32)
            if head.mask == "implicit":
                if n != spec.numel:
                    raise CodecError(f"payload tensor {spec.name!r}: sparse float32 tensor "
                                     "in an implicit-mask payload")
                assert mask is not None
                mask[sl] = True
        elif e.startswith("z"):
            assert rng is not None and mask is not None
            tmask, vals = _quant.zero_code_decode(
                _codes(chunk, e, width, spec.name), int(e[1:]), *rng
            )
            if vals.size != n:
                raise CodecError(f"payload tensor {spec.name!r}: {vals.size} coded values, "
                                 f"header says {n}")
            mask[sl] = tmask
        else:
            assert rng is not None
            vals = _quant.affine_decode(_codes(chunk, e, width, spec.name), int(e[1:]), *rng)
        out.append(vals)
    values = np.concatenate(out) if out else np.zeros(0, np.float32)
    return Decoded(layout, values, mask)
