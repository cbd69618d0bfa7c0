"""Bus: topics fanned out to durable per-subscriber queues (the SNS + SQS model).

Semantics every backend keeps:
- ``subscribe(topic, queue, filter)`` creates the queue if needed; a later publish
  is copied to every subscribed queue whose filter accepts the message's attributes
  (filter: attribute name -> allowed string values, all names must match).
- ``receive`` long-polls up to ``wait_s`` seconds; a received message is invisible
  for ``visibility_timeout_s`` and then reappears unless it was ``ack``-ed with its
  receipt (at-least-once delivery; ``receive_count`` says how often it was handed out).
- A topic may carry a ``TopicSchema``; a publish that breaks it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from strato.errors import PayloadTooLarge, SchemaError

__all__ = ["Bus", "Message", "TopicSchema", "matches_filter"]

Filter = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class Message:
    id: str
    body: bytes
    attributes: dict[str, str]
    receipt: str
    receive_count: int

    def json(self) -> object:
        return json.loads(self.body)


@dataclass(frozen=True)
class TopicSchema:
    """What a topic accepts: required attributes, JSON body keys, a size limit."""

    required_attributes: tuple[str, ...] = ()
    json_body_keys: tuple[str, ...] | None = None
    max_bytes: int = 256 * 1024  # SNS's limit for one message

    def validate(self, topic: str, body: bytes, attributes: Mapping[str, str]) -> None:
        size = len(body) + sum(len(k) + len(v) for k, v in attributes.items())
        if size > self.max_bytes:
            raise PayloadTooLarge(
                f"message of {size} bytes is over topic {topic!r}'s limit of {self.max_bytes}"
            )
        missing = [a for a in self.required_attributes if a not in attributes]
        if missing:
            raise SchemaError(f"message for topic {topic!r} lacks attribute(s) {missing}")
        if self.json_body_keys is not None:
            try:
                doc = json.loads(body)
            except ValueError:
                raise SchemaError(f"message for topic {topic!r} is not a JSON object") from None
            if not isinstance(doc, dict):
                raise SchemaError(f"message for topic {topic!r} is not a JSON object")
            absent = [k for k in self.json_body_keys if k not in doc]
            if absent:
                raise SchemaError(f"message for topic {topic!r} lacks key(s) {absent}")

    def to_dict(self) -> dict[str, object]:
        return {
            "required_attributes": list(self.required_attributes),
            "json_body_keys": None if self.json_body_keys is None else list(self.json_body_keys),
            "max_bytes": self.max_bytes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> TopicSchema:
        keys = d.get("json_body_keys")
        req = d.get("required_attributes") or []
        return cls(
            required_attributes=tuple(str(a) for a in req),  # type: ignore[attr-defined]
            json_body_keys=None if keys is None else tuple(str(k) for k in keys),  # type: ignore[attr-defined]
            max_bytes=int(d.get("max_bytes", 256 * 1024)),  # type: ignore[call-overload]
        )


def matches_filter(filter_: Filter | None, attributes: Mapping[str, str]) -> bool:
    """SNS filter-policy semantics on string attributes (exact match, all keys)."""
    if not filter_:
        return True
    return all(attributes.get(k) in set(v) for k, v in filter_.items())


@runtime_checkable
class Bus(Protocol):
    def create_topic(self, topic: str, schema: TopicSchema | None = None) -> None:
        """Create a topic (idempotent); a schema replaces the topic's schema."""
        ...

    def subscribe(self, topic: str, queue: str, filter: Filter | None = None) -> None:
        """Create ``queue`` if needed and subscribe it to ``topic`` (idempotent)."""
        ...

    def unsubscribe(self, topic: str, queue: str) -> None: ...

    def delete_queue(self, queue: str) -> None:
        """Delete a queue, its subscriptions and its messages."""
        ...

    def publish(
        self, topic: str, body: bytes | str, attributes: Mapping[str, str] | None = None
    ) -> str:
        """Fan a message out to every matching subscribed queue; returns its id."""
        ...

    def receive(
        self,
        queue: str,
        max_messages: int = 1,
        wait_s: float = 0.0,
        visibility_timeout_s: float = 30.0,
    ) -> list[Message]: ...

    def ack(self, queue: str, receipt: str) -> None:
        """Delete a received message (idempotent; a stale receipt is ignored)."""
        ...

    def close(self) -> None: ...
