"""The BlobStore on S3: multipart both ways, sha256 on record and checked on read."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import pytest

from strato.errors import ConfigError, CorruptBlob, NotFound
from strato.services import connect

MIB = 1024 * 1024


@pytest.fixture
def small_parts(aws_config: dict[str, Any]) -> dict[str, Any]:
    """A config whose blobs go multipart above 5 MiB (S3's smallest part)."""
    return {**aws_config, "multipart_threshold": 5 * MIB, "part_size": 5 * MIB}


def test_a_large_blob_goes_up_in_parts_and_comes_back_whole(
    small_parts: dict[str, Any], boto: Any
) -> None:
    data = os.urandom(5 * MIB) + bytes(range(256)) * (4 * MIB // 256) + b"tail"
    with connect(small_parts) as svc:
        blobs = svc.blobs
        assert blobs.put("models/big", data) == "models/big"
        head = boto.client("s3").head_object(Bucket=blobs.bucket, Key="models/big")
        assert head["ETag"].strip('"').endswith("-2")  # two parts: it was multipart
        assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert bytes(blobs.get("models/big")) == data  # ranged reads, reassembled


def test_a_single_part_put_asks_s3_to_check_its_sha256(aws_config: dict[str, Any]) -> None:
    """S3 refuses a PUT whose x-amz-checksum-sha256 does not match the bytes (moto
    neither checks nor keeps it, so this looks at the request itself)."""
    sent: list[dict[str, Any]] = []
    with connect(aws_config) as svc:
        s3 = svc.blobs._s3  # type: ignore[attr-defined]  # the backend's own client
        s3.meta.events.register(
            "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers))
        )
        key = svc.blobs.put_content(b"small")
    digest = hashlib.sha256(b"small").digest()
    [headers] = sent
    text = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in headers.items()}
    assert text["x-amz-checksum-sha256"] == base64.b64encode(digest).decode()
    assert text["x-amz-meta-sha256"] == digest.hex() == key.removeprefix("sha256/")


def test_bytes_changed_in_s3_are_reported_not_returned(
    aws_config: dict[str, Any], boto: Any
) -> None:
    with connect(aws_config) as svc:
        blobs = svc.blobs
        blobs.put("k", b"hello world" * 100)
        recorded = boto.client("s3").head_object(Bucket=blobs.bucket, Key="k")["Metadata"]
        boto.client("s3").put_object(
            Bucket=blobs.bucket, Key="k", Body=b"hellO world" * 100, Metadata=recorded
        )
        with pytest.raises(CorruptBlob, match="sha256"):
            blobs.get("k")
        assert bytes(blobs.get("k", verify=False)).startswith(b"hellO")


def test_a_content_key_is_checked_even_without_metadata(
    aws_config: dict[str, Any], boto: Any
) -> None:
    with connect(aws_config) as svc:
        key = "sha256/" + hashlib.sha256(b"the real bytes").hexdigest()
        boto.client("s3").put_object(Bucket=svc.blobs.bucket, Key=key, Body=b"other bytes")
        with pytest.raises(CorruptBlob):
            svc.blobs.get(key)


@pytest.mark.parametrize("key", ["", "a//b", "./a", "a/../b", "trailing/", "x" * 1100])
def test_keys_the_embedded_store_refuses_are_refused_here_too(
    aws_config: dict[str, Any], key: str
) -> None:
    with connect(aws_config) as svc, pytest.raises(ConfigError):
        svc.blobs.put(key, b"x")


def test_the_bucket_aborts_abandoned_uploads_and_reads_empty_blobs(
    aws_config: dict[str, Any], boto: Any
) -> None:
    with connect(aws_config) as svc:
        rules = boto.client("s3").get_bucket_lifecycle_configuration(Bucket=svc.blobs.bucket)
        [rule] = rules["Rules"]
        assert rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
        with pytest.raises(NotFound):
            svc.blobs.get("absent")
        assert svc.blobs.list() == []
        svc.blobs.put("p/empty", b"")
        assert bytes(svc.blobs.get("p/empty")) == b""  # no range in an empty object
