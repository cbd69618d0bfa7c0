"""What a Complement Sparsification run puts on the wire, both ways, every round.

The defaults are faithful CS: round 1 goes dense (safetensors both ways), then the
server sends the float32 sparse model with a bitmap (``encode_download``) and a client
returns its float32 complement and biases against the shared mask (``encode_upload``).

``ComplementWire.build(bits, zstd_level, kept_rate)`` turns that into the combined
mode (docs/sparsity.md, "The combined mode"):

- ``bits`` 8 or 4: kernels are quantized per layer with seeded stochastic rounding
  both ways. The sparse download uses zero codes (``implicit`` mask: code 0 = pruned,
  no bitmap travels). Round 1 goes down as an 8-bit dense model, and the server adopts
  exactly what its clients decode (``adopt``) so their deltas apply to the model they
  were computed from; it comes back as 8-bit dense deltas.
- ``zstd_level``: every wire payload's body is zstd-compressed.
- ``kept_rate``: from round 2 the upload is the client's full dense delta against the
  model it decoded (kept weights learn too), not its complement.

Uploads are decoded into *model space* (``decode_upload``): a full-length vector whose
example-weighted mean is what the server merges (``merge`` / ``merge_kept``): a delta
comes back as ``base + delta`` (``base`` = the exact model the server sent), a
complement as its values in place and zero elsewhere, a dense safetensors model (a
client that knows nothing of the codec) as itself. Biases travel as float32.

This module only composes: every byte layout it sends is defined in ``strato.codec``
(dense safetensors, the masked/quantized/zstd ``STW1`` frame); it lives in
``strategy/`` because it pairs those formats with the CS math of ``complement``.
``is_wire_payload`` is ``strato.codec.masked``'s, re-exported for its callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from strato import codec
from strato.codec import WireFormat, decode_values, encode_params, encode_values
from strato.codec.masked import is_wire_payload
from strato.errors import CodecError
from strato.params import Params
from strato.strategy.complement import (
    decode_upload,
    encode_download,
    encode_upload,
)

__all__ = ["ComplementWire", "is_wire_payload"]

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ComplementWire:
    """The wire formats of a CS run (defaults: faithful CS, float32, no zstd)."""

    first_down: WireFormat | None = None  # None: dense safetensors
    first_up: WireFormat | None = None  # None: dense safetensors weights; else a coded delta
    down: WireFormat = field(default_factory=lambda: WireFormat(mask="bitmap"))
    up: WireFormat = field(default_factory=lambda: WireFormat(mask="shared"))
    deltas: bool = False  # after round 1: dense deltas (kept_rate) instead of complements

    @classmethod
    def build(cls, bits: int = 32, zstd_level: int | None = None,
              kept_rate: float | None = None, first_bits: int = 8) -> ComplementWire:
        """The formats for ``bits`` (32, 8 or 4), ``zstd_level`` (None: off) and
        ``kept_rate`` (None: faithful complement uploads). ``first_bits`` is round 1's
        width when ``bits`` < 32."""
        level = zstd_level or None
        if bits < 32:
            first: WireFormat | None = WireFormat(bits=first_bits, zstd_level=level)
            down = WireFormat(bits=bits, mask="implicit", zstd_level=level)
        else:
            # float32 is lossless: round 1 stays safetensors unless zstd is asked for
            first = WireFormat(zstd_level=level) if level else None
            down = WireFormat(mask="bitmap", zstd_level=level)
        return cls(first_down=first, first_up=first, down=down,
                   up=WireFormat(bits=bits, mask="shared", zstd_level=level),
                   deltas=kept_rate is not None)

    @property
    def lossy_first(self) -> bool:
        """Round 1's download is quantized: the server must adopt what clients decode."""
        return self.first_down is not None and self.first_down.bits < 32

    def fetches_download(self, first: bool) -> bool:
        """Clients fetch a coded download (not the dense model blob) in this round."""
        return not first or self.first_down is not None

    # --- server -> clients -----------------------------------------------------------

    def encode_download(self, model: Params, first: bool, seed: int = 0) -> codec.Encoded:
        """The round's download: the dense model in round 1 (``first``), else the sparse
        ``w_s``. Round 1 without a first-round format is plain safetensors."""
        if first:
            if self.first_down is None:
                return codec.encode(model)
            return encode_params(model, None, self.first_down, seed)
        return encode_download(model, self.down, seed)

    def adopt(self, model: Params, seed: int = 0) -> tuple[Params, bytes]:
        """Round 1: the download of ``model`` and the model the clients decode from it,
        which the server takes as the round's input model."""
        payload = self.encode_download(model, first=True, seed=seed).payload
        if not is_wire_payload(payload):
            return model.copy(), payload
        return decode_values(payload, expect=model.layout).to_params(), payload

    # --- clients -> server -----------------------------------------------------------

    def encode_upload(self, received: Params, trained: Params, first: bool,
                      seed: int = 0) -> codec.Encoded:
        """A client's upload: ``received`` is the model it decoded, ``trained`` the
        result of its training on it."""
        if first and self.first_up is None:
            return codec.encode(trained)
        if first or self.deltas:
            fmt = self.first_up if first else self.up
            assert fmt is not None
            delta = trained.flat("F32") - received.flat("F32")
            return encode_values(trained.layout, delta, None, fmt, seed)
        # faithful CS: the trained kernel values where the received model is zero, and biases
        return encode_upload(received, trained, self.up, seed)

    def decode_upload(self, payload: Any, base: Params, first: bool) -> F32:
        """An upload in model space (full length). ``base`` is the exact model the
        server sent this round (its dense record). Raises CodecError / LayoutError."""
        if not (first or self.deltas):
            # complement of what the server sent, or a dense model reduced to it
            return decode_upload(payload, base)
        if not is_wire_payload(payload):  # dense weights (a client that knows no codec)
            return np.array(codec.decode(payload, expect=base.layout).flat("F32"), np.float32)
        d = decode_values(payload, expect=base.layout)
        if d.mask is not None:
            raise CodecError("this round expects a dense delta, the upload is sparse")
        out: F32 = base.flat("F32") + d.values
        return out
