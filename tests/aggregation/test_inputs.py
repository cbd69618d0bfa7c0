"""attach_input: shared-memory and file references, mapped in place and cached per file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from strato.aggregation import _inputs
from strato.aggregation._inputs import attach_input, file_ref, local_ref, release_input
from strato.errors import LayoutError, NotFound
from strato.services.shm import ShmError, ShmPool


@pytest.fixture(autouse=True)
def no_cached_files() -> Iterator[None]:
    yield
    with _inputs._LOCK:
        for _, mapping in _inputs._FILES.values():
            _inputs._close(mapping)
        _inputs._FILES.clear()


def test_release_input_drops_the_mapping_and_a_later_attach_maps_afresh(tmp_path: Path) -> None:
    data = np.arange(4096, dtype=np.float32)
    path = tmp_path / "update.bin"
    path.write_bytes(b"\0" * 64 + data.tobytes())
    ref = file_ref(path, 64, data.nbytes)
    assert np.array_equal(np.frombuffer(attach_input(ref), dtype=np.float32), data)
    assert str(path) in _inputs._FILES
    release_input(ref)
    assert str(path) not in _inputs._FILES
    release_input(ref)  # twice: nothing left to drop
    assert np.array_equal(np.frombuffer(attach_input(ref), dtype=np.float32), data)


def test_file_ref_reads_in_place_at_an_offset(tmp_path: Path) -> None:
    data = np.arange(1000, dtype=np.float32)
    path = tmp_path / "blob"
    path.write_bytes(b"hdr!" + data.tobytes())
    ref = file_ref(path, 4 + 40, 4 * 100)
    assert ref == {"path": str(path), "offset": 44, "nbytes": 400}
    view = attach_input(ref)
    assert view.readonly and view.nbytes == 400
    assert np.frombuffer(view, np.float32).tolist() == list(range(10, 110))
    # one mapping per file, reused for every other range of it
    mapping = _inputs._FILES[str(path)][1]
    whole = attach_input(file_ref(path, 4, 4000))
    assert whole.obj is mapping and view.obj is mapping
    assert np.array_equal(np.frombuffer(whole, np.float32), data)


def test_relative_paths_are_made_absolute_but_refused_raw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "b").write_bytes(b"\0" * 8)
    monkeypatch.chdir(tmp_path)
    assert file_ref("b", 0, 8)["path"] == str(tmp_path / "b")
    with pytest.raises(LayoutError, match="absolute"):
        attach_input({"path": "b", "offset": 0, "nbytes": 8})


def test_bad_file_refs(tmp_path: Path) -> None:
    path = tmp_path / "b"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(LayoutError, match="past the end"):
        attach_input(file_ref(path, 8, 9))
    with pytest.raises(NotFound, match="does not exist"):
        attach_input(file_ref(tmp_path / "nope", 0, 4))
    with pytest.raises(LayoutError, match="negative"):
        file_ref(path, -1, 4)
    with pytest.raises(LayoutError, match="negative"):
        attach_input({"path": str(path), "offset": 0, "nbytes": -4})
    with pytest.raises(LayoutError, match="not a file reference"):
        attach_input({"path": str(path), "offset": "x", "nbytes": 4})
    with pytest.raises(LayoutError, match="'shm' or 'path'"):
        attach_input({"offset": 0, "nbytes": 4})


def test_an_empty_file_holds_only_an_empty_range(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert attach_input(file_ref(path, 0, 0)).nbytes == 0
    with pytest.raises(LayoutError, match="past the end"):
        attach_input(file_ref(path, 0, 4))


def test_a_replaced_file_is_mapped_afresh(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 4096)
    first = bytes(attach_input(file_ref(path, 0, 4)))
    tmp = tmp_path / "blob.new"
    tmp.write_bytes(b"b" * 8192)
    os.replace(tmp, path)  # a new inode under the same path
    assert first == b"aaaa"
    assert bytes(attach_input(file_ref(path, 8000, 4))) == b"bbbb"


def test_the_file_cache_is_bounded_and_forgets_deleted_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_inputs, "_MAX_FILES", 2)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"b{i}")
        paths[-1].write_bytes(bytes([i]) * 64)
    for p in paths:
        assert bytes(attach_input(file_ref(p, 0, 1))) == bytes([int(p.name[1])])
    assert list(_inputs._FILES) == [str(paths[1]), str(paths[2])]  # least recent went
    paths[1].unlink()
    attach_input(file_ref(paths[0], 0, 1))
    assert list(_inputs._FILES) == [str(paths[2]), str(paths[0])]


def test_shm_refs_map_the_segment_writable() -> None:
    with ShmPool() as pool:
        lease = pool.lease(64)
        lease.buffer[:] = bytes(range(64))
        view = attach_input(lease.ref.sub(16, 8).to_dict())
        assert not view.readonly and bytes(view) == bytes(range(16, 24))
        with pytest.raises(ShmError):
            attach_input({"shm": "../etc/passwd", "offset": 0, "nbytes": 1})
        del view
        lease.release()


def test_a_buffer_of_this_process_is_added_where_it_lies_until_released() -> None:
    from strato.aggregation._handler import aggregate

    partial = np.arange(6, dtype=np.float32)
    ref = local_ref(memoryview(partial.data).toreadonly())  # as Ray hands out an object
    view = attach_input(ref)
    assert ref["nbytes"] == 24 and view.readonly
    assert np.shares_memory(np.frombuffer(view, dtype=np.float32), partial)  # not a copy
    acc = np.ones(6, dtype=np.float64)

    class Ctx:  # a thread of this process: nothing in shared memory but the accumulator
        def attach(self, ref: dict[str, object]) -> memoryview:
            assert ref == {"acc": True}
            return memoryview(acc.data).cast("B")

    reply = aggregate({"acc": {"acc": True}, "acc_dtype": "F64", "fresh": False,
                       "inputs": [{**ref, "dtype": "F32", "coef": 2.0}]}, Ctx())
    assert reply["n"] == 1 and acc.tolist() == [1.0 + 2.0 * i for i in range(6)]
    del view
    release_input(ref)
    with pytest.raises(LayoutError, match="no buffer of this process"):
        attach_input(ref)
    with pytest.raises(LayoutError, match="no buffer of this process"):
        attach_input({**ref, "local": "1"})  # (ids are this process's counters)
    with pytest.raises(LayoutError, match="a buffer of another process"):
        attach_input({**ref, "pid": ref["pid"] + 1})
