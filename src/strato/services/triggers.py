"""Stream triggers: a table's change stream invoking a function (an event source mapping).

The embedded twin of Lambda's DynamoDB Streams event source mapping: one poller per
(table, function) reads new changes after its checkpoint, invokes the function with
a batch of records, and stores the checkpoint only after the function returned. It
looks when a writer rings (``services._doorbell``; every ``poll_s`` where there is no
doorbell), so an idle trigger costs no CPU. A
crash between the two re-delivers the batch, so the function must be idempotent
(as on AWS, where delivery is at-least-once too).

``StreamSource`` names such a mapping as plain data (which table feeds which
function): an application states its sources, and the backend starts what delivers
them (``Services.start_trigger``): a ``StreamTrigger`` in this process on the
embedded backend, the cloud's own event source mapping on AWS.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any

from strato.errors import StratoError
from strato.services.runtime import Runtime
from strato.services.table import Table

__all__ = ["CHECKPOINTS", "StreamSource", "StreamTrigger"]

CHECKPOINTS = "stream_checkpoints"
_UNREAD = object()  # the checkpoint is not read yet


@dataclass(frozen=True)
class StreamSource:
    """The change stream of ``table`` invokes ``function`` with batches of its records.

    ``kinds``: the change kinds delivered (the others are skipped, as an event source
    mapping's filter skips them); ``batch_size``: the most records in one invocation;
    ``retain``: when set, the mapping is the stream's only reader and keeps only that
    many records behind its checkpoint (the stream is trimmed: its disk stays bounded);
    None keeps the whole stream.
    """

    table: str
    function: str
    kinds: tuple[str, ...] = ("INSERT", "MODIFY", "REMOVE")
    batch_size: int = 100
    retain: int | None = None


class StreamTrigger:
    def __init__(
        self,
        table: Table,
        source: str,
        runtime: Runtime,
        function: str,
        *,
        batch_size: int = 100,
        poll_s: float = 0.02,
        idle_s: float = 1.0,
        on_error: Callable[[Exception], None] | None = None,
        kinds: Collection[str] | None = None,
        retain: int | None = None,
    ) -> None:
        self.table, self.source, self.runtime, self.function = table, source, runtime, function
        self.retain = retain
        self._behind: collections.deque[tuple[str, int]] = collections.deque()  # (cursor, n)
        self._behind_n = 0  # records delivered and checkpointed, not yet trimmed
        self.batch_size, self.poll_s, self.on_error = batch_size, poll_s, on_error
        self.idle_s = idle_s
        self.kinds = None if kinds is None else frozenset(kinds)
        self.name = f"{source}->{function}"
        table.create_table(CHECKPOINTS, stream=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Any = None
        self._cursor: object = _UNREAD
        self.batches = 0

    def checkpoint(self) -> str | None:
        item = self.table.get(CHECKPOINTS, self.name)
        return None if item is None else str(item.value["cursor"])

    def poll_once(self) -> int:
        """Deliver one batch if there is one; returns the number of changes it consumed."""
        if self._cursor is _UNREAD:  # read once; from then on this trigger writes it
            self._cursor = self.checkpoint()
        after = self._cursor if isinstance(self._cursor, str) else None
        changes = self.table.read_stream(self.source, after=after, limit=self.batch_size)
        if not changes:
            return 0
        records: list[dict[str, Any]] = [
            asdict(c) for c in changes if self.kinds is None or c.kind in self.kinds
        ]
        if records:  # a batch of skipped kinds only moves the checkpoint
            self.runtime.invoke(self.function, {"records": records})
        self.table.put(CHECKPOINTS, self.name, {"cursor": changes[-1].cursor})
        self._cursor = changes[-1].cursor
        self.batches += 1
        if self.retain is not None:
            self._trim(changes[-1].cursor, len(changes))
        return len(changes)

    def _trim(self, cursor: str, n: int) -> None:
        """Drop the stream's records more than ``retain`` behind the checkpoint (once
        twice that many have gathered: one trim per many batches)."""
        assert self.retain is not None
        self._behind.append((cursor, n))
        self._behind_n += n
        if self._behind_n < 2 * self.retain + 1:
            return
        upto = None
        while self._behind and self._behind_n - self._behind[0][1] >= self.retain:
            upto, dropped = self._behind.popleft()
            self._behind_n -= dropped
        if upto is not None:
            self.table.trim_stream(self.source, upto)

    def _loop(self) -> None:
        listener = self._listener
        while not self._stop.is_set():
            try:
                consumed = self.poll_once()
            except StratoError as exc:  # the batch stays unconsumed and is retried
                if self.on_error is not None:
                    self.on_error(exc)
                self._stop.wait(0.5)
                continue
            if self._stop.is_set() or (consumed and (
                    listener is None or consumed >= self.batch_size)):
                continue  # a full batch: more may be waiting
            if listener is not None:
                # Sleep until a writer rings (or idle_s passes). After a batch that was
                # not full, too: a commit after that read has rung (rings stay queued
                # while this thread delivers), so looking again at once would only find
                # nothing, at the cost of a read.
                listener.wait(self.idle_s)
            else:
                self._stop.wait(self.poll_s)

    def start(self) -> StreamTrigger:
        # A table that can ring its listeners (the embedded SQLite table) spares the
        # poll: an idle trigger then costs nothing (see services._doorbell).
        listen = getattr(self.table, "listen_stream", None)
        self._listener = listen(self.source) if listen is not None else None
        self._thread = threading.Thread(target=self._loop, name=f"trigger {self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.wake()
        if self._thread is not None:
            self._thread.join()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
