"""Lambda event source mappings from DynamoDB streams, run by the local front.

moto stores event source mappings but, for a DynamoDB stream, runs them only through
Docker, inside the write that made the record (and then drops the stream's records).
The front keeps these mappings itself and runs each as Lambda does: a poller reads the
stream after its checkpoint, keeps the records the mapping's ``FilterCriteria``
match, and invokes the function (locally, as every Invoke here) with up to
``BatchSize`` records in Lambda's event format; the checkpoint moves on only once the
function returned, so a failed batch is delivered again (at-least-once), up to
``MaximumRetryAttempts`` (-1: until it succeeds) and then skipped. A throttled call
waits for capacity. The API (create, get, list, update, delete) answers in Lambda's
wire format; mappings of other sources pass through to moto.

Not emulated: ParallelizationFactor (one batch per stream at a time), batching
windows, bisection on error, on-failure destinations, tumbling windows, partial batch
responses. A mapping whose stream or function disappears stops (State ``Disabled``).
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from strato.backends.aws._boto import AwsConfig, ClientError, Clients, error_code
from strato.backends.aws._stream import StreamReader
from strato.backends.aws.emulator._local_lambda import LocalLambda, Reply

__all__ = ["LocalEventSources", "matches_pattern"]

POLL_S = 0.2  # Lambda polls a DynamoDB stream shard four times a second
_RETRY_PAUSE_S = (0.5, 1.0, 2.0, 4.0)


def _json_reply(status: int, body: Mapping[str, Any]) -> Reply:
    return Reply(status, {"Content-Type": "application/json"}, json.dumps(body).encode())


def _error(status: int, kind: str, message: str) -> Reply:
    return Reply(
        status,
        {"Content-Type": "application/json", "x-amzn-ErrorType": kind},
        json.dumps({"Type": "User", "Message": message, "message": message}).encode(),
    )


def matches_pattern(pattern: Mapping[str, Any], value: Any) -> bool:
    """An event filter pattern (the subset Strato uses: nested objects whose leaves are
    lists of allowed values, and ``{"exists": bool}``) against a record."""
    if not isinstance(value, Mapping):
        return False
    for key, want in pattern.items():
        present = key in value
        got = value.get(key)
        if isinstance(want, Mapping):
            if not matches_pattern(want, got):
                return False
        elif isinstance(want, list):
            if any(isinstance(w, Mapping) and "exists" in w for w in want):
                if not any(bool(w.get("exists")) == present for w in want):
                    return False
            elif not present or not (
                set(map(json.dumps, got)) & set(map(json.dumps, want))
                if isinstance(got, list)
                else json.dumps(got) in map(json.dumps, want)
            ):
                return False
        else:
            raise ValueError(f"filter pattern values must be lists or objects, got {want!r}")
    return True


def _patterns(criteria: Any) -> list[dict[str, Any]]:
    if not criteria:
        return []
    out = []
    for item in criteria.get("Filters", []):
        pattern = json.loads(item["Pattern"])
        if not isinstance(pattern, dict):
            raise ValueError("a filter pattern must be a JSON object")
        matches_pattern(pattern, {})  # refuses operators it does not know, now
        out.append(pattern)
    return out


def _lambda_record(record: Mapping[str, Any], stream_arn: str) -> dict[str, Any]:
    """A GetRecords record (as boto3 parsed it) in the shape Lambda delivers."""

    def plain(value: Any) -> Any:
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, bytes | bytearray):
            return base64.b64encode(value).decode("ascii")
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | set | tuple):
            return [plain(v) for v in value]
        return value

    return {
        "eventID": record.get("eventID"),
        "eventName": record.get("eventName"),
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": record.get("awsRegion"),
        "dynamodb": plain(record.get("dynamodb", {})),
        "eventSourceARN": stream_arn,
    }


@dataclass
class _Mapping:
    config: dict[str, Any]
    patterns: list[dict[str, Any]]
    cursor: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    batches: int = 0


class LocalEventSources:
    """The event source mappings of DynamoDB streams (see the module doc)."""

    def __init__(self, emulator_url: str, lambdas: LocalLambda) -> None:
        self._emulator_url = emulator_url
        self._lambdas = lambdas
        self._mappings: dict[str, _Mapping] = {}
        self._clients: dict[str, Clients] = {}
        self._lock = threading.Lock()

    def _boto(self, region: str, service: str) -> Any:
        with self._lock:
            if region not in self._clients:
                config = {"endpoint_url": self._emulator_url, "region": region, "prefix": ""}
                self._clients[region] = Clients(AwsConfig.from_services(config))
            clients = self._clients[region]
        return clients.client(service, max_attempts=2)

    # --- the API ---------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, body: bytes, region: str) -> Reply | None:
        """The reply to an event source mapping call, or None to pass it to moto."""
        uuid_part = path.rstrip("/").rpartition("/event-source-mappings")[2].lstrip("/")
        if not uuid_part:
            if method == "POST":
                return self._create(json.loads(body or b"{}"), region)
            return None if method != "GET" else self._list(query)
        with self._lock:
            mapping = self._mappings.get(uuid_part)
        if mapping is None:
            return None  # moto's own, or unknown: moto answers
        if method == "GET":
            return _json_reply(200, mapping.config)
        if method == "DELETE":
            mapping.stop.set()
            with self._lock:
                self._mappings.pop(uuid_part, None)
            return _json_reply(202, {**mapping.config, "State": "Deleting"})
        if method == "PUT":
            return self._update(mapping, json.loads(body or b"{}"))
        return _error(405, "InvalidRequestContentException", f"{method} is not supported here")

    def _create(self, request: dict[str, Any], region: str) -> Reply | None:
        source = str(request.get("EventSourceArn", ""))
        if ":dynamodb:" not in source or "/stream/" not in source:
            return None
        region = source.split(":")[3] or region
        try:
            function = self._lambdas.function_config(region, str(request.get("FunctionName", "")))
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return _error(404, "ResourceNotFoundException", "Function does not exist")
            raise
        try:
            self._boto(region, "dynamodbstreams").describe_stream(StreamArn=source)
        except ClientError:
            return _error(400, "InvalidParameterValueException", f"Stream not found: {source}")
        position = request.get("StartingPosition")
        if position not in ("TRIM_HORIZON", "LATEST"):
            return _error(
                400,
                "InvalidParameterValueException",
                "StartingPosition must be TRIM_HORIZON or LATEST for a DynamoDB stream",
            )
        batch = int(request.get("BatchSize") or 100)
        if not 1 <= batch <= 10000:
            return _error(400, "InvalidParameterValueException", "BatchSize must be 1-10000")
        try:
            patterns = _patterns(request.get("FilterCriteria"))
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, "InvalidParameterValueException", f"bad FilterCriteria: {exc}")
        arn = str(function["FunctionArn"])
        with self._lock:
            for other in self._mappings.values():
                if other.config["FunctionArn"] == arn and other.config["EventSourceArn"] == source:
                    return _error(
                        409,
                        "ResourceConflictException",
                        f"The event source arn ({source}) and function ({arn}) provided mapping "
                        f"already exists. Please update or delete the existing mapping with UUID "
                        f"{other.config['UUID']}",
                    )
            mapping_id = str(uuid.uuid4())
            account = arn.split(":")[4]
            config: dict[str, Any] = {
                "UUID": mapping_id,
                "StartingPosition": position,
                "BatchSize": batch,
                "MaximumBatchingWindowInSeconds": int(
                    request.get("MaximumBatchingWindowInSeconds") or 0
                ),
                "ParallelizationFactor": int(request.get("ParallelizationFactor") or 1),
                "EventSourceArn": source,
                "FunctionArn": arn,
                "LastModified": time.time(),
                "LastProcessingResult": "No records processed",
                # Creating until its poller has found where to start (LATEST: the
                # stream's end), as in Lambda: a record written before it is Enabled
                # may come before a LATEST mapping's start
                "State": "Creating" if request.get("Enabled", True) else "Disabled",
                "StateTransitionReason": "User action",
                "DestinationConfig": {"OnFailure": {}},
                "MaximumRecordAgeInSeconds": int(request.get("MaximumRecordAgeInSeconds") or -1),
                "BisectBatchOnFunctionError": bool(request.get("BisectBatchOnFunctionError")),
                "MaximumRetryAttempts": int(request.get("MaximumRetryAttempts", -1)),
                "TumblingWindowInSeconds": 0,
                "FunctionResponseTypes": list(request.get("FunctionResponseTypes") or []),
                "EventSourceMappingArn": (
                    f"arn:aws:lambda:{region}:{account}:event-source-mapping:{mapping_id}"
                ),
            }
            if request.get("FilterCriteria"):
                config["FilterCriteria"] = request["FilterCriteria"]
            mapping = _Mapping(config, patterns)
            self._mappings[mapping_id] = mapping
        threading.Thread(
            target=self._poll, args=(mapping, region), name=f"esm {mapping_id}", daemon=True
        ).start()
        return _json_reply(202, {**config, "State": "Creating"})

    def _update(self, mapping: _Mapping, request: dict[str, Any]) -> Reply:
        config = mapping.config
        if "FilterCriteria" in request:
            try:
                mapping.patterns = _patterns(request["FilterCriteria"])
            except (ValueError, KeyError, TypeError) as exc:
                return _error(400, "InvalidParameterValueException", f"bad FilterCriteria: {exc}")
            config["FilterCriteria"] = request["FilterCriteria"]
        for key in ("BatchSize", "MaximumRetryAttempts", "MaximumBatchingWindowInSeconds"):
            if key in request:
                config[key] = int(request[key])
        if "Enabled" in request:
            config["State"] = "Enabled" if request["Enabled"] else "Disabled"
        config["LastModified"] = time.time()
        return _json_reply(202, {**config, "State": "Updating"})

    def _list(self, query: str) -> Reply | None:
        params = urllib.parse.parse_qs(query)
        source = params.get("EventSourceArn", [""])[0]
        function = params.get("FunctionName", [""])[0]
        if source and ":dynamodb:" not in source:
            return None
        with self._lock:
            mappings = [m.config for m in self._mappings.values()]
        found = [
            m
            for m in mappings
            if (not source or m["EventSourceArn"] == source)
            and (
                not function
                or m["FunctionArn"] == function
                or m["FunctionArn"].endswith(f":function:{function}")
            )
        ]
        return _json_reply(200, {"EventSourceMappings": found})

    # --- the poller ------------------------------------------------------------------------

    def _poll(self, mapping: _Mapping, region: str) -> None:
        config = mapping.config
        source = str(config["EventSourceArn"])
        reader: StreamReader[tuple[dict[str, Any], str]] = StreamReader(
            self._boto(region, "dynamodbstreams")
        )
        if config["StartingPosition"] == "LATEST":
            mapping.cursor = self._end_of(reader, source)
        with self._lock:
            if config["State"] == "Creating":
                config["State"] = "Enabled"
        while not mapping.stop.is_set():
            if config["State"] != "Enabled":
                mapping.stop.wait(POLL_S)
                continue
            try:
                batch = reader.read(
                    source, source, mapping.cursor, int(config["BatchSize"]),
                    lambda record, cursor: (dict(record), cursor),
                )  # fmt: skip
            except ClientError as exc:
                if error_code(exc) in ("ResourceNotFoundException", "TrimmedDataAccessException"):
                    self._disable(mapping, f"stream unreadable: {error_code(exc)}")
                    return
                mapping.stop.wait(1.0)
                continue
            if not batch:
                mapping.stop.wait(POLL_S)
                continue
            records = [
                event
                for event in (_lambda_record(record, source) for record, _ in batch)
                if not mapping.patterns or any(matches_pattern(p, event) for p in mapping.patterns)
            ]
            if records and not self._deliver(mapping, region, records):
                return
            mapping.cursor = batch[-1][1]

    def _end_of(self, reader: StreamReader[tuple[dict[str, Any], str]], source: str) -> str | None:
        cursor = None
        while True:
            batch = reader.read(source, source, cursor, 1000, lambda r, c: (dict(r), c))
            if not batch:
                return cursor
            cursor = batch[-1][1]

    def _deliver(self, mapping: _Mapping, region: str, records: list[dict[str, Any]]) -> bool:
        """Invoke the function with one batch until it succeeds or the retries run out;
        False when the mapping has stopped (deleted, or its function is gone)."""
        config = mapping.config
        payload = json.dumps({"Records": records}).encode()
        failures = 0
        while not mapping.stop.is_set():
            try:
                reply = self._lambdas.invoke(
                    region, str(config["FunctionArn"]), payload, "RequestResponse", "None"
                )
            except Exception as exc:  # the emulator hiccuped: a failed attempt, not a crash
                reply = Reply(500, {"X-Amz-Function-Error": "Unhandled"}, repr(exc).encode())
            if reply.status == 404:
                self._disable(mapping, "function not found")
                return False
            if reply.status == 429:
                mapping.stop.wait(0.1)
                continue
            if reply.status == 200 and "X-Amz-Function-Error" not in reply.headers:
                mapping.batches += 1
                config["LastProcessingResult"] = "OK"
                return True
            failures += 1
            config["LastProcessingResult"] = "PROBLEM: Function call failed"
            retries = int(config["MaximumRetryAttempts"])
            if 0 <= retries < failures:
                return True  # given up on this batch: the checkpoint moves past it
            mapping.stop.wait(_RETRY_PAUSE_S[min(failures, len(_RETRY_PAUSE_S)) - 1])
        return False

    def _disable(self, mapping: _Mapping, reason: str) -> None:
        mapping.config["State"] = "Disabled"
        mapping.config["StateTransitionReason"] = reason
        mapping.stop.set()

    def close(self) -> None:
        with self._lock:
            mappings = list(self._mappings.values())
        for mapping in mappings:
            mapping.stop.set()
