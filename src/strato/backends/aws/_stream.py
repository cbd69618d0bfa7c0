"""Reading a DynamoDB stream from a cursor, across its shards.

A stream is a set of shards; a shard is open or closed, and a closed shard's records
continue in its child shards (``ParentShardId``). DynamoDB keeps every record of one
item in order within one shard lineage; when a partition splits, two children are
open at once. So a position in the stream is a *frontier*: for each shard being
read, the sequence number of the last record taken from it. The cursor string is
that frontier, ``shardId@sequenceNumber`` per shard joined by ``,`` (an empty
sequence number: from the shard's start). Every ``Change`` carries the frontier as
it was right after that change, so resuming from any change's cursor neither skips
nor repeats a record of any shard.

A cursor names shards, so it outlives neither the stream (24 h retention on AWS)
nor a table that is deleted and created again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from strato.backends.aws._boto import ClientError, error_code
from strato.errors import NotFound

__all__ = ["StreamReader", "decode_cursor", "encode_cursor"]

_MAX_EMPTY_POLLS = 3  # an open shard may answer "nothing here" before its records
_PART = re.compile(r"([A-Za-z0-9_.-]+)@(\d*)")


@dataclass
class Position:
    shard: str
    seq: str  # the last record read from the shard; "" = none yet


def encode_cursor(frontier: list[Position]) -> str:
    return ",".join(f"{p.shard}@{p.seq}" for p in frontier)


def decode_cursor(cursor: str, table: str) -> list[Position]:
    parts = cursor.split(",") if isinstance(cursor, str) and cursor else []
    frontier: list[Position] = []
    for part in parts:
        match = _PART.fullmatch(part)
        if match is None:
            frontier = []
            break
        frontier.append(Position(match.group(1), match.group(2)))
    if not frontier:
        raise NotFound(f"{cursor!r} is not a stream cursor of table {table!r}")
    return frontier


T = TypeVar("T")

# A record (and the cursor right after it) to what the reader returns for it, or None
# to skip it: a Strato ``Change`` for the Table, the raw record for an event source.
ToChange = Callable[[Mapping[str, Any], str], T | None]


class StreamReader(Generic[T]):
    """Reads changes of one stream after a cursor (see the module doc)."""

    def __init__(self, streams: Any) -> None:
        self._streams = streams

    def _shards(self, stream_arn: str) -> list[dict[str, Any]]:
        shards: list[dict[str, Any]] = []
        start: str | None = None
        while True:
            kwargs: dict[str, Any] = {"StreamArn": stream_arn}
            if start is not None:
                kwargs["ExclusiveStartShardId"] = start
            description = self._streams.describe_stream(**kwargs)["StreamDescription"]
            shards.extend(description.get("Shards", []))
            start = description.get("LastEvaluatedShardId")
            if not start:
                return shards

    def read(
        self,
        stream_arn: str,
        table: str,
        after: str | None,
        limit: int,
        to_change: ToChange[T],
    ) -> list[T]:
        shards = self._shards(stream_arn)
        known = {s["ShardId"]: s for s in shards}

        def children(shard_id: str) -> list[Position]:
            kids = [s for s in shards if s.get("ParentShardId") == shard_id]
            kids.sort(key=_start)
            return [Position(s["ShardId"], "") for s in kids]

        roots = sorted((s for s in shards if s.get("ParentShardId") not in known), key=_start)
        if after is None:
            frontier = [Position(s["ShardId"], "") for s in roots]
        else:
            frontier = []
            for pos in decode_cursor(after, table):
                # A shard past retention is gone: go on with its children, if listed.
                frontier.extend([pos] if pos.shard in known else children(pos.shard))
            if not frontier:  # everything named is gone: all that is left, again
                frontier = [Position(s["ShardId"], "") for s in roots]

        out: list[T] = []
        i = 0
        while i < len(frontier) and len(out) < limit:
            pos = frontier[i]
            exhausted = self._read_shard(stream_arn, pos, frontier, limit, out, to_change)
            if exhausted:
                kids = children(pos.shard)
                if kids:  # a closed shard read to its end continues in its children
                    frontier[i : i + 1] = kids
                    continue
            i += 1
        return out

    def _read_shard(
        self,
        stream_arn: str,
        pos: Position,
        frontier: list[Position],
        limit: int,
        out: list[T],
        to_change: ToChange[T],
    ) -> bool:
        """Append the shard's records after ``pos`` to ``out`` (moving ``pos`` along);
        True when the shard is closed and has been read to its end."""
        iterator = self._iterator(stream_arn, pos)
        empty = 0
        while iterator and len(out) < limit:
            want = min(1000, limit - len(out))
            reply = self._streams.get_records(ShardIterator=iterator, Limit=want)
            records = reply.get("Records", [])
            iterator = reply.get("NextShardIterator")
            for record in records:
                pos.seq = str(record["dynamodb"]["SequenceNumber"])
                change = to_change(record, encode_cursor(frontier))
                if change is not None:
                    out.append(change)
            if not records:
                empty += 1
                if empty >= _MAX_EMPTY_POLLS:
                    return False
            elif len(records) < want:
                return iterator is None  # at the shard's current end
        return iterator is None

    def _iterator(self, stream_arn: str, pos: Position) -> str | None:
        kwargs: dict[str, Any] = {"StreamArn": stream_arn, "ShardId": pos.shard}
        if pos.seq:
            kwargs |= {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": pos.seq}
        else:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        try:
            reply = self._streams.get_shard_iterator(**kwargs)
        except ClientError as exc:
            if error_code(exc) != "TrimmedDataAccessException":
                raise
            # The records after ``seq`` aged out: read what is left of the shard.
            reply = self._streams.get_shard_iterator(
                StreamArn=stream_arn, ShardId=pos.shard, ShardIteratorType="TRIM_HORIZON"
            )
        iterator = reply.get("ShardIterator")
        return None if iterator is None else str(iterator)


def _start(shard: Mapping[str, Any]) -> int:
    return int(shard.get("SequenceNumberRange", {}).get("StartingSequenceNumber", 0))
