"""Blobs written in place (``LocalBlobStore.open_writer``): atomic, checksummed, or nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from strato.errors import NotFound
from strato.services._blobs_local import LocalBlobStore


def test_a_committed_writer_is_a_blob_like_any_other(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    writer = store.open_writer("updates/00001/a-x", 6)
    writer.buffer[:] = b"abcdef"
    assert not store.exists("updates/00001/a-x")  # nothing visible before the commit
    assert writer.commit() == "updates/00001/a-x"
    assert bytes(store.get("updates/00001/a-x")) == b"abcdef"  # the checksum passes
    path, offset, length = store.locate("updates/00001/a-x")
    assert Path(path).read_bytes()[offset : offset + length] == b"abcdef"


def test_an_aborted_writer_leaves_nothing_even_with_a_view_still_held(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    writer = store.open_writer("u/b", 4)
    held = writer.buffer[:2]  # e.g. a traceback that still references the buffer
    writer.abort()
    del held
    with pytest.raises(NotFound):
        store.get("u/b")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
