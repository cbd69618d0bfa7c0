"""A doorbell between processes: "this table's stream has news", so a trigger sleeps
instead of polling.

A stream trigger on the embedded backend used to poll its table every 20 ms. On these
VMs a timed wake-up costs ~100 µs of CPU (a timer and a VM exit), so an idle trigger
burned ~5 ms of CPU a second, more than the work it delivered. Now the trigger's
process listens on a Linux abstract-namespace datagram socket named after the
database file and the table (``Doorbell.listen``), and every writer of that table,
in any process, sends it an empty datagram after its commit (``Doorbell.ring``). A
ring costs one ``sendto`` (a few µs); with nobody listening it is refused at once.

Nothing depends on a ring arriving: the listener still looks every ``idle_s`` (1 s),
so a lost datagram (a full queue) delays a delivery, never loses it. Rings that
arrive while the listener is busy stay queued and wake its next wait at once, so a
commit is never missed between a look and a sleep. Abstract sockets vanish with
their process: nothing is left on disk. Elsewhere than Linux there is no doorbell
and the trigger polls as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import threading

__all__ = ["Doorbell", "Listener"]

_SUPPORTED = sys.platform.startswith("linux")


def _address(db: str, table: str) -> str:
    digest = hashlib.sha1(f"{os.path.realpath(db)}\0{table}".encode()).hexdigest()[:24]
    return f"\0strato-stream-{digest}"


class Listener:
    """The bound socket of one (database, table): ``wait`` returns on a ring or after
    ``timeout`` seconds, having drained every ring queued so far."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self._sock, self._address = sock, address
        self._closed = False

    def wait(self, timeout: float) -> None:
        if self._closed:
            return
        self._sock.settimeout(timeout)
        with contextlib.suppress(TimeoutError, OSError):
            self._sock.recv(1)
        self._sock.setblocking(False)
        with contextlib.suppress(BlockingIOError, OSError):
            while True:  # one look covers every commit rung for so far
                self._sock.recv(1)

    def wake(self) -> None:
        """Wake a ``wait`` now (to stop the listener's thread)."""
        with contextlib.suppress(OSError):
            self._sock.sendto(b"", self._address)

    def close(self) -> None:
        self._closed = True
        self._sock.close()


class Doorbell:
    """The writers' side: ``ring(table)`` after a commit to ``table`` of ``db``."""

    def __init__(self, db: str) -> None:
        self.db = str(db)
        self._sock: socket.socket | None = None
        self._pid = -1
        self._addresses: dict[str, str] = {}
        self._lock = threading.Lock()

    def ring(self, table: str) -> None:
        if not _SUPPORTED:
            return
        address = self._addresses.get(table)
        if address is None:
            address = self._addresses[table] = _address(self.db, table)
        with self._lock:
            if self._sock is None or self._pid != os.getpid():  # not across a fork
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
                self._pid = os.getpid()
            # Nobody listening (refused) or a full queue (the listener wakes anyway).
            with contextlib.suppress(OSError):
                self._sock.sendto(b"", address)

    def listen(self, table: str) -> Listener | None:
        """Bind this process to ``table``'s rings; None where there is no doorbell or
        another listener has it (that trigger then polls)."""
        if not _SUPPORTED:
            return None
        address = _address(self.db, table)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            return None
        return Listener(sock, address)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None and self._pid == os.getpid():
                self._sock.close()
            self._sock = None
