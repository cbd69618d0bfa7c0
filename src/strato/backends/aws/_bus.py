"""Bus on SNS + SQS: one SNS topic per topic, one SQS queue per subscriber.

A subscription is an SNS→SQS subscription with raw message delivery (the SQS body is
the published body, the SNS message attributes become SQS message attributes) and,
when a filter is given, an SNS filter policy on message attributes, which has exactly
the ``matches_filter`` semantics. ``receive`` long-polls SQS; ``receive_count`` is
SQS's ApproximateReceiveCount; ``ack`` is DeleteMessage by receipt handle.

What SNS/SQS do not give directly, done here:
- Topic schemas are checked by the publisher (as in the embedded bus). A topic's
  schema is stored as tags on its SNS topic (base64 JSON, chunked to fit tag values)
  so every process sees it; a process re-reads it after ``schema_ttl_s``.
- Message ids, binary bodies and receipts travel as ``_bus_wire`` says (an id
  attribute, base64 for bodies SQS cannot carry, the visibility deadline in the
  receipt); each message may carry at most 8 attributes of its own (SQS takes 10).
- A receipt is the SQS receipt handle plus the time its visibility timeout runs out.
  An ack after that is ignored: the message may already be in another consumer's
  hands, and SQS itself may or may not honour an expired handle. The message then
  comes back once more, which at-least-once delivery allows.
- SQS takes whole seconds: a visibility timeout is rounded up, a long poll is cut
  into whole-second long polls then short polls, so ``wait_s`` is never overshot.

Real-AWS notes: a deleted queue's name cannot be reused for 60 s (SQS), and a short
poll (``wait_s=0``) samples SQS servers, so it may miss a message that a long poll
would see.
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from strato.backends.aws._boto import ClientError, Clients, error_code, error_message
from strato.backends.aws._bus_wire import (
    ENCODING_ATTRIBUTE,
    ID_ATTRIBUTE,
    check_attributes,
    encode_body,
    message_from_sqs,
    normalise_filter,
    parse_receipt,
)
from strato.backends.aws._names import physical
from strato.errors import NotFound, PayloadTooLarge
from strato.services.bus import Filter, Message, TopicSchema

__all__ = ["SnsSqsBus"]

SCHEMA_TAG = "strato-schema-"
_TAG_VALUE_MAX = 256
# A long poll's messages were handed out somewhere between the request and the
# reply; their visibility deadline is counted from this long before the reply.
_HANDOUT_MARGIN_S = 0.25
_MAX_VISIBILITY_S = 43200
_SHORT_POLL_PAUSE_S = 0.05


class SnsSqsBus:
    """``Bus`` on SNS + SQS (see the module doc)."""

    def __init__(self, clients: Clients, *, schema_ttl_s: float = 5.0) -> None:
        self._clients = clients
        self._prefix = clients.config.prefix
        self._sns = clients.client("sns")
        self._sqs = clients.client("sqs")
        self._schema_ttl_s = schema_ttl_s
        self._lock = threading.Lock()
        self._queue_urls: dict[str, str] = {}
        self._schemas: dict[str, tuple[float, TopicSchema | None]] = {}

    # --- names ------------------------------------------------------------------------

    def _topic_arn(self, topic: str) -> str:
        return self._clients.arn("sns", physical("topic", self._prefix, topic))

    def _queue_arn(self, queue: str) -> str:
        return self._clients.arn("sqs", physical("queue", self._prefix, queue))

    def _queue_url(self, queue: str) -> str:
        with self._lock:
            url = self._queue_urls.get(queue)
        if url is not None:
            return url
        try:
            url = str(
                self._sqs.get_queue_url(QueueName=physical("queue", self._prefix, queue))[
                    "QueueUrl"
                ]
            )
        except ClientError as exc:
            if _queue_missing(exc):
                raise NotFound(
                    f"no queue named {queue!r} (subscribe it to a topic first)"
                ) from None
            raise
        with self._lock:
            self._queue_urls[queue] = url
        return url

    # --- topics and subscriptions -----------------------------------------------------

    def create_topic(self, topic: str, schema: TopicSchema | None = None) -> None:
        name = physical("topic", self._prefix, topic)
        arn = str(self._sns.create_topic(Name=name)["TopicArn"])
        if schema is None:
            return
        encoded = base64.b64encode(json.dumps(schema.to_dict()).encode()).decode("ascii")
        chunks = [encoded[i : i + _TAG_VALUE_MAX] for i in range(0, len(encoded), _TAG_VALUE_MAX)]
        tags = [{"Key": f"{SCHEMA_TAG}n", "Value": str(len(chunks))}]
        tags += [{"Key": f"{SCHEMA_TAG}{i}", "Value": c} for i, c in enumerate(chunks)]
        self._sns.tag_resource(ResourceArn=arn, Tags=tags)
        old = self._read_tags(topic, arn)
        stale = [
            k
            for k in old
            if k.startswith(SCHEMA_TAG) and k[len(SCHEMA_TAG) :].isdigit()
            and int(k[len(SCHEMA_TAG) :]) >= len(chunks)
        ]  # fmt: skip
        if stale:
            self._sns.untag_resource(ResourceArn=arn, TagKeys=stale)
        with self._lock:
            self._schemas[topic] = (time.monotonic(), schema)

    def _read_tags(self, topic: str, arn: str) -> dict[str, str]:
        try:
            tags = self._sns.list_tags_for_resource(ResourceArn=arn)["Tags"]
        except ClientError as exc:
            if error_code(exc) in ("ResourceNotFound", "NotFound", "ResourceNotFoundException"):
                raise NotFound(
                    f"no topic named {topic!r} (create it with create_topic first)"
                ) from None
            raise
        return {str(t["Key"]): str(t["Value"]) for t in tags}

    def _schema(self, topic: str) -> TopicSchema | None:
        """The topic's schema (NotFound when there is no such topic)."""
        with self._lock:
            cached = self._schemas.get(topic)
        if cached is not None and time.monotonic() - cached[0] < self._schema_ttl_s:
            return cached[1]
        tags = self._read_tags(topic, self._topic_arn(topic))
        schema = None
        count = tags.get(f"{SCHEMA_TAG}n")
        if count is not None:
            encoded = "".join(tags.get(f"{SCHEMA_TAG}{i}", "") for i in range(int(count)))
            schema = TopicSchema.from_dict(json.loads(base64.b64decode(encoded)))
        with self._lock:
            self._schemas[topic] = (time.monotonic(), schema)
        return schema

    def _ensure_queue(self, queue: str) -> str:
        name = physical("queue", self._prefix, queue)
        arn = self._queue_arn(queue)
        topics = self._clients.arn("sns", f"{self._prefix}*")
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "strato-topics-of-this-prefix",
                    "Effect": "Allow",
                    "Principal": {"Service": "sns.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": arn,
                    "Condition": {"ArnLike": {"aws:SourceArn": topics}},
                }
            ],
        }
        try:
            url = self._sqs.create_queue(QueueName=name, Attributes={"Policy": json.dumps(policy)})[
                "QueueUrl"
            ]
        except ClientError as exc:
            if error_code(exc) not in ("QueueAlreadyExists", "QueueNameExists"):
                raise
            url = self._sqs.get_queue_url(QueueName=name)["QueueUrl"]
        with self._lock:
            self._queue_urls[queue] = str(url)
        return arn

    def _subscriptions(self, topic_arn: str) -> list[dict[str, Any]]:
        subs: list[dict[str, Any]] = []
        for page in self._sns.get_paginator("list_subscriptions_by_topic").paginate(
            TopicArn=topic_arn
        ):
            subs.extend(page.get("Subscriptions", []))
        return subs

    def subscribe(self, topic: str, queue: str, filter: Filter | None = None) -> None:
        normalised = normalise_filter(topic, queue, filter)
        topic_arn = self._topic_arn(topic)
        self._schema(topic)  # NotFound before any queue is made, as SNS would say
        queue_arn = self._ensure_queue(queue)
        policy = json.dumps(normalised) if normalised else "{}"
        for sub in self._subscriptions(topic_arn):
            if sub.get("Endpoint") == queue_arn and sub.get("Protocol") == "sqs":
                self._sns.set_subscription_attributes(
                    SubscriptionArn=sub["SubscriptionArn"],
                    AttributeName="FilterPolicy",
                    AttributeValue=policy,
                )
                return
        attributes = {"RawMessageDelivery": "true"}
        if normalised:
            attributes["FilterPolicy"] = policy
        self._sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes=attributes,
            ReturnSubscriptionArn=True,
        )

    def unsubscribe(self, topic: str, queue: str) -> None:
        queue_arn = self._queue_arn(queue)
        try:
            subs = self._subscriptions(self._topic_arn(topic))
        except ClientError as exc:
            if error_code(exc) == "NotFound":
                return
            raise
        for sub in subs:
            if sub.get("Endpoint") == queue_arn:
                self._sns.unsubscribe(SubscriptionArn=sub["SubscriptionArn"])

    def delete_queue(self, queue: str) -> None:
        queue_arn = self._queue_arn(queue)
        for page in self._sns.get_paginator("list_subscriptions").paginate():
            for sub in page.get("Subscriptions", []):
                if sub.get("Endpoint") == queue_arn:
                    self._sns.unsubscribe(SubscriptionArn=sub["SubscriptionArn"])
        try:
            url = self._queue_url(queue)
            self._sqs.delete_queue(QueueUrl=url)
        except NotFound:
            pass
        except ClientError as exc:
            if not _queue_missing(exc):
                raise
        with self._lock:
            self._queue_urls.pop(queue, None)

    # --- messages ---------------------------------------------------------------------

    def publish(
        self, topic: str, body: bytes | str, attributes: Mapping[str, str] | None = None
    ) -> str:
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        attrs = dict(attributes or {})
        check_attributes(topic, attrs)
        (self._schema(topic) or TopicSchema()).validate(topic, data, attrs)
        message_id = uuid.uuid4().hex
        text, encoding = encode_body(data)
        wire = {**attrs, ID_ATTRIBUTE: message_id}
        if encoding is not None:
            wire[ENCODING_ATTRIBUTE] = encoding
        try:
            self._sns.publish(
                TopicArn=self._topic_arn(topic),
                Message=text,
                MessageAttributes={
                    k: {"DataType": "String", "StringValue": v} for k, v in wire.items()
                },
            )
        except ClientError as exc:
            code, message = error_code(exc), error_message(exc)
            if code in ("NotFound", "NotFoundException"):
                raise NotFound(
                    f"no topic named {topic!r} (create it with create_topic first)"
                ) from None
            if code == "InvalidParameter" and "too long" in message.lower():
                raise PayloadTooLarge(
                    f"message for topic {topic!r} is over SNS's 256 KiB limit once encoded "
                    f"({len(text)} characters)"
                ) from None
            raise
        return message_id

    def receive(
        self,
        queue: str,
        max_messages: int = 1,
        wait_s: float = 0.0,
        visibility_timeout_s: float = 30.0,
    ) -> list[Message]:
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        if visibility_timeout_s < 0:
            raise ValueError(f"visibility_timeout_s must be >= 0, got {visibility_timeout_s}")
        url = self._queue_url(queue)
        visibility = min(_MAX_VISIBILITY_S, math.ceil(visibility_timeout_s))
        deadline = time.monotonic() + max(0.0, wait_s)
        got: list[Message] = []
        while True:
            remaining = deadline - time.monotonic()
            wait = 0 if got or remaining < 1 else min(20, int(remaining))
            want = min(10, max_messages - len(got))
            sent = time.time()
            try:
                reply = self._sqs.receive_message(
                    QueueUrl=url,
                    MaxNumberOfMessages=want,
                    WaitTimeSeconds=wait,
                    VisibilityTimeout=visibility,
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["ApproximateReceiveCount"],
                )
            except ClientError as exc:
                if _queue_missing(exc):
                    with self._lock:
                        self._queue_urls.pop(queue, None)
                    raise NotFound(
                        f"no queue named {queue!r} (subscribe it to a topic first)"
                    ) from None
                raise
            handed_out = max(sent, time.time() - _HANDOUT_MARGIN_S)
            batch = [
                message_from_sqs(m, handed_out + visibility) for m in reply.get("Messages", [])
            ]
            got.extend(batch)
            if got:
                # Top up a partial batch only while SQS keeps handing out full ones.
                if len(got) >= max_messages or len(batch) < want:
                    return got
                continue
            if remaining <= 0:
                return []
            if wait == 0:
                time.sleep(min(_SHORT_POLL_PAUSE_S, max(0.0, remaining)))

    def ack(self, queue: str, receipt: str) -> None:
        url = self._queue_url(queue)
        visible_again_at, handle = parse_receipt(receipt)
        if visible_again_at is not None and time.time() >= visible_again_at:
            return  # stale: the message may be in someone else's hands by now
        try:
            self._sqs.delete_message(QueueUrl=url, ReceiptHandle=handle)
        except ClientError as exc:
            if _queue_missing(exc):
                raise NotFound(f"no queue named {queue!r}") from None
            if error_code(exc) not in (
                "ReceiptHandleIsInvalid",
                "InvalidParameterValue",
                "AWS.SimpleQueueService.ReceiptHandleIsInvalid",
            ):
                raise

    def close(self) -> None:
        """Nothing to release: the boto3 clients are shared by every part of the bundle."""


def _queue_missing(exc: BaseException) -> bool:
    return error_code(exc) in (
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
        "NonExistentQueue",
    )
