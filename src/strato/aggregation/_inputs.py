"""Inputs by reference: a buffer in node shared memory, or a range of a blob file.

An aggregator is told *where* an update lies, never given its bytes. Three kinds of
reference, all small JSON dicts:

- shared memory: ``{"shm": name, "offset": o, "nbytes": n}`` (``services.shm.ShmRef``),
  mapped by ``shm.attach`` (writable view);
- a file: ``{"path": "/abs/path", "offset": o, "nbytes": n}`` (``file_ref``), e.g. a
  blob of the local blob store; mapped read-only with ``mmap`` (read-only view);
- a buffer of this process: ``{"local": id, "pid": p, "nbytes": n}`` (``local_ref``), e.g. a
  partial read from Ray's object store, added where it lies by an aggregator on a
  thread of the same process (``ThreadExecutor``); another process cannot read it.

``attach_input(ref)`` maps either one and returns a ``memoryview`` of exactly ``n``
bytes (no copy: pages are read where they lie). Like ``shm.attach``, a process keeps
one mapping per file and reuses it, so a warm worker maps nothing new for a file it
has seen. A mapping is checked against the file on every attach (device, inode,
size, mtime): a file replaced under the same path is mapped afresh. At most
``_MAX_FILES`` mappings are kept (each holds a file descriptor); the least recently
used go first, and mappings of deleted files are dropped whenever a new file is
mapped, so their disk space is freed once the last view goes.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from strato.errors import LayoutError, NotFound, StratoError
from strato.services import shm

__all__ = ["Accumulator", "PrivateBuffer", "attach_input", "file_ref", "local_ref", "release_input"]

_MAX_FILES = 256

_Key = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
_FILES: OrderedDict[str, tuple[_Key, mmap.mmap | None]] = OrderedDict()
_LOCK = threading.Lock()
_LOCAL: dict[int, memoryview] = {}  # local_ref's buffers, until release_input
_LOCAL_IDS = itertools.count(1)


def file_ref(path: str | os.PathLike[str], offset: int, nbytes: int) -> dict[str, Any]:
    """A reference to ``nbytes`` bytes at ``offset`` of the file at ``path`` (made absolute)."""
    offset, nbytes = int(offset), int(nbytes)
    if offset < 0 or nbytes < 0:
        raise LayoutError(f"negative offset or length in a file reference: {offset}, {nbytes}")
    return {"path": os.path.abspath(os.fspath(path)), "offset": offset, "nbytes": nbytes}


def local_ref(buffer: Any) -> dict[str, Any]:
    """A reference to a buffer of this process, held (not copied) until
    ``release_input`` of the reference."""
    view = memoryview(buffer).cast("B")
    with _LOCK:
        ident = next(_LOCAL_IDS)
        _LOCAL[ident] = view
    return {"local": ident, "pid": os.getpid(), "nbytes": view.nbytes}


def attach_input(ref: Mapping[str, Any]) -> memoryview:
    """Map an input by reference (shared memory, file or a buffer of this process) and
    return a view of its bytes."""
    if "shm" in ref:
        return shm.attach(ref)
    if "local" in ref:
        if ref.get("pid") != os.getpid():
            raise LayoutError(f"{dict(ref)!r} names a buffer of another process")
        with _LOCK:
            found = _LOCAL.get(ref["local"]) if isinstance(ref["local"], int) else None
        if found is None:
            raise LayoutError(f"{dict(ref)!r} names no buffer of this process")
        return found
    if "path" not in ref:
        raise LayoutError(f"an input reference names 'shm' or 'path', got {dict(ref)!r}")
    try:
        path, offset, nbytes = str(ref["path"]), int(ref["offset"]), int(ref["nbytes"])
    except (KeyError, TypeError, ValueError):
        raise LayoutError(f"not a file reference: {dict(ref)!r}") from None
    if not os.path.isabs(path):
        raise LayoutError(f"a file reference needs an absolute path, got {path!r}")
    if offset < 0 or nbytes < 0:
        raise LayoutError(f"negative offset or length in file reference {dict(ref)!r}")
    mapping, size = _map_file(path)
    if offset + nbytes > size:
        raise LayoutError(f"{dict(ref)!r} reaches past the end of its {size}-byte file")
    if mapping is None:  # an empty file cannot be mapped; only an empty range fits in it
        return memoryview(b"")
    return memoryview(mapping)[offset : offset + nbytes]


def _map_file(path: str) -> tuple[mmap.mmap | None, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"input file {path} does not exist") from None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _LOCK:
        cached = _FILES.get(path)
        if cached is not None and cached[0] == key:
            _FILES.move_to_end(path)
            return cached[1], _length(cached[1])
        if cached is not None:  # replaced under the same path: this mapping is stale
            _close(_FILES.pop(path)[1])
        _forget_deleted()
        mapping = _open(path) if st.st_size else None
        _FILES[path] = (key, mapping)
        while len(_FILES) > _MAX_FILES:
            _close(_FILES.popitem(last=False)[1][1])
        return mapping, _length(mapping)


def _length(mapping: mmap.mmap | None) -> int:
    # The mapping's own length, not the stat's: the file may have changed in between.
    return 0 if mapping is None else len(mapping)


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault the pages in at once


def _open(path: str) -> mmap.mmap:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NotFound(f"input file {path} does not exist") from None
    try:
        # MAP_POPULATE maps every page of the file in one call: a 40 MB update costs
        # ~1 ms that way, against thousands of page faults at 3-14 µs each on these VMs.
        return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)  # the mapping keeps its own descriptor


def release_input(ref: Mapping[str, Any]) -> None:
    """Done with a file input: drop this process's mapping of it, so its pages stop
    counting in this process's memory (an aggregator maps each update once, adds it,
    and never reads it again). Views still held keep the pages until they go. Done
    with a buffer of this process: let it go."""
    if "local" in ref:
        with _LOCK:
            _LOCAL.pop(ref["local"], None)
        return
    path = ref.get("path")
    if path is None:
        return
    with _LOCK:
        cached = _FILES.pop(str(path), None)
    if cached is not None and cached[1] is not None:
        mapping = cached[1]
        with contextlib.suppress(ValueError, OSError):
            mapping.madvise(mmap.MADV_DONTNEED)  # unmap the pages now, whatever holds views
        _close(mapping)


def _forget_deleted() -> None:
    for path in [p for p in _FILES if not os.path.exists(p)]:
        _close(_FILES.pop(path)[1])


def _close(mapping: mmap.mmap | None) -> None:
    # A view still held keeps the mapping alive; it is closed when that view goes.
    if mapping is not None:
        with contextlib.suppress(BufferError):
            mapping.close()


class PrivateBuffer:
    """An accumulator in this process's private memory, for aggregators on threads of
    this process (``ThreadExecutor``), referred to by ``_inputs.local_ref``. Linux backs
    private memory with transparent huge pages where it can, a ``/dev/shm`` segment with
    4 KiB pages: a pass over a float64 accumulator of 10M values runs ~1.4 × faster so
    (fewer TLB misses; measured on these machines, see docs/data-path.md)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._map = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):  # (where the kernel has it)
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self._buffer: memoryview | None = memoryview(self._map)[:nbytes]
        self.ref = _LocalRef(local_ref(self._buffer))

    @property
    def buffer(self) -> memoryview:
        if self._buffer is None:
            raise StratoError("a private accumulator was used after its release")
        return self._buffer

    def release(self) -> None:
        if self._buffer is None:
            return
        release_input(self.ref.to_dict())
        buffer, self._buffer = self._buffer, None
        with contextlib.suppress(BufferError):  # a view still held: freed when it goes
            buffer.release()
            self._map.close()


class _LocalRef:
    def __init__(self, ref: dict[str, Any]) -> None:
        self._ref = ref
        self.nbytes = int(ref["nbytes"])

    def to_dict(self) -> dict[str, Any]:
        return dict(self._ref)


Accumulator = shm.ShmLease | PrivateBuffer
