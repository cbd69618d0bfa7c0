"""What the local front counts: every AWS request that reaches it, by service and operation.

The front sees every call a Strato process, a local Lambda worker or moto's Step
Functions makes, so its counts are the billable requests of a run on AWS (Lambda's
own invocations are counted by ``_local_lambda``, with their GB-seconds). DynamoDB
capacity units are estimated from the sizes on the wire: a write costs one write
unit per KB of its request, a read one read unit per 4 KB of its reply (strongly
consistent reads, which Strato's table makes); AWS rounds by item size, which the
request and reply bodies slightly overstate.
"""

from __future__ import annotations

import math
import re
import threading
import urllib.parse
from collections import Counter
from typing import Any

__all__ = ["RequestCounter", "classify"]

_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/(?P<service>[^/]+)/")
_DYNAMODB_WRITES = {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}
_DYNAMODB_READS = {"GetItem", "Query", "Scan", "BatchGetItem", "TransactGetItems"}


def _s3_operation(method: str, path: str, query: dict[str, list[str]]) -> str:
    parts = [p for p in path.split("/") if p]
    has_key = len(parts) > 1
    if method == "PUT":
        if "partNumber" in query:
            return "UploadPart"
        return "PutObject" if has_key else "PutBucket" + ("".join(sorted(query)) or "")
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "DeleteObjects" if "delete" in query else "PostObject"
    if method == "GET":
        if not has_key:
            return "ListObjects" if not query or "list-type" in query else "GetBucketConfig"
        return "ListParts" if "uploadId" in query else "GetObject"
    if method == "HEAD":
        return "HeadObject" if has_key else "HeadBucket"
    if method == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        return "DeleteObject" if has_key else "DeleteBucket"
    return method


def classify(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[str, str]:
    """(service, operation) of one request, e.g. ``("sqs", "ReceiveMessage")``."""
    lower = {k.lower(): v for k, v in headers.items()}
    scope = _SCOPE.search(lower.get("authorization", ""))
    service = scope.group("service") if scope else "unknown"
    target = lower.get("x-amz-target", "")
    url = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    if target:
        api, _, operation = target.partition(".")
        if api.startswith("DynamoDBStreams"):
            service = "dynamodbstreams"
        return service, operation
    if service == "s3":
        return service, _s3_operation(method, url.path, query)
    if service == "lambda":
        if url.path.endswith("/invocations"):
            return service, "Invoke"
        return service, f"{method} {url.path.split('/')[2] if url.path.count('/') > 1 else ''}"
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace")) if body else {}
    action = (form.get("Action") or query.get("Action") or [""])[0]
    return service, action or method


class RequestCounter:
    """Counts requests (and DynamoDB capacity units) as the front passes them on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._units: Counter[str] = Counter()

    def count(
        self, method: str, path: str, headers: dict[str, str], body: bytes, reply_bytes: int
    ) -> None:
        service, operation = classify(method, path, headers, body)
        with self._lock:
            self._requests[f"{service}:{operation}"] += 1
            if service == "dynamodb" and operation in _DYNAMODB_WRITES:
                self._units["dynamodb_write_units"] += max(1, math.ceil(len(body) / 1024))
            elif service == "dynamodb" and operation in _DYNAMODB_READS:
                self._units["dynamodb_read_units"] += max(1, math.ceil(reply_bytes / 4096))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self._requests), "units": dict(self._units)}
