"""zstd on top of any payload body. Optional: needs the ``zstandard`` package."""

from __future__ import annotations

from types import ModuleType

from strato.errors import CodecError, ConfigError

__all__ = ["compress", "decompress"]

_INSTALL = "pip install 'strato[compress]' (or pip install zstandard)"


def _module() -> ModuleType | None:
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def compress(body: bytes, level: int) -> bytes:
    zstd = _module()
    if zstd is None:
        raise ConfigError(f"zstd compression needs the 'zstandard' package: {_INSTALL}")
    if not 1 <= level <= 22:
        raise ConfigError(f"zstd level must be between 1 and 22, got {level}")
    # The 4-byte checksum lets the decoder catch a corrupt body instead of decoding garbage.
    out: bytes = zstd.ZstdCompressor(level=level, write_checksum=True).compress(body)
    return out


def decompress(data: bytes, raw_size: int) -> bytes:
    """Decompress exactly ``raw_size`` bytes; anything else is a corrupt payload."""
    zstd = _module()
    if zstd is None:
        raise CodecError(f"payload is zstd-compressed but 'zstandard' is not installed: {_INSTALL}")
    try:
        # max_output_size bounds memory even if the frame lies about its content size.
        out: bytes = zstd.ZstdDecompressor().decompress(data, max_output_size=raw_size)
    except zstd.ZstdError as exc:
        raise CodecError(f"payload zstd body is corrupt: {exc}") from None
    if len(out) != raw_size:
        raise CodecError(f"payload zstd body holds {len(out)} bytes, the header says {raw_size}")
    return out
