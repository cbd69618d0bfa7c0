"""Process-exit cleanup and the orphan sweep for ``strato.services.shm``.

See the ``shm`` module docstring for the rules; this module only carries them out.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import threading
import weakref
from types import FrameType
from typing import Any, Protocol

__all__ = ["NAME", "SHM_DIR", "close_all_pools", "owner_alive", "register", "sweep_orphans"]

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


def sweep_orphans() -> list[str]:
    """Unlink every Strato segment whose owner process is dead; return their names."""
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


# ---- process-exit cleanup -------------------------------------------------------------

_POOLS: weakref.WeakSet[_Closable] = weakref.WeakSet()
_PREVIOUS: dict[int, Any] = {}
_HOOKS_LOCK = threading.Lock()
_atexit_registered = False
_CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def close_all_pools() -> None:
    for pool in list(_POOLS):
        pool.close()


def register(pool: _Closable) -> None:
    """Close ``pool`` at exit and on the killing signals (installs the hooks once)."""
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


def _on_signal(signum: int, frame: FrameType | None) -> None:
    previous = _PREVIOUS.get(signum)
    if callable(previous):
        # Python-level handler (KeyboardInterrupt, a framework's graceful shutdown): it
        # either returns and the program goes on using its pools, or exits through atexit.
        previous(signum, frame)
        return
    # Default action: the process dies without atexit, so clean up first, then die of
    # the same signal so the exit status tells the truth.
    close_all_pools()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
