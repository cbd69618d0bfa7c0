"""DynamoDB stream records as Strato changes: for the Table and for Lambda's event source mapping.

The same record reaches Strato two ways: ``Table.read_stream`` reads it with
GetRecords, and Lambda's event source mapping delivers it to a function as
``{"Records": [{"eventSource": "aws:dynamodb", "eventName": ..., "dynamodb": {...},
"eventSourceARN": ...}, ...]}``. A Strato function triggered by a table (the FL
aggregator) takes ``{"records": [Change as a dict, ...]}``, the shape the embedded
``StreamTrigger`` sends, so ``lambda_entry`` turns the first into the second here
and the function cannot tell which backend woke it.

Kept free of boto3: ``lambda_entry`` imports it on every cold start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal, cast

from strato.services.table import Change

__all__ = ["change_from_record", "is_stream_event", "strato_event", "table_of_stream"]

_SOURCE = "aws:dynamodb"


def change_from_record(record: Mapping[str, Any], table: str, cursor: str) -> Change | None:
    """The Strato ``Change`` a DynamoDB stream record stands for, or None for a record
    that is not a Strato write."""
    data = record["dynamodb"]
    old, new = data.get("OldImage"), data.get("NewImage")
    if (old is not None and "value" not in old) or (new is not None and "value" not in new):
        # Not a Strato write: moto records a key-only INSERT ahead of the INSERT of an
        # UpdateItem that creates an item (DynamoDB records one).
        return None
    return Change(
        cursor=cursor,
        table=table,
        key=str(data["Keys"]["key"]["S"]),
        kind=cast(Literal["INSERT", "MODIFY", "REMOVE"], record["eventName"]),
        old=None if old is None else json.loads(old["value"]["S"]),
        new=None if new is None else json.loads(new["value"]["S"]),
    )


def table_of_stream(stream_arn: str, prefix: str) -> str:
    """The logical table of a stream ARN (``…:table/<prefix><name>/stream/<label>``).

    Tables made by Strato have legal names, so dropping the prefix gives the name back;
    a table whose name had to be hashed (see ``_names``) keeps its physical name."""
    _, _, rest = stream_arn.partition(":table/")
    physical = rest.split("/stream/", 1)[0]
    return physical[len(prefix) :] if prefix and physical.startswith(prefix) else physical


def is_stream_event(event: Any) -> bool:
    if not isinstance(event, Mapping):
        return False
    records = event.get("Records")
    return (
        isinstance(records, list)
        and bool(records)
        and all(isinstance(r, Mapping) and r.get("eventSource") == _SOURCE for r in records)
    )


def strato_event(event: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{"records": [...]}`` for an event source mapping's batch. A record's cursor
    names its sequence number only: it marks the record, it does not resume a read."""
    records: list[dict[str, Any]] = []
    for record in event["Records"]:
        table = table_of_stream(str(record.get("eventSourceARN", "")), prefix)
        cursor = f"esm@{record['dynamodb'].get('SequenceNumber', '')}"
        change = change_from_record(record, table, cursor)
        if change is not None:
            records.append(asdict(change))
    return {"records": records}
