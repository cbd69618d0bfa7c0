"""The embedded Bus: SNS-style topics fanned out to SQS-style queues, all in one SQLite file.

Each queue holds its own copy of a message (one row per queue), so queues are
independent exactly as SQS queues subscribed to one SNS topic are. A row is visible
when ``visible_at <= now``; receiving it stamps a fresh receipt and pushes
``visible_at`` forward by the visibility timeout, so an unacked message reappears and
an old receipt no longer matches. Everything lives on disk, so queued and in-flight
messages survive a restart, and several processes may share the file.

Long polls wake at once for a publish in this process (a condition shared by every
bus on the same file) and notice another process's publish by a cheap read every
``POLL_INTERVAL_S``.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from strato.errors import NotFound, SchemaError
from strato.services._sqlite import SqliteFile
from strato.services.bus import Filter, Message, TopicSchema, matches_filter

__all__ = ["SqliteBus"]

POLL_INTERVAL_S = 0.015

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY,
    schema TEXT
);
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS subscriptions (
    topic TEXT NOT NULL,
    queue TEXT NOT NULL,
    filter TEXT,
    PRIMARY KEY (topic, queue)
);
CREATE INDEX IF NOT EXISTS subscriptions_by_queue ON subscriptions (queue);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    attributes TEXT NOT NULL,
    visible_at REAL NOT NULL,
    receipt TEXT,
    receive_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_visible ON messages (queue, visible_at, seq);
CREATE INDEX IF NOT EXISTS messages_by_receipt ON messages (queue, receipt);
"""


