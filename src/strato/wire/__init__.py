"""Wire codecs beyond dense safetensors: masked values, 8/4-bit quantization, zstd.

Dense float32 payloads stay in ``strato.codec`` (safetensors). This package encodes
the values at a subset of positions (a mask), optionally quantized per layer with
seeded stochastic rounding, optionally zstd-compressed, in a self-describing frame
(a small JSON header + raw arrays, never pickle). Every ``encode_*`` returns an
``Encoded`` whose ``nbytes`` is the exact size on the wire; decoding validates the
header against the body and raises ``CodecError`` on truncated or corrupt input.
"""

from strato.wire._codec import Decoded, WireFormat, decode_values, encode_params, encode_values
from strato.wire._format import MAGIC

__all__ = ["MAGIC", "Decoded", "WireFormat", "decode_values", "encode_params", "encode_values"]
