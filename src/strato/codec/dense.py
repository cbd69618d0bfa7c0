"""The dense wire format of parameters: a safetensors file.

A safetensors file is an 8-byte little-endian header length, a JSON header, then
the tensors' bytes back to back. A ``Params`` buffer already *is* that data section,
so encoding writes a small header and one block copy, and decoding returns a view of
the payload (no copy) when the payload's memory allows it. Every encode reports the
exact number of bytes it produced: that is what the cost accounting counts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from strato.errors import CodecError, LayoutError
from strato.params import Layout, Params

__all__ = [
    "Encoded",
    "decode",
    "encode",
    "encode_into",
    "encoded_size",
    "header_bytes",
    "read_header",
]

_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces


@dataclass(frozen=True)
class Encoded:
    """An encoded payload and its exact size on the wire."""

    payload: bytes
    codec: str = "safetensors"

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def header_bytes(layout: Layout, metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a safetensors file for ``layout``."""
    head: dict[str, Any] = {}
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for t in layout.tensors:
        head[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.offset, t.end]}
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def encoded_size(params: Params, metadata: dict[str, str] | None = None) -> int:
    return len(header_bytes(params.layout, metadata)) + params.layout.nbytes


def encode(params: Params, metadata: dict[str, str] | None = None) -> Encoded:
    """Encode to safetensors bytes (header + one copy of the buffer)."""
    head = header_bytes(params.layout, metadata)
    # bytes.join copies each part once into the result: one pass over the buffer.
    return Encoded(b"".join((head, params.buffer.data)))


def encode_into(params: Params, out: Any, metadata: dict[str, str] | None = None) -> int:
    """Write the encoding straight into a writable buffer (e.g. shared memory).

    Returns the number of bytes written; ``out`` must hold ``encoded_size(...)``.
    """
    head = header_bytes(params.layout, metadata)
    total = len(head) + params.layout.nbytes
    dst = np.frombuffer(out, dtype=np.uint8)
    if dst.nbytes < total:
        raise CodecError(f"output buffer holds {dst.nbytes} bytes, the encoding needs {total}")
    dst[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    dst[len(head) : total] = params.buffer
    return total


def read_header(data: Any) -> tuple[Layout, dict[str, str], int]:
    """Parse and validate a safetensors header: (layout, metadata, data offset)."""
    view = memoryview(data).cast("B")
    if len(view) < 8:
        raise CodecError(f"payload of {len(view)} bytes is too short to be safetensors")
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > _MAX_HEADER or 8 + n > len(view):
        raise CodecError(f"payload is truncated or corrupt: header of {n} bytes in {len(view)}")
    try:
        head = json.loads(bytes(view[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CodecError(f"payload header is not valid JSON: {exc}") from None
    if not isinstance(head, dict):
        raise CodecError("payload header is not a JSON object")
    meta = head.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CodecError("payload __metadata__ is not a JSON object")
    rows = []
    for name, info in head.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            rows.append((int(start), int(end), str(name), str(dtype), [int(d) for d in shape]))
        except (KeyError, TypeError, ValueError):
            raise CodecError(f"payload header entry {name!r} is malformed") from None
    # Order by offset; ties (empty tensors) keep header order, which is layout order.
    rows.sort(key=lambda r: (r[0], r[1]))
    try:
        layout = Layout.of((name, dtype, shape) for _, _, name, dtype, shape in rows)
    except LayoutError as exc:
        raise CodecError(f"payload header is invalid: {exc}") from None
    for (start, end, *_), spec in zip(rows, layout.tensors, strict=True):
        if (start, end) != (spec.offset, spec.end):
            raise CodecError(
                f"payload tensor {spec.name!r} has offsets that leave holes or overlap"
            )
    if 8 + n + layout.nbytes != len(view):
        raise CodecError(
            f"payload is truncated or padded: {len(view) - 8 - n} data bytes, "
            f"layout needs {layout.nbytes}"
        )
    return layout, {str(k): str(v) for k, v in meta.items()}, 8 + n


def decode(data: Any, expect: Layout | None = None) -> Params:
    """Decode safetensors bytes. Zero-copy: the result's buffer is a view of ``data``.

    With ``expect``, a payload of another layout is refused with a one-line reason.
    """
    layout, _meta, start = read_header(data)
    if expect is not None and layout != expect:
        raise LayoutError(f"wrong layout: {expect.describe_mismatch(layout)}")
    buf = np.frombuffer(data, dtype=np.uint8, count=layout.nbytes, offset=start)
    return Params(layout, buf)
