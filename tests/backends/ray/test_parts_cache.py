"""A worker node's cache of the state host's large blobs (``RayBlobStore._cached``):
a copy is kept under the blob's key and the checksum its header records, and only
bytes with that very checksum are kept. The state host is a stand-in here (a local
blob store behind the client's ``call``): no Ray cluster needed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray", reason="the ray backend needs ray: pip install 'strato[ray]'")

from strato.backends.ray._parts import RayBlobStore, node_dir
from strato.errors import CorruptBlob, StratoError
from strato.services._blobs_local import LocalBlobStore


class FakeHost:
    """The state client as a worker node's blob store sees it: the host's blobs are a
    local store; ``damage`` flips a byte of what the next ``get`` sends."""

    def __init__(self, root: Path) -> None:
        self.config = {"root": str(root)}
        self.blobs = LocalBlobStore(root / "host-blobs")
        self.gets = 0
        self.damage = False
        self.rewrite: tuple[str, bytes] | None = None  # put between the stat and the get
        self.homes: list[tuple[str, tuple[Any, ...]]] = []

    def node_id(self) -> str:
        return "worker-node-0000000000"

    def on_host_node(self) -> bool:
        return False

    def use(self) -> None:  # (the homes table's client: nothing to count here)
        pass

    def call(self, part: str, method: str, *args: Any, data: Any = None,
             **kwargs: Any) -> Any:
        if part == "table":  # where node-local blobs lie: recorded, not asked here
            self.homes.append((method, args))
            return (1 if method == "put" else None), None
        assert part == "blobs"
        if method == "stat":
            result = self.blobs.stat(args[0])
            if self.rewrite is not None:
                self.blobs.put(*self.rewrite)
                self.rewrite = None
            return result, None
        assert method == "get"
        self.gets += 1
        blob = bytearray(self.blobs.get(args[0], verify=kwargs.get("verify", True)))
        if self.damage:
            blob[len(blob) // 2] ^= 0xFF
            self.damage = False
        return None, bytes(blob)


@pytest.fixture(autouse=True)
def _node_dirs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's directory (``node_dir``, under the temporary directory) in the test's
    own: nothing is left in the machine's, where the cluster tests look for leftovers."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()


def _store(tmp_path: Path, **config: Any) -> tuple[FakeHost, RayBlobStore]:
    host = FakeHost(tmp_path)
    return host, RayBlobStore(host, {**host.config, **config})  # type: ignore[arg-type]


MODEL = bytes(range(256)) * 8192  # 2 MiB: large enough to be cached


def test_a_large_blob_is_read_once_per_node_then_from_its_cache(tmp_path: Path) -> None:
    host, store = _store(tmp_path)
    host.blobs.put("models/round-00001", MODEL)
    assert bytes(store.get("models/round-00001")) == MODEL
    assert bytes(store.get("models/round-00001")) == MODEL
    assert host.gets == 1
    host.blobs.put("models/round-00001", MODEL[::-1])  # put again: another checksum
    assert bytes(store.get("models/round-00001")) == MODEL[::-1]
    assert host.gets == 2


def test_bytes_damaged_on_an_unchecked_read_are_not_cached(tmp_path: Path) -> None:
    host, store = _store(tmp_path)
    host.blobs.put("models/round-00002", MODEL)
    host.damage = True
    assert bytes(store.get("models/round-00002", verify=False)) != MODEL  # as asked
    assert bytes(store.get("models/round-00002")) == MODEL  # read again, not the copy
    assert host.gets == 2


def test_a_blob_put_again_between_stat_and_get_is_not_cached_under_the_old_checksum(
    tmp_path: Path,
) -> None:
    host, store = _store(tmp_path)
    host.blobs.put("models/round-00003", MODEL)
    host.rewrite = ("models/round-00003", MODEL[::-1])
    assert bytes(store.get("models/round-00003")) == MODEL[::-1]  # what the host had
    host.blobs.put("models/round-00003", MODEL)  # back to the first bytes
    assert bytes(store.get("models/round-00003")) == MODEL  # not the copy of the others


def test_a_damaged_host_blob_is_refused_on_a_checked_read(tmp_path: Path) -> None:
    host, store = _store(tmp_path)
    host.blobs.put("models/round-00004", MODEL)
    path = tmp_path / "host-blobs" / "models" / "round-00004"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlob):
        store.get("models/round-00004")


def test_a_node_local_blob_and_a_cached_copy_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker node's own blobs (an update) are synced before ``put`` returns, as the
    state host's are, and so are its copies of the host's blobs: no backlog of unsynced
    bytes builds up on a node's disk to stall a later sync there."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    host, store = _store(tmp_path, node_local_blobs=["updates/"])
    store.put("updates/round-00001/c1", b"an update")
    here = node_dir(host.config["root"], store.node_id)  # (the file, renamed into place)
    assert len(synced) == 1 and synced[0].startswith(str(here / "blobs" / "updates")), synced
    assert (here / "blobs" / "updates" / "round-00001" / "c1").is_file()
    assert ("put", ("strato_blob_homes", "updates/round-00001/c1", {"node": store.node_id})
            ) in host.homes
    host.blobs.put("models/round-00001", MODEL)
    synced.clear()
    assert bytes(store.get("models/round-00001")) == MODEL  # copied into the node's cache
    assert len(synced) == 1 and synced[0].startswith(str(here / "blobs")), synced


def test_a_node_local_blob_of_this_node_is_located_without_asking_the_host(
    tmp_path: Path,
) -> None:
    """A leaf maps an update lying on its node with one stat there: the state host's
    table of homes is asked only for a blob this node does not hold."""
    host, store = _store(tmp_path, node_local_blobs=["updates/"])
    store.put("updates/round-00001/c1", b"an update")
    host.homes.clear()
    path, offset, length = store.locate("updates/round-00001/c1")
    assert Path(path).read_bytes()[offset : offset + length] == b"an update"
    assert host.homes == []
    with pytest.raises(StratoError):  # not here: its home asked (the stand-in knows none)
        store.locate("updates/round-00001/c2")
    assert [method for method, _args in host.homes] == ["get"]
