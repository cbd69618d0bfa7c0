"""Process-exit cleanup and the orphan sweep for ``strato.services.shm``.

See the ``shm`` module docstring for the rules; this module only carries them out.

Three things make the cleanup hold whenever a signal lands:

- every segment name this process creates is recorded (``track``) *before* its file
  exists and forgotten (``untrack``) only after the file is unlinked, so the exit and
  signal paths unlink by that record, never by a pool's bookkeeping (which a signal can
  catch half-updated, and which a ``KeyboardInterrupt`` can leave behind mid-lease);
- Python runs a signal's handler in the main thread, between bytecodes: a signal that
  arrives just before the main thread blocks (``time.sleep``, a lock, ``select``) or
  that the kernel hands to another thread waits until that call returns, possibly for
  ever. A watcher thread is told of every signal at once (``signal.set_wakeup_fd``):
  for a signal that kills the process it unlinks the segments itself, and it wakes the
  main thread (a no-op signal, ``_NUDGE``) until the handler has run;
- a runtime that kills one of its workers unlinks that worker's segments
  (``sweep_orphans(owners=...)``): a SIGKILLed process runs no cleanup of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import threading
import time
import weakref
from collections.abc import Iterable
from types import FrameType
from typing import Any, Protocol

__all__ = [
    "NAME",
    "SHM_DIR",
    "close_all_pools",
    "owner_alive",
    "register",
    "sweep_orphans",
    "track",
    "unlink_created",
    "untrack",
]

SHM_DIR = "/dev/shm"
NAME = re.compile(r"^strato-(\d+)-[0-9a-f]+-\d+$")


class _Closable(Protocol):
    def close(self) -> None: ...


def owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:  # a zombie (dead, not yet reaped) is dead for our purpose
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def sweep_orphans(owners: Iterable[int] | None = None) -> list[str]:
    """Unlink every Strato segment whose owner process is dead; return their names.

    ``owners`` limits the sweep to those pids (a runtime cleaning up after a worker it
    killed). The directory is listed before any owner is checked, so a pid reused by a
    new process after the check cannot lose a segment the new process created."""
    only = None if owners is None else set(owners)
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    removed: list[str] = []
    alive: dict[int, bool] = {os.getpid(): True}
    for name in names:
        match = NAME.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        if only is not None and pid not in only:
            continue
        if pid not in alive:
            alive[pid] = owner_alive(pid)
        if alive[pid]:
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except (FileNotFoundError, PermissionError):
            pass
    return removed


# ---- segments this process created ----------------------------------------------------

# Names of the segments this process created (or is about to create) and has not
# unlinked. Plain set operations: safe from a signal handler and from any thread.
_CREATED: set[str] = set()


def track(name: str) -> None:
    """Record a segment name; call it *before* creating the file."""
    _CREATED.add(name)


def untrack(name: str) -> None:
    """Forget a segment name; call it once the file is unlinked (or was never made)."""
    _CREATED.discard(name)


def unlink_created() -> None:
    """Unlink every segment this process created and still holds. Takes no lock and
    forgets nothing (a name whose file is being created right now stays recorded), so
    it may run at any moment, in any thread, any number of times."""
    prefix = f"strato-{os.getpid()}-"  # names inherited across a fork are the parent's
    for name in list(_CREATED):
        if name.startswith(prefix):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))


# ---- process-exit cleanup -------------------------------------------------------------

_POOLS: weakref.WeakSet[_Closable] = weakref.WeakSet()
_PREVIOUS: dict[int, Any] = {}
_HOOKS_LOCK = threading.Lock()
_atexit_registered = False
_CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
# Wakes the main thread out of a blocking call so that Python runs the handlers of the
# signals that arrived (its own handler does nothing). A real-time signal nobody sends.
_NUDGE: int | None = getattr(signal, "SIGRTMAX", None)
_NUDGE_DELAYS_S = (0.002, 0.01, 0.05, 0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
_handled: dict[int, int] = {}  # signal -> how many times _on_signal has run for it
_wakeup_fds: tuple[int, int] | None = None  # (read, write) of the watcher's pipe


def close_all_pools() -> None:
    for pool in list(_POOLS):
        pool.close()
    unlink_created()  # segments no pool holds any more (a lease cut short, a dropped pool)


def register(pool: _Closable) -> None:
    """Close ``pool`` at exit; unlink its segments on the killing signals (installs the
    hooks, and the watcher, once)."""
    global _atexit_registered
    with _HOOKS_LOCK:
        _POOLS.add(pool)
        if not _atexit_registered:
            atexit.register(close_all_pools)
            _atexit_registered = True
        if _PREVIOUS or threading.current_thread() is not threading.main_thread():
            return  # installed already, or not allowed here (atexit still runs)
        for sig in _CLEANUP_SIGNALS:
            previous = signal.getsignal(sig)
            if previous in (signal.SIG_IGN, _on_signal):
                continue
            _PREVIOUS[sig] = previous
            signal.signal(sig, _on_signal)
        if _PREVIOUS:
            _start_watcher()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _handled[signum] = _handled.get(signum, 0) + 1  # the watcher stops waking us up
    previous = _PREVIOUS.get(signum)
    if callable(previous):
        # Python-level handler (KeyboardInterrupt, a framework's graceful shutdown): it
        # either returns and the program goes on using its pools, or exits through atexit.
        previous(signum, frame)
        return
    # Default action: the process dies without atexit, so clean up first, then die of
    # the same signal so the exit status tells the truth. No pool is touched: we may be
    # inside one of its methods, holding its lock.
    unlink_created()
    signal.signal(signum, signal.SIG_DFL)
    with contextlib.suppress(OSError, ValueError):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)


# ---- the watcher: signals acted on even while the main thread is blocked ------------


def _on_nudge(signum: int, frame: FrameType | None) -> None:
    """The nudge only interrupts a blocking call; the signals' own handlers do the work."""


