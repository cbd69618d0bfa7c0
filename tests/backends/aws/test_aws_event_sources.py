"""Event source mappings on DynamoDB streams, as the local AWS runs them: the Lambda
API answers as Lambda does, records reach the function in Lambda's format (as Strato
records, through ``lambda_entry``), filters apply, a failed batch comes again; and
the front's usage counters see what is done."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from strato.services import FunctionSpec, Services

HERE = str(Path(__file__).resolve().parent)
INSERTS = {"Filters": [{"Pattern": json.dumps({"eventName": ["INSERT"]})}]}


def delivered_keys(events: list[dict[str, Any]]) -> list[str]:
    return [r["key"] for e in events if not e["failed"] for r in e["event"]["records"]]


def seen(
    aws: Services,
    expect: int,
    timeout: float = 30.0,
    until: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> list[dict[str, Any]]:
    """What the sink recorded, once ``expect`` batches (and ``until``) are there."""
    deadline = time.monotonic() + timeout
    while True:
        keys = aws.blobs.list("seen/")
        events = [json.loads(bytes(aws.blobs.get(k))) for k in keys]
        done = len(events) >= expect and (until is None or until(events))
        if done or time.monotonic() > deadline:
            return events
        time.sleep(0.1)


@pytest.fixture
def sink(aws: Services, boto: Any) -> tuple[str, str]:
    """A table with its stream, and a function that records what it gets."""
    aws.table.create_table("src")
    aws.runtime.register(
        FunctionSpec("sink", "aws_handlers:record_batches", env={"PYTHONPATH": HERE})
    )
    prefix = aws.config["prefix"]
    table = boto.client("dynamodb").describe_table(TableName=f"{prefix}src")["Table"]
    return str(table["LatestStreamArn"]), f"{prefix}sink"


def test_a_stream_batch_reaches_the_function_once_it_succeeds(
    aws: Services, boto: Any, sink: tuple[str, str]
) -> None:
    stream, function = sink
    lam = boto.client("lambda")
    created = lam.create_event_source_mapping(
        EventSourceArn=stream, FunctionName=function, StartingPosition="TRIM_HORIZON",
        BatchSize=10, FilterCriteria=INSERTS, MaximumRetryAttempts=3,
    )  # fmt: skip
    aws.table.put("src", "a", {"n": 1})
    aws.table.put("src", "a", {"n": 2})  # a MODIFY: filtered out
    aws.table.put("src", "fail-once", {"n": 3})
    # Batch boundaries depend on timing: "a" may travel alone or with "fail-once".
    # Either way the failed batch comes again, and then goes through, once.
    events = seen(aws, 2, until=lambda evs: len(delivered_keys(evs)) >= 2)
    delivered = [r for e in events if not e["failed"] for r in e["event"]["records"]]
    assert sorted(r["key"] for r in delivered) == ["a", "fail-once"]
    assert all(r["kind"] == "INSERT" and r["table"] == "src" for r in delivered)
    failed = [[r["key"] for r in e["event"]["records"]] for e in events if e["failed"]]
    assert len(failed) == 1 and "fail-once" in failed[0]
    assert failed[0] in (["fail-once"], ["a", "fail-once"])
    got = lam.get_event_source_mapping(UUID=created["UUID"])
    assert got["State"] == "Enabled" and got["FunctionArn"].endswith(f":function:{function}")
    assert got["FilterCriteria"] == INSERTS and got["MaximumRetryAttempts"] == 3
    listed = lam.list_event_source_mappings(FunctionName=function)["EventSourceMappings"]
    assert [m["UUID"] for m in listed] == [created["UUID"]]
    with pytest.raises(lam.exceptions.ResourceConflictException):
        lam.create_event_source_mapping(
            EventSourceArn=stream, FunctionName=function, StartingPosition="LATEST"
        )
    lam.delete_event_source_mapping(UUID=created["UUID"])
    assert lam.list_event_source_mappings(FunctionName=function)["EventSourceMappings"] == []
    aws.table.put("src", "after", {"n": 4})
    time.sleep(1.0)
    assert len(aws.blobs.list("seen/")) == len(events)  # a deleted mapping delivers nothing


def test_latest_starts_after_what_is_already_in_the_stream(
    aws: Services, boto: Any, sink: tuple[str, str]
) -> None:
    stream, function = sink
    aws.table.put("src", "before", {"n": 0})
    lam = boto.client("lambda")
    mapping = lam.create_event_source_mapping(
        EventSourceArn=stream, FunctionName=function, StartingPosition="LATEST"
    )
    assert mapping["State"] == "Creating"
    deadline = time.monotonic() + 30  # Enabled once it has found the stream's end
    while lam.get_event_source_mapping(UUID=mapping["UUID"])["State"] != "Enabled":
        assert time.monotonic() < deadline, "the mapping was not enabled in time"
        time.sleep(0.05)
    aws.table.put("src", "after", {"n": 1})
    events = seen(aws, 1)
    assert [r["key"] for e in events for r in e["event"]["records"]] == ["after"]
    lam.delete_event_source_mapping(UUID=mapping["UUID"])


def test_bad_mappings_are_refused(aws: Services, boto: Any, sink: tuple[str, str]) -> None:
    stream, function = sink
    lam = boto.client("lambda")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.create_event_source_mapping(
            EventSourceArn=stream, FunctionName="no-such-fn", StartingPosition="LATEST"
        )
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.create_event_source_mapping(
            EventSourceArn=stream, FunctionName=function, StartingPosition="AT_TIMESTAMP"
        )
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.create_event_source_mapping(
            EventSourceArn=stream, FunctionName=function, StartingPosition="LATEST",
            FilterCriteria={"Filters": [{"Pattern": json.dumps({"eventName": "INSERT"})}]},
        )  # fmt: skip


def test_the_front_counts_requests_and_lambda_time(aws: Services, local_aws: Any) -> None:
    from strato.backends.aws.usage import counters, fetch_front_usage, subtract

    aws.runtime.register(
        FunctionSpec("d", "aws_handlers:describe", env={"PYTHONPATH": HERE}, memory_mb=512)
    )
    before = fetch_front_usage(local_aws.endpoint_url)
    assert before is not None
    aws.blobs.put("x/1", b"abc")
    aws.blobs.get("x/1")
    aws.table.create_table("t")
    aws.table.put("t", "k", {"v": "x" * 3000})  # 3+ KB: several write units
    aws.runtime.invoke("d", {})
    after = fetch_front_usage(local_aws.endpoint_url)
    assert after is not None
    q = counters(subtract(after, before), aws.config["prefix"])
    assert q["s3_put_requests"] >= 1 and q["s3_get_requests"] >= 1
    assert q["dynamodb_write_units"] >= 3
    assert q["lambda_requests"] == 1 and q["lambda_gb_s"] > 0
    assert fetch_front_usage("http://127.0.0.1:9") is None  # an endpoint that keeps none
