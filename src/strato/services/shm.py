"""Node shared memory: large inputs handed between processes by reference.

An owner process leases a buffer from a ``ShmPool``, writes into it, and puts the
lease's ``ShmRef`` (a three-field JSON dict) in an event; the receiving process maps
the very same pages with ``attach(ref)``. Nothing is copied and nothing is pickled.

Segments are plain files in ``/dev/shm`` opened with ``os.open`` + ``mmap``. We do not
use ``multiprocessing.shared_memory``: on Python 3.11 its resource tracker unlinks a
segment when any process that merely attached to it exits.

Lifetime rules that keep ``/dev/shm`` clean:

- only the pool's owner creates and unlinks segments; other processes (workers) only
  attach, so a crashed worker can never leak or destroy one;
- ``close()`` unlinks every segment of the pool; it runs at interpreter exit (atexit).
  The signals whose default action would kill the process without running atexit
  (SIGTERM, SIGHUP, and SIGINT when its handler is ``SIG_DFL``) unlink every segment
  the process created first (recorded before each file exists, so a signal in the
  middle of a lease finds it too). Python's own SIGINT handler raises
  KeyboardInterrupt, which unwinds through atexit, so we leave that one alone: a
  program that catches Ctrl-C keeps a working pool. A watcher thread makes either
  happen even while the main thread is blocked (see ``_shm_lifetime``);
- a ``ProcessRuntime`` that kills a worker (timeout, crash, close) unlinks the
  segments that worker created, since a SIGKILLed process cleans up nothing;
- segment names are ``strato-<ownerpid>-<pooltoken>-<seq>``, and ``sweep_orphans()``
  (run whenever a pool is created) unlinks every segment whose owner is dead, so even
  the leftovers of a SIGKILLed owner vanish at the next start.

Buffers are pooled by size class and reused: on these machines first touch of fresh
memory runs at ~2 GB/s and rewriting warm memory at ~24 GB/s.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strato.errors import StratoError
from strato.services._shm_lifetime import (
    NAME,
    SHM_DIR,
    close_all_pools,
    register,
    sweep_orphans,
    track,
    untrack,
)

__all__ = [
    "SHM_DIR",
    "ShmError",
    "ShmLease",
    "ShmPool",
    "ShmRef",
    "attach",
    "close_all_pools",
    "detach_all",
    "size_class",
    "sweep_orphans",
]

_MIN_SEGMENT = 64 * 1024
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only


class ShmError(StratoError):
    """A shared-memory reference is malformed, stale, or the node is out of shared memory."""


def size_class(nbytes: int) -> int:
    """The segment size serving a request: four classes per power of two (≤ 25% slack)."""
    if nbytes <= _MIN_SEGMENT:
        return _MIN_SEGMENT
    step = 1 << max(0, (nbytes - 1).bit_length() - 3)
    return -(-nbytes // step) * step


@dataclass(frozen=True)
class ShmRef:
    """Where a buffer lives: segment name, byte offset and length. Small enough for an event."""

    name: str
    offset: int
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"shm": self.name, "offset": self.offset, "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShmRef:
        try:
            ref = cls(str(data["shm"]), int(data["offset"]), int(data["nbytes"]))
        except (KeyError, TypeError, ValueError):
            raise ShmError(f"not a shared-memory reference: {dict(data)!r}") from None
        if not NAME.match(ref.name):  # the name becomes a path: refuse anything else
            raise ShmError(f"not a Strato shared-memory segment name: {ref.name!r}")
        if ref.offset < 0 or ref.nbytes < 0:
            raise ShmError(f"negative offset or length in shared-memory reference {ref}")
        return ref

    def sub(self, offset: int, nbytes: int) -> ShmRef:
        """A reference to a slice of this buffer (e.g. one layer of a model)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise ShmError(f"slice [{offset}, {offset + nbytes}) is outside {self}")
        return ShmRef(self.name, self.offset + offset, nbytes)


