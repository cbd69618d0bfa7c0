"""The Bus on SNS + SQS: what the mapping puts on AWS, and what only this backend does."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from strato.errors import SchemaError
from strato.services import Services, TopicSchema, connect


def test_a_subscription_is_raw_delivery_with_a_filter_policy(aws: Services, boto: Any) -> None:
    bus = aws.bus
    bus.create_topic("rounds")
    bus.subscribe("rounds", "client-1", {"round": ["1", "2"]})
    prefix = aws.config["prefix"]
    sns = boto.client("sns")
    topic_arn = boto.arn("sns", f"{prefix}rounds")
    [sub] = sns.list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"]
    assert sub["Endpoint"] == boto.arn("sqs", f"{prefix}client-1")
    attributes = sns.get_subscription_attributes(SubscriptionArn=sub["SubscriptionArn"])[
        "Attributes"
    ]
    assert attributes["RawMessageDelivery"] == "true"
    assert json.loads(attributes["FilterPolicy"]) == {"round": ["1", "2"]}
    bus.subscribe("rounds", "client-1")  # again, without a filter: the same subscription
    [sub] = sns.list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"]
    attributes = sns.get_subscription_attributes(SubscriptionArn=sub["SubscriptionArn"])[
        "Attributes"
    ]
    assert json.loads(attributes.get("FilterPolicy") or "{}") == {}
    bus.publish("rounds", "any round", {"round": "7"})
    assert [m.body for m in bus.receive("client-1", wait_s=2)] == [b"any round"]
    bus.unsubscribe("rounds", "client-1")
    assert sns.list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"] == []


@pytest.mark.parametrize(
    "body",
    [b"", b"\x00\x01binary\xff", "tab\tnew\nline é ✓".encode(), b"\x07bell", b"x" * 150_000],
)
def test_any_bytes_round_trip(aws: Services, body: bytes) -> None:
    aws.bus.create_topic("t")
    aws.bus.subscribe("t", "q")
    mid = aws.bus.publish("t", body, {"kind": "raw"})
    [msg] = aws.bus.receive("q", wait_s=2)
    assert (msg.id, msg.body, msg.attributes) == (mid, body, {"kind": "raw"})


def test_an_ack_after_the_visibility_timeout_is_ignored(aws: Services) -> None:
    bus = aws.bus
    bus.create_topic("t")
    bus.subscribe("t", "q")
    mid = bus.publish("t", "work")
    [msg] = bus.receive("q", visibility_timeout_s=1)
    tag, deadline_ms, handle = msg.receipt.split(":", 2)
    assert tag == "s1" and abs(int(deadline_ms) / 1000 - (time.time() + 1)) < 1.0
    bus.ack("q", f"s1:{int(time.time() * 1000) - 1}:{handle}")  # its window has closed
    [again] = bus.receive("q", wait_s=10)  # so the message was not deleted
    assert (again.id, again.receive_count) == (mid, 2)
    bus.ack("q", again.receipt)  # in time: deleted for good
    assert bus.receive("q", wait_s=1.5, visibility_timeout_s=0) == []


def test_a_schema_is_seen_by_every_bundle(aws: Services) -> None:
    aws.bus.create_topic("updates", TopicSchema(required_attributes=("round",), max_bytes=100))
    with connect(aws.config) as other:
        other.bus.create_topic("updates")  # no schema given: it stays
        with pytest.raises(SchemaError, match="round"):
            other.bus.publish("updates", "x")
    with connect(aws.config) as third, pytest.raises(SchemaError, match="round"):
        third.bus.publish("updates", "x")


def test_a_long_schema_is_stored_in_chunks_and_replaced_whole(aws: Services, boto: Any) -> None:
    keys = tuple(f"key_{i:03d}" for i in range(60))  # far over one tag value
    aws.bus.create_topic("t", TopicSchema(json_body_keys=keys))
    aws.bus.create_topic("t", TopicSchema(required_attributes=("a",)))
    tags = boto.client("sns").list_tags_for_resource(
        ResourceArn=boto.arn("sns", f"{aws.config['prefix']}t")
    )["Tags"]
    assert {t["Key"] for t in tags} == {"strato-schema-n", "strato-schema-0"}
    with connect(aws.config) as other:
        other.bus.subscribe("t", "q")
        other.bus.publish("t", "not json at all", {"a": "1"})  # the old schema is gone
        with pytest.raises(SchemaError):
            other.bus.publish("t", "{}")


@pytest.mark.parametrize(
    ("attributes", "match"),
    [
        ({f"a{i}": "v" for i in range(9)}, "at most 8"),
        ({"strato.id": "forged"}, "reserved"),
        ({"AWS.thing": "v"}, "reserved"),
        ({"bad name": "v"}, "attribute name"),
        ({"empty": ""}, "empty"),
    ],
)
def test_attributes_sns_cannot_carry_are_refused(
    aws: Services, attributes: dict[str, str], match: str
) -> None:
    aws.bus.create_topic("t")
    with pytest.raises(SchemaError, match=match):
        aws.bus.publish("t", "x", attributes)


def test_delete_queue_removes_its_sqs_queue_and_subscriptions(aws: Services, boto: Any) -> None:
    bus = aws.bus
    for topic in ("a", "b"):
        bus.create_topic(topic)
        bus.subscribe(topic, "q")
    bus.delete_queue("q")
    bus.delete_queue("q")  # idempotent
    sns = boto.client("sns")
    for topic in ("a", "b"):
        arn = boto.arn("sns", f"{aws.config['prefix']}{topic}")
        assert sns.list_subscriptions_by_topic(TopicArn=arn)["Subscriptions"] == []
    urls = boto.client("sqs").list_queues(QueueNamePrefix=aws.config["prefix"]).get("QueueUrls")
    assert not urls
