"""The embedded Table: DynamoDB-style items and a Streams-style change log in one SQLite file.

Each write runs in one ``BEGIN IMMEDIATE`` transaction that checks the condition,
writes the item and appends its change record, so a compare-and-set is atomic across
processes and the stream holds exactly the committed writes, in commit order. A
cursor is the change's sequence number (as a string; callers treat it as opaque).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

from strato.errors import ConditionFailed, ConfigError, NotFound
from strato.services._doorbell import Doorbell, Listener
from strato.services._sqlite import SqliteFile
from strato.services.table import Change, Item

__all__ = ["SqliteTable"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tables (
    name TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS items (
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (tbl, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stream (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    old TEXT,
    new TEXT
);
CREATE INDEX IF NOT EXISTS stream_by_table ON stream (tbl, seq);
CREATE TABLE IF NOT EXISTS unstreamed (
    name TEXT PRIMARY KEY
);
"""

_MAX_CODE_POINT = 0x10FFFF


class SqliteTable:
    """``Table`` on one SQLite file (see the module doc); safe for threads and processes."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteFile(Path(path), _SCHEMA, "table")
        # Tables are never dropped, so a table once seen stays known.
        self._known: set[str] = set()
        self._streams: dict[str, bool] = {}  # per table: do its writes go to the stream?
        # Each committed change rings the table's stream listener, if any (a trigger).
        self._bell = Doorbell(str(path))

    def listen_stream(self, table: str) -> Listener | None:
        """Be woken when ``table``'s stream may have news (see ``_doorbell``); None when
        this machine has no doorbell or another process listens already."""
        return self._bell.listen(table)

    def create_table(self, table: str, *, stream: bool = True) -> None:
        if not isinstance(table, str) or not table:
            raise ValueError(f"a table name must be a non-empty string, got {table!r}")
        with self._db.write() as conn:
            created = conn.execute(
                "INSERT OR IGNORE INTO tables (name) VALUES (?)", (table,)
            ).rowcount
            if created and not stream:  # fixed when the table is made, as on DynamoDB
                conn.execute("INSERT OR IGNORE INTO unstreamed (name) VALUES (?)", (table,))
        self._known.add(table)

    def _streamed(self, conn: sqlite3.Connection, table: str) -> bool:
        if table not in self._streams:
            row = conn.execute("SELECT 1 FROM unstreamed WHERE name = ?", (table,)).fetchone()
            self._streams[table] = row is None
        return self._streams[table]

    def put(
        self,
        table: str,
        key: str,
        value: Mapping[str, Any],
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> int:
        if if_absent and if_version is not None:
            raise ValueError("put takes if_absent or if_version, not both")
        _check_key(key)
        new_json = _to_json(table, key, value)
        with self._db.write() as conn:
            self._check_table(conn, table)
            row = conn.execute(
                "SELECT value, version FROM items WHERE tbl = ? AND key = ?", (table, key)
            ).fetchone()
            if if_absent and row is not None:
                raise ConditionFailed(
                    f"put if_absent: item {key!r} of table {table!r} already exists "
                    f"(version {row[1]})"
                )
            if if_version is not None:
                _check_version(table, key, row, if_version, "put")
            version = 1 if row is None else int(row[1]) + 1
            conn.execute(
                "INSERT INTO items (tbl, key, value, version) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (tbl, key) DO UPDATE SET "
                "value = excluded.value, version = excluded.version",
                (table, key, new_json, version),
            )
            streamed = self._streamed(conn, table)
            if streamed:
                conn.execute(
                    "INSERT INTO stream (tbl, key, kind, old, new) VALUES (?, ?, ?, ?, ?)",
                    (table, key, "INSERT" if row is None else "MODIFY", row and row[0], new_json),
                )
        if streamed:
            self._bell.ring(table)
        return version

    def get(self, table: str, key: str, *, consistent: bool = True) -> Item | None:
        # Every read sees the latest commit, so ``consistent`` has nothing to change here.
        with self._db.read() as conn:
            self._check_table(conn, table)
            row = conn.execute(
                "SELECT value, version FROM items WHERE tbl = ? AND key = ?", (table, key)
            ).fetchone()
        return None if row is None else Item(key, json.loads(row[0]), int(row[1]))

    def query(self, table: str, prefix: str = "") -> list[Item]:
        # A key range, not LIKE: keys may hold '%' and '_', and the range uses the index.
        upper = _prefix_upper_bound(prefix)
        sql = "SELECT key, value, version FROM items WHERE tbl = ? AND key >= ?"
        args: tuple[str, ...] = (table, prefix)
        if upper is not None:
            sql += " AND key < ?"
            args += (upper,)
        with self._db.read() as conn:
            self._check_table(conn, table)
            rows = conn.execute(sql + " ORDER BY key", args).fetchall()
        return [Item(k, json.loads(v), int(n)) for k, v, n in rows if k.startswith(prefix)]

    def delete(self, table: str, key: str, *, if_version: int | None = None) -> None:
        with self._db.write() as conn:
            self._check_table(conn, table)
            row = conn.execute(
                "SELECT value, version FROM items WHERE tbl = ? AND key = ?", (table, key)
            ).fetchone()
            if if_version is not None:
                _check_version(table, key, row, if_version, "delete")
            if row is None:
                return  # deleting a missing item is a no-op, as in DynamoDB
            conn.execute("DELETE FROM items WHERE tbl = ? AND key = ?", (table, key))
            streamed = self._streamed(conn, table)
            if streamed:
                conn.execute(
                    "INSERT INTO stream (tbl, key, kind, old, new) "
                    "VALUES (?, ?, 'REMOVE', ?, NULL)",
                    (table, key, row[0]),
                )
        if streamed:
            self._bell.ring(table)

    def read_stream(self, table: str, after: str | None = None, limit: int = 100) -> list[Change]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        start = 0 if after is None else _parse_cursor(table, after)
        with self._db.read() as conn:
            self._check_table(conn, table)
            if not self._streamed(conn, table):
                raise ConfigError(f"table {table!r} was made without a stream")
            rows = conn.execute(
                "SELECT seq, key, kind, old, new FROM stream "
                "WHERE tbl = ? AND seq > ? ORDER BY seq LIMIT ?",
                (table, start, limit),
            ).fetchall()
        return [
            Change(
                cursor=str(seq),
                table=table,
                key=key,
                kind=cast(Literal["INSERT", "MODIFY", "REMOVE"], kind),
                old=None if old is None else json.loads(old),
                new=None if new is None else json.loads(new),
            )
            for seq, key, kind, old, new in rows
        ]

    def trim_stream(self, table: str, upto: str) -> None:
        seq = _parse_cursor(table, upto)
        with self._db.write() as conn:
            self._check_table(conn, table)
            conn.execute("DELETE FROM stream WHERE tbl = ? AND seq <= ?", (table, seq))

    def close(self) -> None:
        self._db.close()
        self._bell.close()

    def _check_table(self, conn: sqlite3.Connection, table: str) -> None:
        if table in self._known:
            return
        if conn.execute("SELECT 1 FROM tables WHERE name = ?", (table,)).fetchone() is None:
            raise NotFound(f"no table named {table!r} (create it with create_table first)")
        self._known.add(table)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"an item key must be a non-empty string, got {key!r}")


def _to_json(table: str, key: str, value: Mapping[str, Any]) -> str:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"item {key!r} of table {table!r} must be a mapping, got {type(value).__name__}"
        )
    try:
        return json.dumps(dict(value), separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"item {key!r} of table {table!r} is not JSON-serialisable: {exc}"
        ) from None


def _check_version(
    table: str, key: str, row: tuple[str, int] | None, expected: int, op: str
) -> None:
    if row is None:
        raise ConditionFailed(
            f"{op} if_version={expected}: item {key!r} of table {table!r} does not exist"
        )
    if int(row[1]) != expected:
        raise ConditionFailed(
            f"{op} if_version={expected}: item {key!r} of table {table!r} is at version {row[1]}"
        )


def _parse_cursor(table: str, cursor: str) -> int:
    try:
        seq = int(cursor)
    except (TypeError, ValueError):
        seq = -1
    if seq < 0:
        raise NotFound(f"{cursor!r} is not a stream cursor of table {table!r}")
    return seq


def _prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: no bound).

    SQLite compares TEXT as UTF-8 bytes, which orders like code points, so bumping the
    last code point that can be bumped gives the bound; surrogates cannot occur in a key.
    """
    stripped = prefix.rstrip(chr(_MAX_CODE_POINT))
    if not stripped:
        return None
    last = ord(stripped[-1]) + 1
    if 0xD800 <= last <= 0xDFFF:
        last = 0xE000
    return stripped[:-1] + chr(last)