class _Segment:
    """One file in /dev/shm and the owner's mapping of it."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        path = os.path.join(SHM_DIR, name)
        # Recorded before the file exists: a signal from here on (or a KeyboardInterrupt
        # that cuts the lease short) finds it, whatever state the pool is in.
        track(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except BaseException:
            untrack(name)
            raise
        try:
            # fallocate reserves the pages now: a full /dev/shm is an error here, instead
            # of a SIGBUS on some later write into a sparse file.
            os.posix_fallocate(fd, 0, size)
            # Pre-fault the owner's page tables in one go: the owner is about to fill the
            # buffer, and 400 MiB of page faults one by one cost ~4× more here.
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        except OSError as exc:
            self.unlink()
            raise ShmError(
                f"cannot allocate {size} bytes of shared memory in {SHM_DIR}: {exc}"
            ) from None
        finally:
            os.close(fd)  # the mapping keeps the memory; the fd is not needed

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, self.name))
        untrack(self.name)  # only once the file is gone

    def unmap(self) -> None:
        # If someone still holds a view, the pages go away with the last view instead.
        with contextlib.suppress(BufferError):
            self.map.close()


class ShmLease:
    """A reference-counted hold on one pooled buffer. The segment returns to its pool
    (for reuse, not unlinked) when the count drops to zero."""

    def __init__(self, pool: ShmPool, segment: _Segment, nbytes: int) -> None:
        self._pool = pool
        self._segment = segment
        self._buffer: memoryview | None = memoryview(segment.map)[:nbytes]
        self._refs = 1
        self.ref = ShmRef(segment.name, 0, nbytes)

    @property
    def buffer(self) -> memoryview:
        """The owner's writable view of the buffer (exactly ``nbytes`` long)."""
        if self._buffer is None:
            raise ShmError(f"lease on {self.ref.name} was released")
        return self._buffer

    @property
    def nbytes(self) -> int:
        return self.ref.nbytes

    @property
    def refcount(self) -> int:
        return self._refs

    def to_dict(self) -> dict[str, Any]:
        return self.ref.to_dict()

    def retain(self) -> ShmLease:
        with self._pool._lock:
            if self._refs <= 0:
                raise ShmError(f"lease on {self.ref.name} was released")
            self._refs += 1
        return self

    def release(self) -> None:
        with self._pool._lock:
            if self._refs <= 0:
                raise ShmError(f"lease on {self.ref.name} was released more often than retained")
            self._refs -= 1
            if self._refs > 0:
                return
            view, self._buffer = self._buffer, None
            if view is not None:
                # A stale view of a reused buffer would alias the next lease's data. If
                # it is exported (np.frombuffer), the holder keeps it at their own risk.
                with contextlib.suppress(BufferError):
                    view.release()
            self._pool._give_back(self._segment)

    def __enter__(self) -> ShmLease:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._refs > 0:
            self.release()