class _Waker:
    """Wakes this process's long polls on a publish; the generation closes the race
    between a poller's "nothing there" and its wait."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.generation = 0

    def notify(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()


@functools.lru_cache(maxsize=4096)
def _parsed_filter(text: str | None) -> Filter | None:
    """A subscription's filter policy, parsed once: a publish to a topic with a
    subscription per client tests every one of them."""
    return json.loads(text) if text else None


_WAKERS: dict[str, _Waker] = {}
_WAKERS_LOCK = threading.Lock()


def _waker_for(path: Path) -> _Waker:
    key = str(path.resolve())
    with _WAKERS_LOCK:
        return _WAKERS.setdefault(key, _Waker())


def _normalise_filter(topic: str, queue: str, filter_: Filter | None) -> dict[str, list[str]]:
    """Filter values as lists of strings; a bare string means that one value (not its
    characters, which is what ``set("even")`` would silently give)."""
    out: dict[str, list[str]] = {}
    for name, allowed in (filter_ or {}).items():
        values = [allowed] if isinstance(allowed, str) else list(allowed)
        if not all(isinstance(v, str) for v in values):
            raise SchemaError(
                f"filter of queue {queue!r} on topic {topic!r}: values for {name!r} "
                f"must be strings, got {values!r}"
            )
        out[str(name)] = values
    return out


class SqliteBus:
    """``Bus`` on one SQLite file (see the module doc); safe for threads and processes."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteFile(Path(path), _SCHEMA, "bus")
        self._waker = _waker_for(Path(path))

    # --- topics and subscriptions ---------------------------------------------------

    def create_topic(self, topic: str, schema: TopicSchema | None = None) -> None:
        _check_name("topic", topic)
        with self._db.write() as conn:
            if schema is None:
                conn.execute("INSERT OR IGNORE INTO topics (name) VALUES (?)", (topic,))
            else:
                conn.execute(
                    "INSERT INTO topics (name, schema) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET schema = excluded.schema",
                    (topic, json.dumps(schema.to_dict())),
                )

    def subscribe(self, topic: str, queue: str, filter: Filter | None = None) -> None:
        _check_name("queue", queue)
        normalised = _normalise_filter(topic, queue, filter)
        with self._db.write() as conn:
            _topic_schema(conn, topic)  # raises NotFound, as SNS does for a missing topic
            conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,))
            conn.execute(
                "INSERT INTO subscriptions (topic, queue, filter) VALUES (?, ?, ?) "
                "ON CONFLICT (topic, queue) DO UPDATE SET filter = excluded.filter",
                (topic, queue, json.dumps(normalised) if normalised else None),
            )

    def unsubscribe(self, topic: str, queue: str) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM subscriptions WHERE topic = ? AND queue = ?", (topic, queue))

    def delete_queue(self, queue: str) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM subscriptions WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM messages WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM queues WHERE name = ?", (queue,))

    # --- messages -------------------------------------------------------------------

    def publish(
        self, topic: str, body: bytes | str, attributes: Mapping[str, str] | None = None
    ) -> str:
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        attrs = dict(attributes or {})
        for name, value in attrs.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise SchemaError(
                    f"message for topic {topic!r}: attribute {name!r} must map a string "
                    f"to a string, got {type(value).__name__}"
                )
        message_id = uuid.uuid4().hex
        attrs_json = json.dumps(attrs)
        with self._db.write() as conn:
            schema = _topic_schema(conn, topic)
            # A topic without a schema still has SNS's size limit, so code that runs
            # here does not break on the AWS backend.
            (schema or TopicSchema()).validate(topic, data, attrs)
            rows = conn.execute(
                "SELECT queue, filter FROM subscriptions WHERE topic = ?", (topic,)
            ).fetchall()
            targets = [q for q, f in rows if matches_filter(_parsed_filter(f), attrs)]
            conn.executemany(
                "INSERT INTO messages (queue, id, body, attributes, visible_at) "
                "VALUES (?, ?, ?, ?, 0)",
                [(q, message_id, data, attrs_json) for q in targets],
            )
        if targets:
            self._waker.notify()
        return message_id

    def receive(
        self,
        queue: str,
        max_messages: int = 1,
        wait_s: float = 0.0,
        visibility_timeout_s: float = 30.0,
    ) -> list[Message]:
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        if visibility_timeout_s < 0:
            raise ValueError(f"visibility_timeout_s must be >= 0, got {visibility_timeout_s}")
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            with self._waker.cond:
                generation = self._waker.generation
            messages = self._claim(queue, max_messages, visibility_timeout_s)
            if messages:
                return messages
            # Wait for a local publish, re-reading the file each tick for other
            # processes' publishes and for in-flight messages whose timeout ran out.
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                with self._waker.cond:
                    if self._waker.generation == generation:
                        self._waker.cond.wait(min(POLL_INTERVAL_S, remaining))
                    woken = self._waker.generation != generation
                if woken or self._has_visible(queue):
                    break

    def ack(self, queue: str, receipt: str) -> None:
        with self._db.write() as conn:
            _check_queue(conn, queue)
            conn.execute("DELETE FROM messages WHERE queue = ? AND receipt = ?", (queue, receipt))

    def close(self) -> None:
        self._db.close()

    # --- internals ------------------------------------------------------------------

    def _claim(self, queue: str, max_messages: int, visibility_timeout_s: float) -> list[Message]:
        """Hand out up to ``max_messages`` visible messages, each with a new receipt."""
        with self._db.write() as conn:
            _check_queue(conn, queue)
            now = time.time()
            rows = conn.execute(
                "SELECT seq, id, body, attributes, receive_count FROM messages "
                "WHERE queue = ? AND visible_at <= ? ORDER BY seq LIMIT ?",
                (queue, now, max_messages),
            ).fetchall()
            messages = []
            for seq, message_id, body, attributes, count in rows:
                receipt = f"{seq}-{uuid.uuid4().hex}"
                conn.execute(
                    "UPDATE messages SET receipt = ?, receive_count = ?, visible_at = ? "
                    "WHERE seq = ?",
                    (receipt, count + 1, now + visibility_timeout_s, seq),
                )
                messages.append(
                    Message(
                        id=message_id,
                        body=bytes(body),
                        attributes=json.loads(attributes),
                        receipt=receipt,
                        receive_count=count + 1,
                    )
                )
        return messages

    def _has_visible(self, queue: str) -> bool:
        """A read-only look, so idle pollers do not queue up for the write lock."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT 1 FROM messages WHERE queue = ? AND visible_at <= ? LIMIT 1",
                (queue, time.time()),
            ).fetchone()
        return row is not None


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} name must be a non-empty string, got {name!r}")


def _topic_schema(conn: sqlite3.Connection, topic: str) -> TopicSchema | None:
    row = conn.execute("SELECT schema FROM topics WHERE name = ?", (topic,)).fetchone()
    if row is None:
        raise NotFound(f"no topic named {topic!r} (create it with create_topic first)")
    return None if row[0] is None else TopicSchema.from_dict(json.loads(row[0]))


def _check_queue(conn: sqlite3.Connection, queue: str) -> None:
    if conn.execute("SELECT 1 FROM queues WHERE name = ?", (queue,)).fetchone() is None:
        raise NotFound(f"no queue named {queue!r} (subscribe it to a topic first)")
