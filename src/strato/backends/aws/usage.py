"""What a run on AWS is billed for, counted by Strato, and priced at AWS list prices.

The counts come from Strato's local AWS (its front counts every request and every
Lambda invocation, see ``_front``) and from the round loop's own execution history
(Step Functions bills state transitions). The same calls on AWS are the same billable
requests, so a measured local run prices a real one; ``docs/aws.md`` has the numbers.

Prices: us-east-1 list prices (checked 2025), free tiers ignored —

============================  ==========================================================
Lambda (x86)                  $0.0000166667 per GB-second, $0.20 per million requests
S3 Standard                   $0.005 per 1,000 PUT/COPY/POST/LIST, $0.0004 per 1,000 GET
                              and other requests
SNS                           $0.50 per million requests (deliveries to SQS are free)
SQS (standard)                $0.40 per million requests
DynamoDB (on-demand)          $0.625 per million write units, $0.125 per million read units
DynamoDB Streams              $0.02 per 100,000 GetRecords (free when Lambda reads them)
Step Functions (standard)     $0.025 per 1,000 state transitions
============================  ==========================================================

Not counted: CloudWatch Logs ingestion ($0.50/GB of log lines the functions print),
S3 storage ($0.023/GB-month) and data transfer (free within a region).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

__all__ = [
    "PRICES",
    "bill",
    "counters",
    "fetch_front_usage",
    "state_transitions",
    "subtract",
]

PRICES: dict[str, float] = {
    "lambda_gb_s": 0.0000166667,
    "lambda_requests": 0.20e-6,
    "s3_put_requests": 0.005e-3,
    "s3_get_requests": 0.0004e-3,
    "sns_requests": 0.50e-6,
    "sqs_requests": 0.40e-6,
    "dynamodb_write_units": 0.625e-6,
    "dynamodb_read_units": 0.125e-6,
    "dynamodb_stream_reads": 0.02e-5,
    "sfn_transitions": 0.025e-3,
}

_S3_PUT_TIER = {
    "PutObject",
    "UploadPart",
    "CreateMultipartUpload",
    "CompleteMultipartUpload",
    "ListObjects",
    "ListParts",
    "PostObject",
    "CopyObject",
}
_S3_FREE = {"DeleteObject", "DeleteObjects", "AbortMultipartUpload", "DeleteBucket"}
_USAGE_PATH = "/strato-api/usage"


def fetch_front_usage(endpoint_url: str, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The local front's counts so far, or None for an endpoint that keeps none (AWS)."""
    try:
        with urllib.request.urlopen(endpoint_url.rstrip("/") + _USAGE_PATH, timeout=timeout_s) as r:
            data = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "requests" in data else None


def subtract(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    """What happened between two ``fetch_front_usage`` snapshots."""

    def minus(a: Any, b: Any) -> Any:
        if isinstance(a, Mapping):
            b = b if isinstance(b, Mapping) else {}
            return {k: minus(v, b.get(k)) for k, v in a.items()}
        return a - (b or 0)

    return dict(minus(after, before))


def counters(usage: Mapping[str, Any], function_prefix: str = "") -> dict[str, float]:
    """Billable quantities of a front usage snapshot (or difference). Lambda counts
    only functions whose names start with ``function_prefix``."""
    requests: Mapping[str, int] = usage.get("requests", {})
    units: Mapping[str, int] = usage.get("units", {})
    out = {key: 0.0 for key in PRICES}
    for key, n in requests.items():
        service, _, operation = key.partition(":")
        if service == "s3" and operation not in _S3_FREE:
            tier = "s3_put_requests" if operation in _S3_PUT_TIER or operation.startswith(
                "PutBucket") else "s3_get_requests"  # fmt: skip
            out[tier] += n
        elif service == "sns":
            out["sns_requests"] += n
        elif service == "sqs":
            out["sqs_requests"] += n
        elif service == "dynamodbstreams" and operation == "GetRecords":
            out["dynamodb_stream_reads"] += n
    out["dynamodb_write_units"] = float(units.get("dynamodb_write_units", 0))
    out["dynamodb_read_units"] = float(units.get("dynamodb_read_units", 0))
    for name, fn in usage.get("lambda", {}).items():
        if name.startswith(function_prefix):
            out["lambda_requests"] += fn.get("invocations", 0)
            out["lambda_gb_s"] += fn.get("gb_s", 0.0)
    return out


def bill(quantities: Mapping[str, float]) -> dict[str, float]:
    """US dollars per item of ``counters`` (and ``total``)."""
    dollars = {key: float(quantities.get(key, 0.0)) * price for key, price in PRICES.items()}
    dollars["total"] = sum(dollars.values())
    return dollars


def state_transitions(sfn: Any, execution_arn: str) -> int:
    """State transitions Step Functions bills for an execution: one per state entered."""
    count = 0
    for page in sfn.get_paginator("get_execution_history").paginate(executionArn=execution_arn):
        count += sum(
            1 for e in page.get("events", []) if str(e.get("type", "")).endswith("StateEntered")
        )
    return count