class ShmPool:
    """Owns shared-memory segments and hands out leases over them, reusing warm ones.

    ``max_idle_bytes`` caps the memory parked in released segments; beyond it, released
    segments are unlinked instead of pooled.
    """

    def __init__(self, *, max_idle_bytes: int = 2 << 30) -> None:
        sweep_orphans()
        self.owner_pid = os.getpid()
        self.max_idle_bytes = max_idle_bytes
        self._prefix = f"strato-{self.owner_pid}-{secrets.token_hex(4)}-"
        self._seq = 0
        self._lock = threading.RLock()  # re-entrant: a lease's release() gives back under it
        self._idle: dict[int, list[_Segment]] = {}
        self._idle_bytes = 0
        self._leased: dict[str, _Segment] = {}
        self._closed = False
        self.created = 0  # segments ever created: lets callers see reuse
        register(self)

    def lease(self, nbytes: int) -> ShmLease:
        """A buffer of exactly ``nbytes`` (a reused segment of its size class if one is idle)."""
        if nbytes < 1:
            raise ShmError(f"a shared-memory lease needs at least one byte, got {nbytes}")
        size = size_class(nbytes)
        with self._lock:
            if self._closed:
                raise ShmError("the shared-memory pool is closed")
            free = self._idle.get(size)
            if free:
                segment = free.pop()  # LIFO: the most recently used pages are the warmest
                self._idle_bytes -= size
                self._leased[segment.name] = segment
                return ShmLease(self, segment, nbytes)
            self._seq += 1
            name = f"{self._prefix}{self._seq}"
        segment = _Segment(name, size)  # outside the lock: fallocate of a big segment is slow
        with self._lock:
            _OWNED[name] = segment.map
            self.created += 1
            if self.closed:  # closed while we were allocating
                self._drop(segment)
                raise ShmError("the shared-memory pool is closed")
            self._leased[name] = segment
            return ShmLease(self, segment, nbytes)

    def release(self, lease: ShmLease) -> None:
        lease.release()

    @property
    def closed(self) -> bool:
        return self._closed

    def attach(self, ref: ShmRef | Mapping[str, Any]) -> memoryview:
        return attach(ref)

    @property
    def segment_names(self) -> list[str]:
        """Names of every segment the pool holds, leased or idle."""
        with self._lock:
            idle = [s.name for free in self._idle.values() for s in free]
            return sorted([*self._leased, *idle])

    def _give_back(self, segment: _Segment) -> None:
        with self._lock:
            self._leased.pop(segment.name, None)
            if self._closed or self._idle_bytes + segment.size > self.max_idle_bytes:
                self._drop(segment)
                return
            self._idle.setdefault(segment.size, []).append(segment)
            self._idle_bytes += segment.size

    def _drop(self, segment: _Segment) -> None:
        _OWNED.pop(segment.name, None)
        segment.unlink()
        segment.unmap()

    def close(self) -> None:
        """Unlink every segment. Views still held stay valid until dropped (no new attach)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            segments = [*self._leased.values(), *(s for free in self._idle.values() for s in free)]
            self._leased.clear()
            self._idle.clear()
            self._idle_bytes = 0
            if os.getpid() != self.owner_pid:
                return  # a forked child inherited the pool object; the owner cleans up
            for segment in segments:
                self._drop(segment)

    def __enter__(self) -> ShmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Mappings of the segments this process owns, so attach() in the owner is free.
_OWNED: dict[str, mmap.mmap] = {}
# Mappings this process attached to (workers): one per segment, reused per invocation.
_ATTACHED: dict[str, mmap.mmap] = {}
_ATTACH_LOCK = threading.Lock()


def attach(ref: ShmRef | Mapping[str, Any]) -> memoryview:
    """Map a buffer by reference and return a writable view of it (no copy)."""
    if not isinstance(ref, ShmRef):
        ref = ShmRef.from_dict(ref)
    with _ATTACH_LOCK:
        mapping = _OWNED.get(ref.name) or _ATTACHED.get(ref.name)
        if mapping is None:
            _forget_unlinked()
            mapping = _map(ref.name)
            _ATTACHED[ref.name] = mapping
    if ref.offset + ref.nbytes > len(mapping):
        raise ShmError(f"{ref} reaches past the end of its {len(mapping)}-byte segment")
    return memoryview(mapping)[ref.offset : ref.offset + ref.nbytes]


def _map(name: str) -> mmap.mmap:
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    except FileNotFoundError:
        raise ShmError(
            f"shared-memory segment {name} does not exist (its owner closed it)"
        ) from None
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _forget_unlinked() -> None:
    # A segment its owner unlinked can never be attached again (names are not reused):
    # drop our mapping so its memory is freed once the last view of it goes.
    for name in [n for n in _ATTACHED if not os.path.exists(os.path.join(SHM_DIR, n))]:
        mapping = _ATTACHED.pop(name)
        with contextlib.suppress(BufferError):
            mapping.close()


def detach_all() -> None:
    """Drop every attached mapping of this process (views still held stay valid)."""
    with _ATTACH_LOCK:
        for mapping in _ATTACHED.values():
            with contextlib.suppress(BufferError):
                mapping.close()
        _ATTACHED.clear()
