"""Logical names (what Strato code says) to AWS resource names (what AWS accepts).

A name that AWS accepts as it is becomes ``prefix + name``, so resources stay readable
in the console. Any other name keeps its legal characters and gains a short hash of
the original, so the mapping is deterministic (every process finds the same queue)
and two different logical names never share a resource.
"""

from __future__ import annotations

import hashlib
import re

from strato.errors import ConfigError

__all__ = ["bucket_name", "physical"]

_LEGAL = re.compile(r"[A-Za-z0-9_-]+")
_HASH_CHARS = 10

# Longest names: SQS queue 80, SNS topic 256, DynamoDB table 255, Lambda function 64,
# Step Functions state machine and execution 80.
MAX_LEN = {
    "queue": 80,
    "topic": 256,
    "table": 255,
    "function": 64,
    "state machine": 80,
    "execution": 80,
    "role": 64,
}


def physical(kind: str, prefix: str, name: str) -> str:
    """The AWS name of the ``kind`` resource a Strato name stands for."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} name must be a non-empty string, got {name!r}")
    limit = MAX_LEN[kind]
    if _LEGAL.fullmatch(name) and len(prefix) + len(name) <= limit:
        return prefix + name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:_HASH_CHARS]
    keep = limit - len(prefix) - _HASH_CHARS - 1
    if keep < 1:
        raise ConfigError(f"the prefix {prefix!r} leaves no room for {kind} names")
    legal = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:keep]
    return f"{prefix}{legal}-{digest}"


def bucket_name(prefix: str, suffix: str = "blobs") -> str:
    """A default S3 bucket name from the prefix: lower case, 3–63 of [a-z0-9-]."""
    raw = f"{prefix}{suffix}"
    legal = re.sub(r"[^a-z0-9-]", "-", raw.lower()).strip("-")
    if legal != raw or len(legal) > 63:
        digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:_HASH_CHARS]
        legal = f"{legal[: 63 - _HASH_CHARS - 1]}-{digest}".strip("-")
    if len(legal) < 3:
        legal = f"strato-{legal}"
    return legal
