"""BlobStore: put/get/list/delete of immutable blobs (the S3 model).

Semantics every backend keeps: a put is atomic (a reader sees the old blob, the new
blob, or none, never a torn one); ``put_content`` stores under ``sha256/<hex>`` of the
data; every blob's recorded checksum is checked on ``get`` (``CorruptBlob`` on a
mismatch): sha256 for a content address, the backend's own for the rest.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["CONTENT_PREFIX", "BlobStore"]

CONTENT_PREFIX = "sha256/"


@runtime_checkable
class BlobStore(Protocol):
    def put(self, key: str, data: Any) -> str:
        """Store bytes-like ``data`` under ``key`` atomically; returns the key."""
        ...

    def put_content(self, data: Any) -> str:
        """Store ``data`` under its content address ``sha256/<hex>``; returns that key."""
        ...

    def get(self, key: str, *, verify: bool = True) -> memoryview:
        """The blob's bytes (zero-copy where the backend allows). NotFound, CorruptBlob."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix``, sorted."""
        ...

    def delete(self, key: str) -> None:
        """Delete a blob (idempotent)."""
        ...
