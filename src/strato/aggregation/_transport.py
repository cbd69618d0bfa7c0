"""Node-to-node links: a small JSON header and a raw payload over a local TCP socket.

Only two things ever cross nodes: an update whose leaf lives on another node, and a
leaf's (or middle's) partial sum going to a parent on another node. Either way the
sender writes straight from its shared-memory segment (``sendall`` of a memoryview:
no user-space copy) and the receiver reads straight into a segment leased from its
own node's pool (``recv_into``): the receive-into-place rule of the data path.

Frame: ``<u32 header length> <header JSON> <payload of header["nbytes"] bytes>``.
Each destination has one connection and one sender thread (frames to a node go out
in order); each accepted connection has one receiver thread.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from strato.services.shm import ShmLease

__all__ = ["Endpoint"]

_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 16

Received = Callable[[dict[str, Any], ShmLease | None], None]
LeaseFn = Callable[[int], ShmLease]


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from the socket; False on a clean EOF before the first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError("peer closed the connection in the middle of a frame")
        got += n
    return True


class _Sender:
    def __init__(self, address: tuple[str, int], owner: Endpoint) -> None:
        self.address = address
        self.owner = owner
        self.queue: queue.SimpleQueue[
            tuple[bytes, memoryview | None, Callable[[], None] | None] | None
        ] = queue.SimpleQueue()
        self.sock: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, name="lifl-send", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            head, payload, on_sent = item
            try:
                if self.sock is None:
                    self.sock = socket.create_connection(self.address)
                    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sock.sendall(head)
                if payload is not None:
                    self.sock.sendall(payload)
                self.owner._count_sent(len(head), 0 if payload is None else len(payload))
            except OSError as exc:
                self.owner._failed(exc)
            finally:
                if on_sent is not None:
                    on_sent()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self.sock.close()


class Endpoint:
    """One node's listening socket and its outgoing connections."""

    def __init__(self, on_message: Received, lease: LeaseFn, on_error: Callable[[Exception], None]):
        self._on_message = on_message
        self._lease = lease
        self._on_error = on_error
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self._lock = threading.Lock()
        self._senders: dict[tuple[str, int], _Sender] = {}
        self._receivers: list[tuple[socket.socket, threading.Thread]] = []
        self._closed = False
        self.payload_bytes_sent = 0
        self.header_bytes_sent = 0
        self.payload_bytes_received = 0
        self._acceptor = threading.Thread(target=self._accept, name="lifl-accept", daemon=True)
        self._acceptor.start()

    # ---- sending ---------------------------------------------------------------------

    def send(
        self,
        address: tuple[str, int],
        header: dict[str, Any],
        payload: memoryview | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """Queue a frame; ``on_sent`` runs once the payload is out (or the send failed)."""
        header = {**header, "nbytes": 0 if payload is None else len(payload)}
        body = json.dumps(header, separators=(",", ":")).encode()
        with self._lock:
            if self._closed:
                raise ConnectionError("the node's endpoint is closed")
            sender = self._senders.get(address)
            if sender is None:
                sender = self._senders[address] = _Sender(address, self)
        sender.queue.put((_LEN.pack(len(body)) + body, payload, on_sent))

    def _count_sent(self, header: int, payload: int) -> None:
        with self._lock:
            self.header_bytes_sent += header
            self.payload_bytes_sent += payload

    def _failed(self, exc: Exception) -> None:
        if not self._closed:
            self._on_error(exc)

    # ---- receiving -------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            thread = threading.Thread(
                target=self._receive, args=(conn,), name="lifl-recv", daemon=True
            )
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._receivers.append((conn, thread))
            thread.start()

    def _receive(self, conn: socket.socket) -> None:
        length = bytearray(_LEN.size)
        try:
            while _recv_exactly(conn, memoryview(length)):
                (size,) = _LEN.unpack(length)
                if size > _MAX_HEADER:
                    raise ConnectionError(f"frame header of {size} bytes is over the limit")
                head = bytearray(size)
                if not _recv_exactly(conn, memoryview(head)):
                    raise ConnectionError("peer closed the connection after a frame length")
                header = json.loads(head)
                nbytes = int(header.get("nbytes", 0))
                lease = None
                if nbytes:
                    lease = self._lease(nbytes)
                    try:
                        if not _recv_exactly(conn, lease.buffer):
                            raise ConnectionError("peer closed the connection before a payload")
                    except BaseException:
                        lease.release()
                        raise
                    with self._lock:
                        self.payload_bytes_received += nbytes
                self._on_message(header, lease)
        except (OSError, ValueError) as exc:
            self._failed(exc)
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            senders = list(self._senders.values())
            receivers = list(self._receivers)
        for sender in senders:
            sender.queue.put(None)
        for sender in senders:
            sender.thread.join(timeout=10.0)
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._server.close()
        for conn, thread in receivers:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            thread.join(timeout=10.0)
        self._acceptor.join(timeout=10.0)
