"""How Strato messages travel on SNS/SQS: attributes, bodies and receipts.

- The message id a publish returns travels as the attribute ``strato.id`` (with raw
  delivery the SQS message id is another one).
- SNS and SQS carry text: a body that is not SQS-safe UTF-8 (binary, control
  characters) travels base64-encoded, marked by ``strato.encoding``; an empty body
  travels as a placeholder (SNS refuses empty messages). Both attributes are hidden
  from ``Message.attributes``; a message carries at most 8 attributes of its own.
- A receipt is ``s1:<ms since the epoch when the visibility timeout ends>:<handle>``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

from strato.errors import SchemaError
from strato.services.bus import Filter, Message

__all__ = [
    "ENCODING_ATTRIBUTE",
    "ID_ATTRIBUTE",
    "MAX_USER_ATTRIBUTES",
    "RECEIPT_TAG",
    "RESERVED",
    "check_attributes",
    "decode_body",
    "encode_body",
    "message_from_sqs",
    "normalise_filter",
    "parse_receipt",
]

ID_ATTRIBUTE = "strato.id"
ENCODING_ATTRIBUTE = "strato.encoding"
RESERVED = frozenset({ID_ATTRIBUTE, ENCODING_ATTRIBUTE})
MAX_USER_ATTRIBUTES = 8
RECEIPT_TAG = "s1"
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,256}")
# Characters an SQS message body may hold (anything else goes base64).
_SQS_UNSAFE = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def normalise_filter(topic: str, queue: str, filter_: Filter | None) -> dict[str, list[str]]:
    """As the embedded bus: a bare string is that one value, values must be strings."""
    out: dict[str, list[str]] = {}
    for name, allowed in (filter_ or {}).items():
        values = [allowed] if isinstance(allowed, str) else list(allowed)
        if not all(isinstance(v, str) for v in values):
            raise SchemaError(
                f"filter of queue {queue!r} on topic {topic!r}: values for {name!r} "
                f"must be strings, got {values!r}"
            )
        out[str(name)] = values
    return out


def check_attributes(topic: str, attrs: Mapping[str, Any]) -> None:
    for name, value in attrs.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise SchemaError(
                f"message for topic {topic!r}: attribute {name!r} must map a string "
                f"to a string, got {type(value).__name__}"
            )
        if (
            name in RESERVED
            or not _ATTRIBUTE_NAME.fullmatch(name)
            or name.startswith(("AWS.", "Amazon."))
        ):
            raise SchemaError(
                f"message for topic {topic!r}: {name!r} is not an attribute name SNS takes "
                "(1-256 of A-Z a-z 0-9 _ - ., not 'AWS.'/'Amazon.'/'strato.' reserved ones)"
            )
        if not value:
            raise SchemaError(
                f"message for topic {topic!r}: attribute {name!r} is empty (SNS refuses "
                "empty attribute values)"
            )
    if len(attrs) > MAX_USER_ATTRIBUTES:
        raise SchemaError(
            f"message for topic {topic!r} has {len(attrs)} attributes; the AWS backend "
            f"carries at most {MAX_USER_ATTRIBUTES}"
        )


def encode_body(data: bytes) -> tuple[str, str | None]:
    """SNS/SQS carry text: UTF-8 bodies that SQS accepts go as they are."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text and not _SQS_UNSAFE.search(text):
        return text, None
    if not data:
        return "-", "empty"  # SNS refuses an empty message
    return base64.b64encode(data).decode("ascii"), "base64"


def decode_body(text: str, encoding: str | None) -> bytes:
    if encoding == "base64":
        return base64.b64decode(text)
    if encoding == "empty":
        return b""
    return text.encode("utf-8")


def message_from_sqs(raw: Mapping[str, Any], visible_again_at: float) -> Message:
    wire = {
        str(k): str(v.get("StringValue", ""))
        for k, v in (raw.get("MessageAttributes") or {}).items()
    }
    attributes = {k: v for k, v in wire.items() if k not in RESERVED}
    deadline_ms = int(visible_again_at * 1000)
    return Message(
        id=wire.get(ID_ATTRIBUTE, str(raw["MessageId"])),
        body=decode_body(str(raw["Body"]), wire.get(ENCODING_ATTRIBUTE)),
        attributes=attributes,
        receipt=f"{RECEIPT_TAG}:{deadline_ms}:{raw['ReceiptHandle']}",
        receive_count=int((raw.get("Attributes") or {}).get("ApproximateReceiveCount", 1)),
    )


def parse_receipt(receipt: str) -> tuple[float | None, str]:
    """(when the visibility timeout ends in s since the epoch, or None; SQS handle)."""
    parts = receipt.split(":", 2) if isinstance(receipt, str) else []
    if len(parts) == 3 and parts[0] == RECEIPT_TAG and parts[1].isdigit():
        return int(parts[1]) / 1000, parts[2]
    return None, str(receipt)
