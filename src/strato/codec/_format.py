"""The framing shared by every sparse/quantized payload: magic, JSON header, body.

``b"STW1"`` | u32 little-endian header length | JSON header | body. The header says
how every tensor was encoded, so a payload describes itself and the decoder can
check every length before it touches the body. The body may be zstd-compressed;
the header never is (it is small, and validating it first bounds the work).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from strato.errors import CodecError, LayoutError
from strato.params import Layout

__all__ = ["MAGIC", "Header", "frame", "unframe"]

MAGIC = b"STW1"
_PREFIX = struct.Struct("<4sI")
_MAX_HEADER = 16 * 1024 * 1024

MASK_KINDS = ("all", "bitmap", "shared", "implicit")
ENCODINGS = ("f32", "a8", "a4", "z8", "z4")


@dataclass(frozen=True)
class Header:
    """What the decoder needs to know, per tensor in layout order."""

    layout: Layout
    mask: str  # all | bitmap | shared | implicit
    enc: tuple[str, ...]  # f32 | a8 | a4 (affine) | z8 | z4 (zero-code, implicit mask)
    counts: tuple[int, ...]  # values carried per tensor
    ranges: tuple[tuple[float, float] | None, ...]  # quantizer range per tensor
    raw: int  # body size before zstd
    zstd: bool

    def to_json(self) -> bytes:
        head = {
            "layout": json.loads(self.layout.to_json()),
            "mask": self.mask,
            "enc": list(self.enc),
            "n": list(self.counts),
            # float32 -> float64 -> JSON repr round-trips exactly.
            "q": [list(r) if r is not None else None for r in self.ranges],
            "raw": self.raw,
            "zstd": self.zstd,
        }
        return json.dumps(head, separators=(",", ":")).encode()


def frame(header: Header, body: bytes) -> bytes:
    head = header.to_json()
    return b"".join((_PREFIX.pack(MAGIC, len(head)), head, body))


def _get(head: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = head.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CodecError(f"payload header field {key!r} is missing or malformed")
    return value


def _range(item: Any, enc: str) -> tuple[float, float] | None:
    if enc == "f32":
        if item is not None:
            raise CodecError("payload header gives a quantizer range for a float32 tensor")
        return None
    if not (isinstance(item, list) and len(item) == 2
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in item)):
        raise CodecError("payload header quantizer range is malformed")
    lo, hi = float(item[0]), float(item[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise CodecError(f"payload header quantizer range [{lo}, {hi}] is invalid")
    return lo, hi


def unframe(data: Any) -> tuple[Header, memoryview]:
    """Parse and validate the header; returns it and the (possibly compressed) body."""
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise CodecError(f"payload of {len(view)} bytes is too short to be a strato wire payload")
    magic, n = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError(f"payload does not start with {MAGIC!r} (got {bytes(magic)!r})")
    if n > _MAX_HEADER or _PREFIX.size + n > len(view):
        raise CodecError(f"payload is truncated or corrupt: header of {n} bytes in {len(view)}")
    try:
        head = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + n]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CodecError(f"payload header is not valid JSON: {exc}") from None
    if not isinstance(head, dict):
        raise CodecError("payload header is not a JSON object")
    try:
        layout = Layout.from_json(json.dumps(_get(head, "layout", list)))
    except LayoutError as exc:
        raise CodecError(f"payload layout is invalid: {exc}") from None
    if layout.tensors and layout.dtype() != "F32":
        raise CodecError("payload layout is not all float32")
    mask = _get(head, "mask", str)
    if mask not in MASK_KINDS:
        raise CodecError(f"payload mask kind {mask!r} is unknown")
    enc, counts, ranges = (_get(head, k, list) for k in ("enc", "n", "q"))
    ntensors = len(layout.tensors)
    if not len(enc) == len(counts) == len(ranges) == ntensors:
        raise CodecError("payload header lists do not match the number of tensors")
    for e, c, spec in zip(enc, counts, layout.tensors, strict=True):
        if e not in ENCODINGS:
            raise CodecError(f"payload tensor {spec.name!r}: unknown encoding {e!r}")
        if e.startswith("z") != (mask == "implicit") and e != "f32":
            raise CodecError(f"payload tensor {spec.name!r}: encoding {e!r} with mask {mask!r}")
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= spec.numel:
            raise CodecError(f"payload tensor {spec.name!r}: value count {c!r} is invalid")
        if mask == "all" and c != spec.numel:
            raise CodecError(f"payload tensor {spec.name!r}: dense tensor with {c} values")
    header = Header(
        layout=layout,
        mask=mask,
        enc=tuple(enc),
        counts=tuple(counts),
        ranges=tuple(_range(r, e) for r, e in zip(ranges, enc, strict=True)),
        raw=_get(head, "raw", int),
        zstd=_get(head, "zstd", bool),
    )
    return header, view[_PREFIX.size + n :]
