"""Table on DynamoDB + DynamoDB Streams: one DynamoDB table per logical table.

Why one physical table per logical table (and not one shared table keyed by
(table, key)): each logical table then has its own stream, so ``read_stream(t)``
reads only ``t``'s changes, a consumer's cursor is a plain position in that stream,
and a deployment grants (and a stream trigger fires) per table. ``create_table`` is
a real CreateTable, with the stream on (NEW_AND_OLD_IMAGES; off for ``stream=False``)
and on-demand billing.

Item layout: partition key ``pk`` (the same value, ``"items"``, for every item), sort
key ``key`` (the Strato key), ``value`` (the item as a JSON string, so every JSON
value round-trips exactly: no float→Decimal, no empty-string rules) and ``version``
(a number). One partition key is what makes ``query(prefix)`` a DynamoDB Query with
``begins_with`` on the sort key, in key order, and it keeps a table's changes in one
shard lineage, so its stream is in commit order. The price: one partition's
throughput per logical table (about 1,000 writes/s), far above what FL metadata needs.

A put is one UpdateItem: ``SET value = :v, version = if_not_exists(version, 0) + 1``,
with ``attribute_not_exists(value)`` (if_absent) or ``version = :v`` (if_version) as
its ConditionExpression; a failed condition is ``ConditionFailed``. Versions restart
at 1 after a delete, as in the embedded table.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any, NoReturn

from strato.backends.aws._boto import ClientError, Clients, error_code, error_message
from strato.backends.aws._names import physical
from strato.backends.aws._stream import StreamReader
from strato.backends.aws._stream_event import change_from_record
from strato.errors import ConditionFailed, ConfigError, NotFound, PayloadTooLarge
from strato.services.table import Change, Item

__all__ = ["PARTITION", "DynamoTable"]

PARTITION = "items"
_CREATE_TIMEOUT_S = 300.0


def _json(table: str, key: str, value: Mapping[str, Any]) -> str:
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


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"an item key must be a non-empty string, got {key!r}")
    if len(key.encode("utf-8")) > 1024:
        raise ValueError(f"item key {key[:40]!r}… is over DynamoDB's 1024-byte sort key limit")


def _item(raw: Mapping[str, Any] | None) -> Item | None:
    """The Strato item of a DynamoDB item; None for an item without a value, which no
    Strato write leaves (moto does: an UpdateItem refused as too large leaves the key)."""
    if raw is None or "value" not in raw:
        return None
    return Item(
        key=str(raw["key"]["S"]),
        value=json.loads(raw["value"]["S"]),
        version=int(raw["version"]["N"]),
    )


class DynamoTable:
    """``Table`` on DynamoDB (see the module doc)."""

    def __init__(self, clients: Clients) -> None:
        self._prefix = clients.config.prefix
        self._ddb = clients.client("dynamodb")
        self._reader: StreamReader[Change] = StreamReader(clients.client("dynamodbstreams"))
        self._stream_arns: dict[str, str] = {}
        self._lock = threading.Lock()

    def _name(self, table: str) -> str:
        return physical("table", self._prefix, table)

    def _missing(self, table: str) -> NotFound:
        return NotFound(f"no table named {table!r} (create it with create_table first)")

    def _key(self, key: str) -> dict[str, Any]:
        return {"pk": {"S": PARTITION}, "key": {"S": key}}

    # --- tables -----------------------------------------------------------------------

    def create_table(self, table: str, *, stream: bool = True) -> None:
        if not isinstance(table, str) or not table:
            raise ValueError(f"a table name must be a non-empty string, got {table!r}")
        name = self._name(table)
        try:
            self._ddb.create_table(
                TableName=name,
                AttributeDefinitions=[
                    {"AttributeName": "pk", "AttributeType": "S"},
                    {"AttributeName": "key", "AttributeType": "S"},
                ],
                KeySchema=[
                    {"AttributeName": "pk", "KeyType": "HASH"},
                    {"AttributeName": "key", "KeyType": "RANGE"},
                ],
                BillingMode="PAY_PER_REQUEST",
                **({"StreamSpecification": {"StreamEnabled": True,
                                            "StreamViewType": "NEW_AND_OLD_IMAGES"}}
                   if stream else {}),
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceInUseException":
                raise
        deadline = time.monotonic() + _CREATE_TIMEOUT_S
        while True:
            description = self._ddb.describe_table(TableName=name)["Table"]
            if description.get("TableStatus") == "ACTIVE":
                break
            if time.monotonic() > deadline:
                raise ConfigError(f"DynamoDB table {name!r} did not become ACTIVE in time")
            time.sleep(1.0)
        spec = description.get("StreamSpecification") or {}
        if not spec.get("StreamEnabled"):
            return  # made without one (the first create_table decides): read_stream says so
        if spec.get("StreamViewType") != "NEW_AND_OLD_IMAGES":
            raise ConfigError(f"DynamoDB table {name!r} exists without a NEW_AND_OLD_IMAGES stream")
        with self._lock:
            self._stream_arns[table] = str(description["LatestStreamArn"])

    # --- items ------------------------------------------------------------------------

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
        doc = _json(table, key, value)
        names = {"#v": "value", "#n": "version"}
        values: dict[str, Any] = {":v": {"S": doc}, ":zero": {"N": "0"}, ":one": {"N": "1"}}
        extra: dict[str, Any] = {}
        if if_absent:  # every Strato item has a value: an item without one is absent
            extra["ConditionExpression"] = "attribute_not_exists(#v)"
        elif if_version is not None:
            values[":expected"] = {"N": str(int(if_version))}
            extra["ConditionExpression"] = "#n = :expected"
        if extra:
            extra["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        try:
            reply = self._ddb.update_item(
                TableName=self._name(table),
                Key=self._key(key),
                UpdateExpression="SET #v = :v, #n = if_not_exists(#n, :zero) + :one",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="UPDATED_NEW",
                **extra,
            )
        except ClientError as exc:
            self._raise(exc, table, key, "put", if_absent=if_absent, if_version=if_version)
        return int(reply["Attributes"]["version"]["N"])

    def get(self, table: str, key: str, *, consistent: bool = True) -> Item | None:
        try:
            reply = self._ddb.get_item(
                TableName=self._name(table), Key=self._key(key), ConsistentRead=consistent
            )
        except ClientError as exc:
            self._raise(exc, table, key, "get")
        return _item(reply.get("Item"))

    def query(self, table: str, prefix: str = "") -> list[Item]:
        condition = "#p = :p"
        names = {"#p": "pk"}
        values: dict[str, Any] = {":p": {"S": PARTITION}}
        if prefix:
            condition += " AND begins_with(#k, :prefix)"
            names["#k"] = "key"
            values[":prefix"] = {"S": prefix}
        items: list[Item] = []
        start: dict[str, Any] | None = None
        while True:
            kwargs: dict[str, Any] = {}
            if start is not None:
                kwargs["ExclusiveStartKey"] = start
            try:
                reply = self._ddb.query(
                    TableName=self._name(table),
                    KeyConditionExpression=condition,
                    ExpressionAttributeNames=names,
                    ExpressionAttributeValues=values,
                    ConsistentRead=True,
                    **kwargs,
                )
            except ClientError as exc:
                self._raise(exc, table, prefix, "query")
            items.extend(item for raw in reply.get("Items", []) if (item := _item(raw)))
            start = reply.get("LastEvaluatedKey")
            if not start:
                return items

    def delete(self, table: str, key: str, *, if_version: int | None = None) -> None:
        extra: dict[str, Any] = {}
        if if_version is not None:
            extra = {
                "ConditionExpression": "#n = :expected",
                "ExpressionAttributeNames": {"#n": "version"},
                "ExpressionAttributeValues": {":expected": {"N": str(int(if_version))}},
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        try:
            self._ddb.delete_item(TableName=self._name(table), Key=self._key(key), **extra)
        except ClientError as exc:
            self._raise(exc, table, key, "delete", if_version=if_version)

    # --- stream -----------------------------------------------------------------------

    def _stream_arn(self, table: str) -> str:
        with self._lock:
            arn = self._stream_arns.get(table)
        if arn is not None:
            return arn
        try:
            description = self._ddb.describe_table(TableName=self._name(table))["Table"]
        except ClientError as exc:
            self._raise(exc, table, "", "read_stream")
        if not description.get("LatestStreamArn"):
            raise ConfigError(
                f"table {table!r} has no stream (made without one, or not by create_table)"
            )
        arn = str(description["LatestStreamArn"])
        with self._lock:
            self._stream_arns[table] = arn
        return arn

    def trim_stream(self, table: str, upto: str) -> None:
        """DynamoDB Streams drop their records after 24 hours by themselves."""

    def read_stream(self, table: str, after: str | None = None, limit: int = 100) -> list[Change]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")

        def to_change(record: Mapping[str, Any], cursor: str) -> Change | None:
            return change_from_record(record, table, cursor)

        try:
            return self._reader.read(self._stream_arn(table), table, after, limit, to_change)
        except ClientError as exc:
            self._raise(exc, table, "", "read_stream")

    def close(self) -> None:
        """Nothing to release: the boto3 clients are shared by every part of the bundle."""

    # --- errors -----------------------------------------------------------------------

    def _raise(
        self,
        exc: BaseException,
        table: str,
        key: str,
        op: str,
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> NoReturn:
        """Turn a DynamoDB error into the Strato error it means (always raises)."""
        code, message = error_code(exc), error_message(exc)
        if code == "ResourceNotFoundException":
            with self._lock:
                self._stream_arns.pop(table, None)
            raise self._missing(table) from None
        if code == "ConditionalCheckFailedException":
            old = getattr(exc, "response", {}).get("Item")
            version = None if not old else old["version"]["N"]
            if if_absent:
                now = "already exists" + ("" if version is None else f" (version {version})")
                raise ConditionFailed(
                    f"{op} if_absent: item {key!r} of table {table!r} {now}"
                ) from None
            # Without the old item (older endpoints do not send it) all we know is "not v".
            now = (
                "does not exist or is at another version"
                if version is None
                else (f"is at version {version}")
            )
            raise ConditionFailed(
                f"{op} if_version={if_version}: item {key!r} of table {table!r} {now}"
            ) from None
        if code == "ValidationException" and "size" in message.lower():
            raise PayloadTooLarge(
                f"item {key!r} of table {table!r} is over DynamoDB's 400 KB item limit"
            ) from None
        raise exc
