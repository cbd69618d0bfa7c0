"""One SQLite file shared by threads and processes: the store under the embedded Bus and Table.

Why it looks like this:
- WAL mode lets readers run while one writer commits, and several processes open the
  same file; ``synchronous=NORMAL`` keeps every commit across a process crash (only a
  power cut can lose the last ones), which is the durability the embedded backend owes.
- Every write is ``BEGIN IMMEDIATE``: it takes the write lock before reading, so a
  read-check-write (compare-and-set, claiming a message) is atomic across processes,
  and a busy writer is waited for by the busy handler instead of failing with
  SQLITE_BUSY_SNAPSHOT, which a deferred transaction that upgrades can hit.
- One connection per object, guarded by a lock: SQLite calls take microseconds and
  release the GIL, so a connection per thread would buy little and leak with thread churn.
- A connection must not cross a ``fork``: a child notices the new pid and opens its own.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from strato.errors import StratoError

__all__ = ["SqliteFile"]

BUSY_TIMEOUT_MS = 30_000


class SqliteFile:
    """A lazily (re)opened connection to ``path`` whose schema is created on first open."""

    def __init__(self, path: Path, schema: str, what: str) -> None:
        self.path = Path(path)
        self._schema = schema
        self._what = what  # for messages: "bus", "table"
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.read():
            pass  # open now so a bad path fails at construction, not at first use

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StratoError(f"the {self._what} at {self.path} is closed")
        if self._conn is None or self._pid != os.getpid():
            # After a fork the parent's connection is abandoned, not closed: closing
            # it here could disturb the parent's locks on the file.
            self._conn = self._open()
            self._pid = os.getpid()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False:
        # the lock below, not the creating thread, serialises use.
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Switching to WAL needs a moment of exclusive access; when several processes
        # create the file at once one of them may see "locked" despite the busy handler.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        conn.execute("PRAGMA synchronous = NORMAL")
        # The schema goes in statement by statement: executescript would commit first.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in self._schema.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return conn

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection for autocommit reads (each statement sees the latest commit)."""
        with self._lock:
            yield self._connection()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction, committed on success, rolled back on error."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
            self._closed = True
