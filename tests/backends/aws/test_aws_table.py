"""The Table on DynamoDB + Streams: the physical layout the module doc promises."""

from __future__ import annotations

import json
from typing import Any

import pytest

from strato.errors import ConditionFailed, PayloadTooLarge
from strato.services import Services


def test_one_dynamodb_table_with_a_stream_per_table(aws: Services, boto: Any) -> None:
    aws.table.create_table("updates")
    description = boto.client("dynamodb").describe_table(
        TableName=f"{aws.config['prefix']}updates"
    )["Table"]
    assert [(k["AttributeName"], k["KeyType"]) for k in description["KeySchema"]] == [
        ("pk", "HASH"),
        ("key", "RANGE"),
    ]
    assert description["StreamSpecification"] == {
        "StreamEnabled": True,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    aws.table.put("updates", "r1/c1", {"loss": 0.25, "keys": ["a", ""]})
    raw = boto.client("dynamodb").get_item(
        TableName=f"{aws.config['prefix']}updates",
        Key={"pk": {"S": "items"}, "key": {"S": "r1/c1"}},
    )["Item"]
    assert json.loads(raw["value"]["S"]) == {"loss": 0.25, "keys": ["a", ""]}
    assert raw["version"] == {"N": "1"}


def test_a_cursor_names_the_shard_and_the_sequence_number(aws: Services) -> None:
    aws.table.create_table("s")
    aws.table.put("s", "a", {"n": 1})
    aws.table.put("s", "b", {"n": 2})
    first, second = aws.table.read_stream("s")
    shard, seq = first.cursor.split("@")
    assert shard.startswith("shardId-") and seq.isdigit()
    assert second.cursor.split("@")[0] == shard and int(second.cursor.split("@")[1]) > int(seq)
    assert aws.table.read_stream("s", after=first.cursor) == [second]


def test_an_item_over_the_item_size_limit_is_payload_too_large(aws: Services) -> None:
    aws.table.create_table("big")
    with pytest.raises(PayloadTooLarge, match="400 KB"):
        aws.table.put("big", "k", {"blob": "x" * 500_000})
    assert aws.table.get("big", "k") is None


def test_condition_failures_say_what_the_item_is(aws: Services) -> None:
    aws.table.create_table("c")
    aws.table.put("c", "k", {"n": 1})
    aws.table.put("c", "k", {"n": 2})
    with pytest.raises(ConditionFailed, match="is at version 2"):
        aws.table.put("c", "k", {"n": 3}, if_version=1)
    with pytest.raises(ConditionFailed, match=r"already exists \(version 2\)"):
        aws.table.put("c", "k", {"n": 3}, if_absent=True)
    with pytest.raises(ConditionFailed, match="is at version 2"):
        aws.table.delete("c", "k", if_version=5)
    with pytest.raises(ValueError, match="1024"):
        aws.table.put("c", "k" * 1100, {})
