"""The byte format of a FedAvg partial sum, as it travels between aggregator functions.

A partial is ``Σ w·x`` (float64), ``Σ w`` and the number of updates it holds. On the
wire: a 32-byte header (magic ``b"STRATOP1"``, length, total weight, count) then the
float64 sum, little endian. ``Partial.from_bytes`` is zero-copy and
``Partial.write_into`` writes into a buffer the caller owns (e.g. a shared-memory
segment), so a partial costs one copy. The math (adding updates, merging partials)
is ``strategy.fedavg``'s.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.errors import CodecError

__all__ = ["PARTIAL_HEADER_SIZE", "Partial"]

F64 = npt.NDArray[np.float64]

_MAGIC = b"STRATOP1"
_HEADER = struct.Struct("<8sQdQ")  # magic, n, weight, count: 32 bytes keeps the sum aligned
PARTIAL_HEADER_SIZE = _HEADER.size


@dataclass(frozen=True)
class Partial:
    """A partial aggregate as plain data: ``sum`` = Σ w·x (float64), ``weight`` = Σ w."""

    sum: F64
    weight: float
    count: int

    @property
    def n(self) -> int:
        return int(self.sum.shape[0])

    @property
    def nbytes(self) -> int:
        return PARTIAL_HEADER_SIZE + self.sum.nbytes

    @staticmethod
    def encoded_size(n: int) -> int:
        return PARTIAL_HEADER_SIZE + 8 * n

    def header(self) -> bytes:
        return _HEADER.pack(_MAGIC, self.n, self.weight, self.count)

    def write_into(self, buffer: Any) -> int:
        """Write header and sum into ``buffer`` (writable, ≥ ``nbytes``); returns bytes written."""
        out = np.frombuffer(buffer, dtype=np.uint8, count=self.nbytes)
        out[:PARTIAL_HEADER_SIZE] = np.frombuffer(self.header(), dtype=np.uint8)
        out[PARTIAL_HEADER_SIZE:].view("<f8")[:] = self.sum
        return self.nbytes

    def to_bytes(self) -> bytes:
        data: Any = np.ascontiguousarray(self.sum, dtype="<f8")
        return b"".join((self.header(), memoryview(data).cast("B")))  # one copy

    @classmethod
    def from_bytes(cls, buffer: Any) -> Partial:
        """Read a partial; its ``sum`` is a view of ``buffer`` (no copy)."""
        data = memoryview(buffer).cast("B")
        if data.nbytes < PARTIAL_HEADER_SIZE:
            raise CodecError(f"partial is truncated: {data.nbytes} bytes, header needs 32")
        magic, n, weight, count = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise CodecError("not a Strato partial aggregate (bad magic)")
        if data.nbytes != cls.encoded_size(n):
            raise CodecError(f"partial of {n} values needs {cls.encoded_size(n)} bytes, "
                             f"got {data.nbytes}")
        if not (math.isfinite(weight) and weight >= 0.0):
            raise CodecError(f"partial has an invalid total weight {weight!r}")
        total = np.frombuffer(data, dtype="<f8", count=n, offset=PARTIAL_HEADER_SIZE)
        return cls(total, float(weight), int(count))
