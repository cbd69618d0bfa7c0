"""The table, the bus and the blob store on Ray: proxies of the state host's parts.

Each proxy method sends its arguments as JSON (bytes apart) to the state host
(``_host``), which runs the embedded part's method there and sends the result back
the same way: items, changes and messages as plain dicts, blob bytes as bytes,
message bodies base64 in the JSON of a batch.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from strato.backends.ray._cluster import StateClient
from strato.services.bus import Filter, Message, TopicSchema
from strato.services.table import Change, Item

__all__ = ["RayBlobStore", "RayBus", "RayTable"]

class _Proxy:
    kind = ""

    def __init__(self, client: StateClient) -> None:
        self._client = client
        self._closed = False

    def _call(self, method: str, *args: Any, data: Any = None, **kwargs: Any) -> Any:
        return self._client.call(self.kind, method, *args, data=data, **kwargs)[0]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.release()


class RayTable(_Proxy):
    kind = "table"

    def create_table(self, table: str) -> None:
        self._call("create_table", table)

    def put(self, table: str, key: str, value: Mapping[str, Any], *, if_absent: bool = False,
            if_version: int | None = None) -> int:
        return int(self._call("put", table, key, dict(value), if_absent=if_absent,
                              if_version=if_version))

    def get(self, table: str, key: str, *, consistent: bool = True) -> Item | None:
        got = self._call("get", table, key, consistent=consistent)
        return None if got is None else Item(**got)

    def query(self, table: str, prefix: str = "") -> list[Item]:
        return [Item(**x) for x in self._call("query", table, prefix)]

    def delete(self, table: str, key: str, *, if_version: int | None = None) -> None:
        self._call("delete", table, key, if_version=if_version)

    def read_stream(self, table: str, after: str | None = None, limit: int = 100) -> list[Change]:
        return [Change(**x) for x in self._call("read_stream", table, after, limit)]


class RayBus(_Proxy):
    kind = "bus"

    def create_topic(self, topic: str, schema: TopicSchema | None = None) -> None:
        self._call("create_topic", topic, schema=None if schema is None else schema.to_dict())

    def subscribe(self, topic: str, queue: str, filter: Filter | None = None) -> None:
        self._call("subscribe", topic, queue,
                   None if filter is None else
                   {k: v if isinstance(v, str) else list(v) for k, v in filter.items()})

    def unsubscribe(self, topic: str, queue: str) -> None:
        self._call("unsubscribe", topic, queue)

    def delete_queue(self, queue: str) -> None:
        self._call("delete_queue", queue)

    def publish(self, topic: str, body: bytes | str,
                attributes: Mapping[str, str] | None = None) -> str:
        raw = body.encode() if isinstance(body, str) else bytes(body)
        return str(self._call("publish", topic, data=raw,
                              attributes=None if attributes is None else dict(attributes)))

    def receive(self, queue: str, max_messages: int = 1, wait_s: float = 0.0,
                visibility_timeout_s: float = 30.0) -> list[Message]:
        got = self._call("receive", queue, max_messages, wait_s, visibility_timeout_s)
        return [Message(**{**m, "body": base64.b64decode(m["body"])}) for m in got]

    def ack(self, queue: str, receipt: str) -> None:
        self._call("ack", queue, receipt)


class RayBlobStore(_Proxy):
    """Blobs in the state host; a process on the host's node also gets ``locate``
    (the blob's file, offset and length on this machine), which the aggregation
    engine maps in place instead of copying the bytes over."""

    kind = "blobs"

    def __init__(self, client: StateClient) -> None:
        super().__init__(client)
        if client.on_host_node():
            self.locate = self._locate

    def _locate(self, key: str) -> tuple[str, int, int]:
        path, offset, length = self._call("locate", key)
        return str(path), int(offset), int(length)

    def put(self, key: str, data: Any) -> str:
        return str(self._call("put", key, data=_bytes(data)))

    def put_content(self, data: Any) -> str:
        return str(self._call("put_content", data=_bytes(data)))

    def get(self, key: str, *, verify: bool = True) -> memoryview:
        _, blob = self._client.call("blobs", "get", key, verify=verify)
        return memoryview(blob if blob is not None else b"")

    def exists(self, key: str) -> bool:
        return bool(self._call("exists", key))

    def list(self, prefix: str = "") -> list[str]:
        return [str(k) for k in self._call("list", prefix)]

    def delete(self, key: str) -> None:
        self._call("delete", key)


def _bytes(data: Any) -> bytes:
    try:
        return bytes(memoryview(data).cast("B"))
    except TypeError:
        raise TypeError(f"blob data must be bytes-like, got {type(data).__name__}") from None
