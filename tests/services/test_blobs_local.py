"""The local blob store's checksums: XXH3-128 for a keyed blob, sha256 for a content
address, and blobs written before (sha256 under any key) still read."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import xxhash

from strato.errors import CorruptBlob
from strato.services._blobs_local import LocalBlobStore, checksum_tag


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_keyed_blob_records_xxh3_and_damage_is_found(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = bytes(range(256)) * 4096
    store.put("models/round-00001.safetensors", data)
    path = tmp_path / "models" / "round-00001.safetensors"
    assert path.read_bytes()[:8] == b"STRATOB2"
    checksum, length = store.stat("models/round-00001.safetensors")
    assert checksum == "xxh3-" + xxhash.xxh3_128_hexdigest(data) == checksum_tag(data, "xxh3")
    assert length == len(data)
    assert bytes(store.get("models/round-00001.safetensors")) == data
    _flip(path, 64 + 12345)
    with pytest.raises(CorruptBlob, match="checksum"):
        store.get("models/round-00001.safetensors")


def test_a_blob_written_in_place_records_xxh3_and_damage_is_found(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    writer = store.open_writer("updates/00001/a-x", 4096)
    writer.buffer[:] = bytes(range(256)) * 16
    writer.commit()
    path = tmp_path / "updates" / "00001" / "a-x"
    assert path.read_bytes()[:8] == b"STRATOB2"
    assert store.stat("updates/00001/a-x")[0] == checksum_tag(bytes(range(256)) * 16, "xxh3")
    _flip(path, 64 + 100)
    with pytest.raises(CorruptBlob, match="checksum"):
        store.get("updates/00001/a-x")


def test_a_blob_written_in_place_under_a_content_address_keeps_sha256(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    key = "sha256/" + hashlib.sha256(b"abcd").hexdigest()
    writer = store.open_writer(key, 4)
    writer.buffer[:] = b"abcd"
    writer.commit()
    assert bytes(store.get(key)) == b"abcd"


def test_a_content_address_keeps_its_sha256(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    key = store.put_content(b"the same bytes")
    assert key == "sha256/" + hashlib.sha256(b"the same bytes").hexdigest()
    assert (tmp_path / key).read_bytes()[:8] == b"STRATOB1"
    assert store.stat(key)[0] == "sha256-" + key.removeprefix("sha256/")
    assert bytes(store.get(key)) == b"the same bytes"


def test_a_put_under_a_content_address_is_checked_against_it(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    right = "sha256/" + hashlib.sha256(b"x").hexdigest()
    store.put(right, b"x")
    assert bytes(store.get(right)) == b"x"
    wrong = "sha256/" + hashlib.sha256(b"y").hexdigest()
    store.put(wrong, b"x")
    with pytest.raises(CorruptBlob, match="address"):
        store.get(wrong)


def test_a_blob_written_before_xxh3_still_reads_and_is_checked(tmp_path: Path) -> None:
    data = b"written by an earlier Strato" * 1000
    header = struct.pack("<8sQ32s16x", b"STRATOB1", len(data), hashlib.sha256(data).digest())
    path = tmp_path / "models" / "round-00003.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(header + data)
    store = LocalBlobStore(tmp_path)
    assert bytes(store.get("models/round-00003.safetensors")) == data
    assert store.locate("models/round-00003.safetensors")[1:] == (64, len(data))
    assert store.stat("models/round-00003.safetensors") == (
        "sha256-" + hashlib.sha256(data).hexdigest(), len(data))
    _flip(path, 64 + 7)
    with pytest.raises(CorruptBlob, match="sha256"):
        store.get("models/round-00003.safetensors")


def test_an_unknown_header_is_corrupt(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.put("k", b"abc")
    _flip(tmp_path / "k", 7)  # the magic's last byte
    with pytest.raises(CorruptBlob, match="header"):
        store.get("k")
