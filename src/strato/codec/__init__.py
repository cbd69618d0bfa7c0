"""Every wire format of Strato, in one package (no pickle anywhere).

What travels, and where its byte layout is defined:

- ``dense``: model parameters as a safetensors file (8-byte header length, JSON
  header, the ``Params`` buffer as the data section); decoding is zero-copy. The
  default for every model and update. Its names are re-exported here:
  ``Encoded``, ``encode``, ``encode_into``, ``encoded_size``, ``decode``,
  ``header_bytes``, ``read_header``.
- ``masked``: values at a subset of positions (a mask sent as a bitmap, shared by
  both ends, or implied by zero codes), optionally quantized and zstd-compressed, in
  the self-describing ``b"STW1"`` frame of ``_format``. Re-exported here:
  ``MAGIC``, ``WireFormat``, ``Decoded``, ``encode_values``, ``encode_params``,
  ``decode_values``. Its parts: ``quantized`` (per-layer 8/4-bit quantizers with
  seeded stochastic rounding, nibble packing), ``zstd`` (optional body compression;
  needs the ``zstandard`` package, imported only when used).
- ``partials``: a FedAvg partial sum between aggregators (``b"STRATOP1"`` header,
  then the float64 sum); ``strategy.fedavg`` holds the math and re-exports it.
- ``rows``: inference activation row blocks (counts, twin references, row lengths,
  column deltas and values, zstd-compressed) and safetensors array containers;
  ``inference`` converts CSR matrices to and from the block's arrays.

Complement Sparsification's choice of formats per round and direction
(``strategy.complement_wire``) stays in ``strategy/``: it composes the formats above
with the CS math of ``strategy.complement`` and defines no byte layout of its own.

This package imports only numpy, safetensors, zstandard (lazily), ``strato.params``
and ``strato.errors``.
"""

from strato.codec._format import MAGIC
from strato.codec.dense import (
    Encoded,
    decode,
    encode,
    encode_into,
    encoded_size,
    header_bytes,
    read_header,
)
from strato.codec.masked import Decoded, WireFormat, decode_values, encode_params, encode_values

__all__ = [
    "MAGIC",
    "Decoded",
    "Encoded",
    "WireFormat",
    "decode",
    "decode_values",
    "encode",
    "encode_into",
    "encode_params",
    "encode_values",
    "encoded_size",
    "header_bytes",
    "read_header",
]
