"""Per-layer uniform quantizers with seeded stochastic rounding, and nibble packing.

Two quantizers, both per tensor (one range per layer, carried in the header):

- ``affine``: codes ``0..2^b-1`` spread evenly over ``[min, max]`` of the values.
  Every code is a value; used where the receiver already knows which positions the
  values belong to (a shared mask, a bitmap, or a dense tensor).
- ``zero-code``: code 0 means "this position is not in the mask"; the other codes
  are a sign and a magnitude spread evenly over ``[min |v|, max |v|]``. The mask is
  recovered from the codes, so it never travels as a bitmap. Pruned models suit
  it: every kept weight is at least the pruning threshold in magnitude, so the
  magnitudes span a narrower range than the signed values would.

Stochastic rounding (round up with probability equal to the fractional part) makes
each decoded value an unbiased estimate of the original, so quantization noise
averages out over clients instead of adding a systematic bias. Decoded values are
always within one quantization step of the originals.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "affine_decode",
    "affine_encode",
    "levels",
    "pack_nibbles",
    "unpack_nibbles",
    "zero_code_decode",
    "zero_code_encode",
]

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


def levels(bits: int, zero_code: bool) -> int:
    """Number of magnitude levels: ``2^b`` for affine, ``2^(b-1) - 1`` per sign for zero-code."""
    return (1 << (bits - 1)) - 1 if zero_code else 1 << bits


def _step(lo: float, hi: float, n_levels: int) -> float:
    return (hi - lo) / (n_levels - 1) if n_levels > 1 and hi > lo else 0.0


def _stochastic_round(u: npt.NDArray[np.float64], top: int, rng: np.random.Generator) -> U8:
    codes = np.floor(u + rng.random(u.shape))
    return np.clip(codes, 0, top).astype(np.uint8)


def affine_encode(values: F32, bits: int, rng: np.random.Generator) -> tuple[U8, float, float]:
    """Codes for ``values`` and the range ``(lo, hi)`` that decodes them."""
    if values.size == 0:
        return np.zeros(0, np.uint8), 0.0, 0.0
    lo, hi = float(values.min()), float(values.max())
    n_levels = levels(bits, zero_code=False)
    step = _step(lo, hi, n_levels)
    if step == 0.0:
        return np.zeros(values.size, np.uint8), lo, hi
    u = (values.astype(np.float64) - lo) / step
    return _stochastic_round(u, n_levels - 1, rng), lo, hi


def affine_decode(codes: U8, bits: int, lo: float, hi: float) -> F32:
    step = _step(lo, hi, levels(bits, zero_code=False))
    return (lo + codes.astype(np.float64) * step).astype(np.float32)


def zero_code_encode(
    dense: F32, mask: npt.NDArray[np.bool_], bits: int, rng: np.random.Generator
) -> tuple[U8, float, float]:
    """Codes over the whole tensor: 0 off the mask, sign + magnitude level on it."""
    codes = np.zeros(dense.size, np.uint8)
    values = dense[mask]
    if values.size == 0:
        return codes, 0.0, 0.0
    mag = np.abs(values).astype(np.float64)
    lo, hi = float(mag.min()), float(mag.max())
    n_levels = levels(bits, zero_code=True)
    step = _step(lo, hi, n_levels)
    level = _stochastic_round((mag - lo) / step, n_levels - 1, rng) if step > 0 \
        else np.zeros(values.size, np.uint8)
    # codes 1..L are positive magnitudes, L+1..2L negative ones; 0 is "not in the mask".
    codes[mask] = 1 + level + np.where(np.signbit(values), n_levels, 0).astype(np.uint8)
    return codes, lo, hi


def zero_code_decode(
    codes: U8, bits: int, lo: float, hi: float
) -> tuple[npt.NDArray[np.bool_], F32]:
    """The mask and the values at its positions (``codes`` already range-checked)."""
    n_levels = levels(bits, zero_code=True)
    mask = codes != 0
    c = codes[mask].astype(np.int64) - 1
    negative = c >= n_levels
    level = np.where(negative, c - n_levels, c)
    mag = lo + level.astype(np.float64) * _step(lo, hi, n_levels)
    return mask, np.where(negative, -mag, mag).astype(np.float32)


def pack_nibbles(codes: U8) -> U8:
    """Two 4-bit codes per byte, low nibble first; an odd tail is padded with 0."""
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: U8, count: int) -> U8:
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:count]
