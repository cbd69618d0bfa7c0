"""BlobStore on S3: one bucket, one object per blob, sha256 checked on every get.

- A blob's sha256 is stored as object metadata (``x-amz-meta-sha256``) and, for a
  single-part upload, also sent as ``ChecksumSHA256`` so S3 itself refuses bytes
  damaged on the way in. ``get`` recomputes the sha256 and raises ``CorruptBlob`` on
  a mismatch (a multipart object's S3 checksum is a checksum of part checksums, so
  the metadata is the one that covers the whole blob).
- Blobs over ``multipart_threshold`` go up as a multipart upload (parts in parallel)
  and come down as parallel ranged GETs pinned to one ETag (``IfMatch``), so a blob
  overwritten mid-read is read again rather than returned torn. S3 PUT and
  CompleteMultipartUpload are atomic: readers see the old blob or the new one.
- A writer that dies mid-multipart leaves an incomplete upload, invisible to readers;
  a bucket this store creates has a lifecycle rule that aborts those after a day.
- Keys follow the embedded store's rules (no empty, '.' or '..' segments), so code
  that runs on one backend runs on the other.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from strato.backends.aws._boto import ClientError, Clients, error_code, http_status
from strato.backends.aws._names import bucket_name
from strato.errors import ConfigError, CorruptBlob, NotFound
from strato.services.blobs import CONTENT_PREFIX

__all__ = ["S3BlobStore"]

_PARALLEL = 4
_RANGE_TOTAL = re.compile(r"/(\d+)$")
_READ_ATTEMPTS = 5


def _check_key(key: str) -> None:
    parts = key.split("/") if isinstance(key, str) else [""]
    if not key or any(p in ("", ".", "..") for p in parts) or len(key.encode("utf-8")) > 1024:
        raise ConfigError(f"invalid blob key {key!r}")


class S3BlobStore:
    """``BlobStore`` on an S3 bucket (see the module doc)."""

    def __init__(self, clients: Clients) -> None:
        config = clients.config
        self._s3 = clients.client("s3", read_timeout=300.0)
        self._region = config.region
        self.bucket = config.bucket or bucket_name(config.prefix)
        self._threshold = max(config.multipart_threshold, config.part_size)
        self._part_size = config.part_size
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            status = http_status(exc)
            if status == 403:
                raise ConfigError(
                    f"S3 bucket {self.bucket!r} exists but this account may not use it"
                ) from None
            if status != 404:
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self._region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        try:
            self._s3.create_bucket(**kwargs)
        except ClientError as exc:
            if error_code(exc) != "BucketAlreadyOwnedByYou":
                raise
            return
        self._s3.put_bucket_lifecycle_configuration(
            Bucket=self.bucket,
            LifecycleConfiguration={
                "Rules": [
                    {
                        "ID": "strato-abort-incomplete-uploads",
                        "Status": "Enabled",
                        "Filter": {"Prefix": ""},
                        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                    }
                ]
            },
        )

    # --- writes -----------------------------------------------------------------------

    def put(self, key: str, data: Any) -> str:
        _check_key(key)
        view = memoryview(data).cast("B")
        self._upload(key, view, hashlib.sha256(view).digest())
        return key

    def put_content(self, data: Any) -> str:
        view = memoryview(data).cast("B")
        digest = hashlib.sha256(view).digest()
        key = CONTENT_PREFIX + digest.hex()
        if not self.exists(key):  # immutable by construction: same key, same bytes
            self._upload(key, view, digest)
        return key

    def _upload(self, key: str, view: memoryview, digest: bytes) -> None:
        metadata = {"sha256": digest.hex()}
        if len(view) <= self._threshold:
            self._s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=view.tobytes(),
                Metadata=metadata,
                ChecksumSHA256=base64.b64encode(digest).decode("ascii"),
                ContentType="application/octet-stream",
            )
            return
        upload_id = self._s3.create_multipart_upload(
            Bucket=self.bucket, Key=key, Metadata=metadata, ContentType="application/octet-stream"
        )["UploadId"]
        size = self._part_size
        ranges = [(n + 1, start) for n, start in enumerate(range(0, len(view), size))]

        def upload(part: tuple[int, int]) -> dict[str, Any]:
            number, start = part
            reply = self._s3.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=view[start : start + size].tobytes(),
            )
            return {"PartNumber": number, "ETag": reply["ETag"]}

        try:
            with ThreadPoolExecutor(_PARALLEL, thread_name_prefix="strato-s3-put") as pool:
                parts = list(pool.map(upload, ranges))
            self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # What this cannot abort, the bucket's lifecycle rule cleans up.
            with contextlib.suppress(ClientError):
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    # --- reads ------------------------------------------------------------------------

    def get(self, key: str, *, verify: bool = True) -> memoryview:
        for _ in range(_READ_ATTEMPTS):
            try:
                buf, recorded = self._read(key)
            except _Replaced:
                continue  # overwritten between two ranged reads: read the new one
            if verify:
                expected = recorded
                if expected is None and key.startswith(CONTENT_PREFIX):
                    expected = key[len(CONTENT_PREFIX) :]
                if expected is not None:
                    actual = hashlib.sha256(buf).hexdigest()
                    if actual != expected:
                        raise CorruptBlob(
                            f"blob {key!r} is corrupt: its sha256 is {actual}, "
                            f"the recorded one is {expected}"
                        )
            return memoryview(buf)
        raise CorruptBlob(f"blob {key!r} kept changing while it was read")

    def _read(self, key: str) -> tuple[bytes | bytearray, str | None]:
        """The blob's bytes and its recorded sha256: one GET for a small blob, parallel
        ranged GETs pinned to the first one's ETag for a large one."""
        try:
            first = self._s3.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes=0-{self._threshold - 1}"
            )
        except ClientError as exc:
            code = error_code(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no blob {key!r} in bucket {self.bucket!r}") from None
            if code != "InvalidRange":
                raise
            first = self._s3.get_object(Bucket=self.bucket, Key=key)  # an empty object
        recorded = (first.get("Metadata") or {}).get("sha256")
        head = first["Body"].read()
        match = _RANGE_TOTAL.search(str(first.get("ContentRange") or ""))
        total = int(match.group(1)) if match else len(head)
        if total == len(head):
            return head, recorded
        buf = bytearray(total)
        view = memoryview(buf)
        view[: len(head)] = head
        etag = first["ETag"]
        ranges = range(len(head), total, self._part_size)

        def fetch(start: int) -> None:
            end = min(total, start + self._part_size)
            try:
                reply = self._s3.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag
                )
            except ClientError as exc:
                if http_status(exc) in (404, 412) or error_code(exc) in (
                    "PreconditionFailed",
                    "NoSuchKey",
                ):
                    raise _Replaced from None
                raise
            chunk = reply["Body"].read()
            if len(chunk) != end - start:
                raise _Replaced
            view[start:end] = chunk

        with ThreadPoolExecutor(_PARALLEL, thread_name_prefix="strato-s3-get") as pool:
            list(pool.map(fetch, ranges))
        return buf, recorded

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if http_status(exc) == 404 or error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def list(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            keys.extend(str(obj["Key"]) for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=key)

    def close(self) -> None:
        """Nothing to release: the boto3 clients are shared by every part of the bundle."""


class _Replaced(Exception):
    """The object changed (or vanished) between the ranged reads of one get."""
