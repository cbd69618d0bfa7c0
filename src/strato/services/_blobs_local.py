"""BlobStore on a local directory: atomic, checksummed, zero-copy reads.

Each blob is one file: a 64-byte header (magic, data length, checksum of the data)
followed by the data. A put writes a temporary file, fsyncs it and renames it over
the key's path, so a reader sees the old blob, the new one, or none: a crash in the
middle leaves at most a stray temporary file, never a torn blob. Reads map the file
(no copy) and check the recorded checksum, so a corrupted file is reported, not used.

The checksum guards against damage (a bad disk, a file cut short), not against
someone who can write the file (they can write its header too). So a blob under a
key of its own records XXH3-128 (magic ``STRATOB2``), a non-cryptographic hash many
times faster than sha256 (``benchmarks/primitives.py``: a checked read went from
1.05 to 2.55 GB/s). A blob under its content address
(``put_content``, ``sha256/<hex>``) records the sha256 its key is made of
(``STRATOB1``, as every blob did before); both kinds are read.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from strato.errors import ConfigError, CorruptBlob, NotFound
from strato.services.blobs import CONTENT_PREFIX

__all__ = ["BlobWriter", "LocalBlobStore", "checksum_tag"]

_SHA256 = b"STRATOB1"  # the header's checksum is the data's sha256
_XXH3 = b"STRATOB2"  # XXH3-128 (16 bytes, then 16 zero bytes)
_HEADER = struct.Struct("<8sQ32s16x")  # magic, data length, checksum, padding to 64 bytes
_TMP_SUFFIX = ".tmp-strato"


# magic -> (the checksum's name, its function: 32 bytes for the header, its length)
_CHECKSUMS: dict[bytes, tuple[str, Callable[[Any], bytes], int]] = {
    _SHA256: ("sha256", lambda data: hashlib.sha256(data).digest(), 32),
    _XXH3: ("xxh3", lambda data: xxhash.xxh3_128_digest(data).ljust(32, b"\0"), 16),
}


def _sealed(key: str, view: memoryview) -> tuple[bytes, bytes]:
    """The header's magic and checksum for ``view`` stored under ``key``: sha256 under
    a content address (checked against it on get), else XXH3-128."""
    magic = _SHA256 if key.startswith(CONTENT_PREFIX) else _XXH3
    return magic, _CHECKSUMS[magic][1](view)


def _tag(magic: bytes, digest: bytes) -> str:
    name, _fn, length = _CHECKSUMS[magic]
    return f"{name}-{digest[:length].hex()}"


def checksum_tag(data: Any, kind: str) -> str:
    """``data``'s checksum as ``LocalBlobStore.stat`` gives one (``sha256-…`` or
    ``xxh3-…``), of the kind ``kind`` names (``sha256`` or ``xxh3``)."""
    for magic, (name, fn, _length) in _CHECKSUMS.items():
        if name == kind:
            return _tag(magic, fn(memoryview(data).cast("B")))
    raise ConfigError(f"unknown checksum kind {kind!r}")


class LocalBlobStore:
    def __init__(self, root: Path, *, durable: bool = True) -> None:
        """``durable=False``: no fsync (blobs the application can make again)."""
        self.root = Path(root)
        self.durable = durable
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts) or key.endswith(_TMP_SUFFIX):
            raise ConfigError(f"invalid blob key {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: Any) -> str:
        view = memoryview(data).cast("B")
        return self._write(key, view, *_sealed(key, view))

    def put_content(self, data: Any) -> str:
        view = memoryview(data).cast("B")
        digest = hashlib.sha256(view).digest()
        key = CONTENT_PREFIX + digest.hex()
        if self.exists(key):  # immutable by construction: same key, same bytes
            return key
        return self._write(key, view, _SHA256, digest)

    def _write(self, key: str, view: memoryview, magic: bytes, digest: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_HEADER.pack(magic, len(view), digest))
                f.write(view)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def open_writer(self, key: str, nbytes: int) -> BlobWriter:
        """A blob of ``nbytes`` written in place: fill ``writer.buffer`` (a writable map of
        the blob's own file), then ``commit()``; ``abort()`` leaves nothing behind. The
        bytes are written once, where readers will map them (a gateway receives an
        upload straight into its blob, and the aggregator's leaf reads those pages)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return BlobWriter(path, key, nbytes)

    def get(self, key: str, *, verify: bool = True) -> memoryview:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < _HEADER.size:
                    raise CorruptBlob(f"blob {key!r} is truncated ({size} bytes)")
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise NotFound(f"no blob {key!r}") from None
        magic, length, digest = _HEADER.unpack_from(mapped, 0)
        if magic not in _CHECKSUMS or length != size - _HEADER.size:
            raise CorruptBlob(f"blob {key!r} is corrupt: bad header or length")
        data = memoryview(mapped)[_HEADER.size :]
        if verify and _CHECKSUMS[magic][1](data) != digest:
            name = "sha256" if magic == _SHA256 else "checksum (XXH3-128)"
            raise CorruptBlob(f"blob {key!r} is corrupt: {name} mismatch")
        if verify and key.startswith(CONTENT_PREFIX) and (
            magic != _SHA256 or digest.hex() != key[len(CONTENT_PREFIX) :]
        ):
            raise CorruptBlob(f"blob {key!r} is corrupt: content does not match its address")
        return data

    def stat(self, key: str) -> tuple[str, int]:
        """The blob's checksum as its header records it (hex, after its kind:
        ``sha256-…`` or ``xxh3-…``; a blob put again under its key gets another one),
        and its length. NotFound, CorruptBlob."""
        _path, _offset, length = self.locate(key)
        with open(self._path(key), "rb") as f:
            magic, _length, digest = _HEADER.unpack(f.read(_HEADER.size))
        return _tag(magic, digest), int(length)

    def locate(self, key: str) -> tuple[str, int, int]:
        """Where the blob's data lies on this machine: (file path, offset, length), for a
        reader that maps it in place (the aggregation engine's leaves). No checksum pass:
        the write was atomic and the header's length is checked. NotFound, CorruptBlob."""
        path = self._path(key)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(_HEADER.size)
        except FileNotFoundError:
            raise NotFound(f"no blob {key!r}") from None
        if len(head) < _HEADER.size:
            raise CorruptBlob(f"blob {key!r} is truncated ({size} bytes)")
        magic, length, _digest = _HEADER.unpack(head)
        if magic not in _CHECKSUMS or length != size - _HEADER.size:
            raise CorruptBlob(f"blob {key!r} is corrupt: bad header or length")
        return str(path.resolve()), _HEADER.size, int(length)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        # Walk only the directory the prefix names, not the whole store.
        start = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        if not start.is_dir():
            return []
        for path in start.rglob("*"):
            if path.is_file() and not path.name.endswith(_TMP_SUFFIX):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def close(self) -> None:
        """Nothing to release: reads hold their own mappings."""


class BlobWriter:
    """An uncommitted blob: a temporary file mapped writable (see ``open_writer``)."""

    def __init__(self, path: Path, key: str, nbytes: int) -> None:
        if nbytes < 0:
            raise ConfigError(f"a blob cannot hold {nbytes} bytes")
        self.path, self.key, self.nbytes = path, key, nbytes
        fd, self._tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=_TMP_SUFFIX)
        try:
            # Space reserved up front: a full disk is an OSError here, not a SIGBUS
            # when a page of a sparse file's map is first written.
            if nbytes:
                os.posix_fallocate(fd, 0, _HEADER.size + nbytes)
            else:
                os.ftruncate(fd, _HEADER.size)
            self._map = mmap.mmap(fd, _HEADER.size + nbytes)
        except BaseException:
            os.close(fd)
            Path(self._tmp).unlink(missing_ok=True)
            raise
        self._fd: int | None = fd
        self.buffer = memoryview(self._map)[_HEADER.size :]

    def commit(self) -> str:
        """Checksum, flush to disk and publish under the key (atomic, like ``put``)."""
        assert self._fd is not None, "the blob was already committed or aborted"
        magic, digest = _sealed(self.key, self.buffer)
        _HEADER.pack_into(self._map, 0, magic, self.nbytes, digest)
        self._release_map()
        try:
            os.fsync(self._fd)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._close_fd()
        return self.key

    def abort(self) -> None:
        self._release_map()
        self._close_fd()
        Path(self._tmp).unlink(missing_ok=True)

    def _release_map(self) -> None:
        # A view still held elsewhere (say, by the traceback of a failed check) keeps
        # the map open until it goes; the file is replaced or unlinked all the same.
        with contextlib.suppress(BufferError):
            self.buffer.release()
        with contextlib.suppress(BufferError):
            if not self._map.closed:
                self._map.close()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