def _start_watcher() -> None:
    """Start the watcher thread (main thread, once). Without a free wakeup fd (asyncio
    or a framework uses it) there is no watcher: handlers run when the main thread gets
    to them, as before."""
    global _wakeup_fds
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C-level handler must never block on it
    try:
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous_fd = -2
    if previous_fd != -1:
        if previous_fd >= 0:
            signal.set_wakeup_fd(previous_fd)  # someone else's: leave it to them
        os.close(read_fd)
        os.close(write_fd)
        return
    _wakeup_fds = (read_fd, write_fd)
    if _NUDGE is not None and signal.getsignal(_NUDGE) == signal.SIG_DFL:
        signal.signal(_NUDGE, _on_nudge)
    main = threading.main_thread().ident
    assert main is not None
    threading.Thread(
        target=_watch, args=(read_fd, main), name="strato-shm-signals", daemon=True
    ).start()


def _watch(read_fd: int, main: int) -> None:
    while True:
        seen = dict(_handled)  # before the read: a handler run after it is for this byte
        try:
            data = os.read(read_fd, 256)
        except OSError:
            return
        if not data:
            return
        for signum in dict.fromkeys(data):
            if signum not in _CLEANUP_SIGNALS or signal.getsignal(signum) is not _on_signal:
                continue  # not ours (the nudge, or a signal the program handles itself)
            if not callable(_PREVIOUS.get(signum)):
                unlink_created()  # the process is to die: clean up now, whatever main does
            _wake_main(signum, seen.get(signum, 0), main)


def _wake_main(signum: int, seen: int, main: int) -> None:
    """Nudge the main thread until its handler for ``signum`` has run (or give up: it
    may be in a long computation in C, or have run it before we looked)."""
    fatal = not callable(_PREVIOUS.get(signum))
    nudge = _nudge_signal()
    if nudge is None and not fatal:
        return  # re-sending SIGINT could raise a second KeyboardInterrupt: leave it
    for delay in _NUDGE_DELAYS_S:
        time.sleep(delay)
        if _handled.get(signum, 0) != seen:
            return
        try:
            # the signal itself is safe to re-send only when it is to kill us anyway
            signal.pthread_kill(main, nudge if nudge is not None else signum)
        except (OSError, ValueError):
            return


def _nudge_signal() -> int | None:
    if _NUDGE is not None and signal.getsignal(_NUDGE) is _on_nudge:
        return _NUDGE
    return None


def _after_fork_in_child() -> None:
    # The watcher thread did not come along and the segments are the parent's; the
    # handlers stay installed (they act without the watcher, as before).
    global _wakeup_fds
    _CREATED.clear()
    if _wakeup_fds is None:
        return
    read_fd, write_fd = _wakeup_fds
    _wakeup_fds = None
    with contextlib.suppress(ValueError, OSError):
        current = signal.set_wakeup_fd(-1)
        if current not in (-1, write_fd):
            signal.set_wakeup_fd(current)  # not ours any more: put it back
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


os.register_at_fork(after_in_child=_after_fork_in_child)
