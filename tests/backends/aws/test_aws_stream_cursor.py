"""Reading a DynamoDB stream across shard splits, from any checkpoint, against a fake
stream (moto has one shard per table and never splits, so this is where splits are
tested): no record lost, none repeated, whatever the page size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from strato.backends.aws._stream import StreamReader, decode_cursor, encode_cursor
from strato.errors import NotFound
from strato.services.table import Change


class FakeStreams:
    """A stream: shard -> (parent, records, closed). Sequence numbers are global ints."""

    def __init__(self) -> None:
        self.shards: dict[str, dict[str, Any]] = {}
        self.seq = 100
        self.calls = 0

    def add_shard(self, shard: str, parent: str | None = None) -> None:
        self.shards[shard] = {"parent": parent, "records": [], "closed": False, "start": self.seq}

    def write(self, shard: str, key: str) -> None:
        assert not self.shards[shard]["closed"]
        self.seq += 1
        self.shards[shard]["records"].append((self.seq, key))

    # --- the boto3 calls StreamReader makes ---

    def describe_stream(self, StreamArn: str, ExclusiveStartShardId: str | None = None) -> Any:
        ids = sorted(self.shards)
        if ExclusiveStartShardId is not None:
            ids = ids[ids.index(ExclusiveStartShardId) + 1 :]
        page, rest = ids[:2], ids[2:]  # small pages, to exercise paging
        shards = []
        for shard in page:
            entry: dict[str, Any] = {
                "ShardId": shard,
                "SequenceNumberRange": {"StartingSequenceNumber": str(self.shards[shard]["start"])},
            }
            if self.shards[shard]["parent"]:
                entry["ParentShardId"] = self.shards[shard]["parent"]
            shards.append(entry)
        description: dict[str, Any] = {"Shards": shards}
        if rest:
            description["LastEvaluatedShardId"] = page[-1]
        return {"StreamDescription": description}

    def get_shard_iterator(self, StreamArn: str, ShardId: str, ShardIteratorType: str,
                           SequenceNumber: str | None = None) -> Any:  # fmt: skip
        after = int(SequenceNumber) if ShardIteratorType == "AFTER_SEQUENCE_NUMBER" else 0
        return {"ShardIterator": f"{ShardId}|{after}"}

    def get_records(self, ShardIterator: str, Limit: int) -> Any:
        self.calls += 1
        shard, after = ShardIterator.split("|")
        records = [r for r in self.shards[shard]["records"] if r[0] > int(after)][:Limit]
        out = [
            {"eventName": "INSERT", "dynamodb": {"SequenceNumber": str(s), "Keys": k}}
            for s, k in records
        ]
        last = records[-1][0] if records else int(after)
        ended = self.shards[shard]["closed"] and all(
            r[0] <= last for r in self.shards[shard]["records"]
        )
        return {"Records": out, **({} if ended else {"NextShardIterator": f"{shard}|{last}"})}


def to_change(record: Mapping[str, Any], cursor: str) -> Change:
    key = record["dynamodb"]["Keys"]
    return Change(cursor=cursor, table="t", key=key, kind="INSERT", old=None, new={"k": key})


def read_all(reader: StreamReader, after: str | None, limit: int) -> list[Change]:
    out: list[Change] = []
    while page := reader.read("arn", "t", after, limit, to_change):
        out.extend(page)
        after = page[-1].cursor
    return out


@pytest.fixture
def split_stream() -> FakeStreams:
    """A parent shard that closed and split into two children, written to in turns."""
    streams = FakeStreams()
    streams.add_shard("shard-a")
    for n in range(3):
        streams.write("shard-a", f"a{n}")
    streams.shards["shard-a"]["closed"] = True
    streams.add_shard("shard-b", parent="shard-a")
    streams.add_shard("shard-c", parent="shard-a")
    for n in range(4):
        streams.write("shard-b", f"b{n}")
        streams.write("shard-c", f"c{n}")
    return streams


ALL_KEYS = {"a0", "a1", "a2", "b0", "b1", "b2", "b3", "c0", "c1", "c2", "c3"}


@pytest.mark.parametrize("limit", [1, 2, 3, 100])
def test_every_record_once_in_shard_order(split_stream: FakeStreams, limit: int) -> None:
    keys = [c.key for c in read_all(StreamReader(split_stream), None, limit)]
    assert sorted(keys) == sorted(ALL_KEYS)
    assert keys[:3] == ["a0", "a1", "a2"]  # the parent before its children
    for shard in "bc":  # each shard's records in their own order
        assert [k for k in keys if k[0] == shard] == [f"{shard}{n}" for n in range(4)]


@pytest.mark.parametrize("limit", [1, 3])
def test_resuming_from_any_cursor_gives_exactly_the_rest(
    split_stream: FakeStreams, limit: int
) -> None:
    reader = StreamReader(split_stream)
    changes = read_all(reader, None, limit)
    for i, change in enumerate(changes):
        rest = [c.key for c in read_all(reader, change.cursor, limit)]
        assert sorted(rest) == sorted(c.key for c in changes[i + 1 :]), change.cursor


def test_open_shards_are_read_again_for_new_records(split_stream: FakeStreams) -> None:
    reader = StreamReader(split_stream)
    checkpoint = read_all(reader, None, 4)[-1].cursor
    assert reader.read("arn", "t", checkpoint, 10, to_change) == []
    split_stream.write("shard-c", "c4")
    split_stream.write("shard-b", "b4")
    assert sorted(c.key for c in reader.read("arn", "t", checkpoint, 10, to_change)) == [
        "b4",
        "c4",
    ]


def test_a_trimmed_shard_continues_in_its_children(split_stream: FakeStreams) -> None:
    reader = StreamReader(split_stream)
    cursor = encode_cursor(decode_cursor("shard-a@102", "t"))
    del split_stream.shards["shard-a"]  # past the stream's retention
    keys = {c.key for c in read_all(reader, cursor, 5)}
    assert keys == ALL_KEYS - {"a0", "a1", "a2"}


def test_records_that_are_not_changes_are_skipped_but_passed(split_stream: FakeStreams) -> None:
    reader = StreamReader(split_stream)

    def only_b(record: Mapping[str, Any], cursor: str) -> Change | None:
        return to_change(record, cursor) if record["dynamodb"]["Keys"][0] == "b" else None

    page = reader.read("arn", "t", None, 100, only_b)
    assert [c.key for c in page] == ["b0", "b1", "b2", "b3"]
    assert reader.read("arn", "t", page[-1].cursor, 100, only_b) == []


@pytest.mark.parametrize("bad", ["", "nonsense", "shard-a@x1", "shard a@1", "@1"])
def test_a_malformed_cursor_is_not_found(bad: str) -> None:
    with pytest.raises(NotFound, match="cursor"):
        decode_cursor(bad, "t")
