"""Table: items with conditional writes and an ordered change stream (DynamoDB + Streams).

Semantics every backend keeps:
- Items are JSON objects under a string key in a named table; each write bumps the
  item's ``version``. ``put(..., if_absent=True)`` and ``put(..., if_version=v)`` are
  compare-and-set: they raise ``ConditionFailed`` when the item is in another state.
- Every successful write appends a ``Change`` to the table's stream, in commit order.
  A consumer reads ``read_stream(table, after=cursor)`` and keeps the last cursor it
  processed (its checkpoint); reading again from that cursor resumes exactly there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["Change", "Item", "Table"]


@dataclass(frozen=True)
class Item:
    key: str
    value: dict[str, Any]
    version: int


@dataclass(frozen=True)
class Change:
    cursor: str
    table: str
    key: str
    kind: Literal["INSERT", "MODIFY", "REMOVE"]
    old: dict[str, Any] | None
    new: dict[str, Any] | None


@runtime_checkable
class Table(Protocol):
    def create_table(self, table: str, *, stream: bool = True) -> None:
        """Create a table with its change stream enabled (idempotent). ``stream=False``:
        a table whose changes nobody reads; its writes leave no stream records (set when
        the table is made; ``read_stream`` of it is an error)."""
        ...

    def put(
        self,
        table: str,
        key: str,
        value: Mapping[str, Any],
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> int:
        """Write an item; returns its new version. Raises ConditionFailed."""
        ...

    def get(self, table: str, key: str, *, consistent: bool = True) -> Item | None: ...

    def query(self, table: str, prefix: str = "") -> list[Item]:
        """Items whose key starts with ``prefix``, ordered by key."""
        ...

    def delete(self, table: str, key: str, *, if_version: int | None = None) -> None: ...

    def read_stream(self, table: str, after: str | None = None, limit: int = 100) -> list[Change]:
        """Changes committed after cursor ``after`` (from the start when None), in order."""
        ...

    def trim_stream(self, table: str, upto: str) -> None:
        """Its readers are past cursor ``upto``: the changes up to it may be dropped (a
        later ``read_stream`` from the start begins after them; reading from a cursor
        still works). A backend whose streams expire by themselves may keep them."""
        ...

    def close(self) -> None: ...
