"""DynamoDB stream records in Lambda's event format become Strato changes; event filter
patterns; what the local front counts. No AWS endpoint needed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from strato.backends.aws._stream_event import is_stream_event, strato_event, table_of_stream

ARN = "arn:aws:dynamodb:eu-west-1:123456789012:table/run7-updates/stream/2025-01-01T00:00:00.000"


def record(kind: str, key: str, new: Any = None, old: Any = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "Keys": {"pk": {"S": "items"}, "key": {"S": key}},
        "SequenceNumber": "1100000000001",
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    item = {"pk": {"S": "items"}, "key": {"S": key}}
    if new is not None:
        data["NewImage"] = {**item, "value": {"S": json.dumps(new)}}
    if old is not None:
        data["OldImage"] = {**item, "value": {"S": json.dumps(old)}}
    return {"eventName": kind, "eventSource": "aws:dynamodb", "eventSourceARN": ARN,
            "dynamodb": data, **extra}  # fmt: skip


def test_a_batch_from_the_event_source_mapping_becomes_strato_records() -> None:
    event = {
        "Records": [
            record("INSERT", "00001/a/x", new={"round": 1}),
            record("MODIFY", "00001/a/x", new={"round": 2}, old={"round": 1}),
            record("REMOVE", "00002/b/y", old={"round": 2}),
        ]
    }
    assert is_stream_event(event)
    out = strato_event(event, "run7-")
    assert [(r["table"], r["key"], r["kind"]) for r in out["records"]] == [
        ("updates", "00001/a/x", "INSERT"),
        ("updates", "00001/a/x", "MODIFY"),
        ("updates", "00002/b/y", "REMOVE"),
    ]
    assert out["records"][1]["new"] == {"round": 2} and out["records"][1]["old"] == {"round": 1}
    assert out["records"][2]["new"] is None


def test_records_that_are_not_strato_writes_are_dropped() -> None:
    keys_only = record("INSERT", "k")
    keys_only["dynamodb"]["NewImage"] = {"pk": {"S": "items"}, "key": {"S": "k"}}
    assert strato_event({"Records": [keys_only]}, "run7-") == {"records": []}


@pytest.mark.parametrize(
    "event",
    [{"records": []}, {"Records": []}, {"Records": [{"eventSource": "aws:sqs"}]}, [1], "x"],
)
def test_other_events_are_left_alone(event: Any) -> None:
    assert not is_stream_event(event)


def test_a_table_name_without_the_prefix_stays_whole() -> None:
    assert table_of_stream(ARN, "other-") == "run7-updates"
    assert table_of_stream(ARN, "run7-") == "updates"


def test_the_lambda_entry_hands_the_function_strato_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from strato.backends.aws import lambda_entry

    seen: list[Any] = []
    monkeypatch.setattr(lambda_entry, "_handlers", {"h:f": lambda e, c: seen.append(e)})
    monkeypatch.setenv("STRATO_HANDLER", "h:f")
    monkeypatch.setenv("STRATO_SERVICES", json.dumps({"backend": "aws", "prefix": "run7-"}))
    lambda_entry.handler({"Records": [record("INSERT", "k", new={"a": 1})]}, object())
    lambda_entry.handler({"records": [], "warm_round": 3}, object())
    assert seen[0]["records"][0]["table"] == "updates" and seen[0]["records"][0]["new"] == {"a": 1}
    assert seen[1] == {"records": [], "warm_round": 3}  # a Strato event passes unchanged


def test_filter_patterns_match_like_lambda() -> None:
    pytest.importorskip("boto3")
    from strato.backends.aws.emulator._local_esm import matches_pattern

    insert = record("INSERT", "k", new={"a": 1})
    assert matches_pattern({"eventName": ["INSERT"]}, insert)
    assert not matches_pattern({"eventName": ["MODIFY", "REMOVE"]}, insert)
    assert matches_pattern({"dynamodb": {"Keys": {"key": {"S": ["k", "z"]}}}}, insert)
    assert not matches_pattern({"dynamodb": {"OldImage": [{"exists": True}]}}, insert)
    assert matches_pattern({"dynamodb": {"OldImage": [{"exists": False}]}}, insert)
    with pytest.raises(ValueError):
        matches_pattern({"eventName": "INSERT"}, insert)


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "expected"),
    [
        ("POST", "/", {"X-Amz-Target": "DynamoDB_20120810.UpdateItem"}, b"{}",
         ("dynamodb", "UpdateItem")),
        ("POST", "/", {"X-Amz-Target": "DynamoDBStreams_20120810.GetRecords"}, b"{}",
         ("dynamodbstreams", "GetRecords")),
        ("POST", "/", {"X-Amz-Target": "AmazonSQS.ReceiveMessage"}, b"{}",
         ("sqs", "ReceiveMessage")),
        ("POST", "/", {}, b"Action=Publish&TopicArn=x", ("sns", "Publish")),
        ("PUT", "/b/models/round-1", {}, b"", ("s3", "PutObject")),
        ("PUT", "/b/big?partNumber=2&uploadId=u", {}, b"", ("s3", "UploadPart")),
        ("POST", "/b/big?uploads", {}, b"", ("s3", "CreateMultipartUpload")),
        ("GET", "/b/models/round-1", {}, b"", ("s3", "GetObject")),
        ("GET", "/b?list-type=2&prefix=x", {}, b"", ("s3", "ListObjects")),
        ("HEAD", "/b", {}, b"", ("s3", "HeadBucket")),
        ("POST", "/2015-03-31/functions/f/invocations", {}, b"{}", ("lambda", "Invoke")),
    ],
)  # fmt: skip
def test_the_front_names_each_request_it_counts(
    method: str, path: str, headers: dict[str, str], body: bytes, expected: tuple[str, str]
) -> None:
    pytest.importorskip("boto3")
    from strato.backends.aws.emulator._usage import classify

    service = expected[0] if expected[0] != "dynamodbstreams" else "dynamodb"
    auth = f"AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/{service}/aws4_request, x"
    assert classify(method, path, {**headers, "Authorization": auth}, body) == expected
