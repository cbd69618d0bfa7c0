"""The state host: the actor on the head node that keeps a run's durable state.

It opens the embedded backend's SQLite table, SQLite bus and blob directory under the
run's root on the head's disk, and runs the calls the proxies of ``_parts`` send it:
one generic entry point, ``call``, takes the part, the method and its JSON arguments
(bytes apart) and returns ``(json, bytes | None)``; errors come back as
``{"error": {type, message}}`` and are raised again in the caller as Strato's own.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from strato.services.bus import Message, TopicSchema
from strato.services.table import Change, Item

__all__ = ["StateHost", "serve", "wire_bytes"]

TABLE_FILE = "table.sqlite"  # the run's table, under its root (its doorbell is named after it)
FETCH_TIMEOUT_S = 120.0  # a handed-off object's copy to this node, ahead of its reader
AWAIT_AT_MOST_S = 5.0  # a reader's wait for handed-off blobs holds one of the host's threads


_METHODS = {
    "table": {"create_table", "put", "get", "query", "delete", "read_stream", "trim_stream"},
    "bus": {"create_topic", "subscribe", "unsubscribe", "delete_queue", "publish", "receive",
            "ack"},
    "blobs": {"put", "put_content", "get", "exists", "list", "delete", "locate", "stat"},
}


def serve(part: Any, kind: str, method: str, call: Mapping[str, Any],
          data: Any) -> tuple[str, Any]:
    """Run one proxied call on the host's ``part``; returns ``(json, bytes-like | None)``."""
    if method not in _METHODS[kind]:
        raise ValueError(f"{kind} has no method {method!r}")
    args, kwargs = list(call.get("args", ())), dict(call.get("kwargs", {}))
    out_bytes: bytes | None = None
    if kind == "bus" and method == "create_topic" and kwargs.get("schema") is not None:
        kwargs["schema"] = TopicSchema.from_dict(kwargs["schema"])
    if data is not None:  # an array for a large payload (``wire_bytes``): read in place
        kwargs["data" if kind == "blobs" else "body"] = data if kind == "blobs" else bytes(data)
    result = getattr(part, method)(*args, **kwargs)
    if kind == "blobs" and method == "get":
        out_bytes, result = wire_bytes(result), None
    elif isinstance(result, Item):
        result = asdict(result)
    elif isinstance(result, list) and result and isinstance(result[0], (Item, Change)):
        result = [asdict(x) for x in result]
    elif isinstance(result, list) and result and isinstance(result[0], Message):
        result = [{**asdict(m), "body": base64.b64encode(m.body).decode()} for m in result]
    return json.dumps({"result": result}), out_bytes


OUT_OF_BAND_FROM = 1 << 20  # bytes: larger payloads cross as arrays, read in place


def wire_bytes(data: Any) -> Any:
    """Bytes for a call to (or a reply from) the state host. A large payload goes as a
    uint8 array over the very same memory: Ray copies an array's buffer once into the
    object store and the receiver reads it there in place, where ``bytes`` would be
    copied in and out of its serialised form (a 40 MB partial crossed nodes of a local
    cluster in ~40 ms as an array, ~90 ms as bytes). Either way the receiver sees a
    bytes-like object; small payloads stay ``bytes``."""
    view = memoryview(data).cast("B")
    if view.nbytes < OUT_OF_BAND_FROM:
        return bytes(view)
    import numpy as np

    return np.frombuffer(view, dtype=np.uint8)


def _nbytes(data: Any) -> int:
    return 0 if data is None else memoryview(data).nbytes


class StateHost:
    """The actor's body (see the module doc)."""

    def __init__(self, root: str) -> None:
        from pathlib import Path

        from strato.services._blobs_local import LocalBlobStore
        from strato.services._bus_sqlite import SqliteBus
        from strato.services._table_sqlite import SqliteTable

        base = Path(root)
        base.mkdir(parents=True, exist_ok=True)
        self.parts: dict[str, Any] = {
            "table": SqliteTable(base / TABLE_FILE),
            "bus": SqliteBus(base / "bus.sqlite"),
            "blobs": LocalBlobStore(base / "blobs"),
        }

        # bytes in and out per caller's node: what crossed nodes to reach this state
        self.traffic: dict[str, int] = {}
        # bytes of node-local blobs read from another node, per reading node
        self.remote_reads: dict[str, int] = {}
        # both, per (kind, node, function) of the caller ('' outside functions)
        self.by_function: dict[tuple[str, str, str], int] = {}
        self._counting = threading.Lock()  # calls run on up to 64 threads at once
        # handed-off blobs (``RayBlobStore``): key -> ([its object's ref], writer's node,
        # length). Holding the ref keeps the object alive while its writer lives.
        self.handed: dict[str, tuple[list[Any], str, int]] = {}
        self._handed_now = threading.Condition(self._counting)  # one more was handed
        self.node_id = ""  # this host's node (asked once)

    def ping(self) -> int:
        return os.getpid()

    def call(self, part: str, method: str, args: str, data: Any,
             caller: str = "", function: str = "") -> tuple[str, Any]:
        try:
            text, out = serve(self.parts[part], part, method, json.loads(args), data)
        except Exception as exc:  # reported to the caller, raised there as its own type
            text = json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}})
            out = None
        moved = len(args) + _nbytes(data) + len(text) + _nbytes(out)
        self._count("state", caller, function, moved)
        return text, out

    def _count(self, kind: str, node: str, function: str, nbytes: int) -> None:
        table = self.traffic if kind == "state" else self.remote_reads
        with self._counting:
            table[node] = table.get(node, 0) + nbytes
            key = (kind, node, function)
            self.by_function[key] = self.by_function.get(key, 0) + nbytes

    def hand(self, key: str, ref: list[Any], node: str, nbytes: int) -> None:
        """Keep the ref (in a list: Ray passes it unresolved) of a handed-off blob, and
        have Ray bring the object to this node meanwhile: it is read here soon (a
        leaf's partial, by the root, which runs next to this host)."""
        with self._counting:
            self.handed[key] = (ref, node, nbytes)
            self._handed_now.notify_all()
        if node != self._node():
            threading.Thread(target=_fetch, args=(ref,), name=f"fetch {key}",
                             daemon=True).start()

    def _node(self) -> str:
        if not self.node_id:
            import ray

            self.node_id = str(ray.get_runtime_context().get_node_id())
        return self.node_id

    def handed_off(self, key: str) -> tuple[list[Any], str, int] | None:
        with self._counting:
            return self.handed.get(key)

    def await_handed(self, keys: list[str], timeout_s: float
                     ) -> dict[str, tuple[list[Any], str, int]]:
        """Those of ``keys`` handed off so far; when none is, waits up to ``timeout_s``
        for one (a reader waiting for several blobs learns of each as it comes, with one
        call rather than a call per blob and per look)."""
        deadline = time.monotonic() + min(max(0.0, timeout_s), AWAIT_AT_MOST_S)
        with self._handed_now:
            while True:
                got = {k: self.handed[k] for k in keys if k in self.handed}
                left = deadline - time.monotonic()
                if got or left <= 0:
                    return got
                self._handed_now.wait(left)

    def handed_keys(self, prefix: str) -> list[str]:
        with self._counting:
            return [k for k in self.handed if k.startswith(prefix)]

    def drop(self, key: str) -> bool:
        with self._counting:
            return self.handed.pop(key, None) is not None

    def moved(self, node: str, nbytes: int, function: str = "") -> None:
        self._count("read", node, function, nbytes)

    def where(self) -> dict[str, Any]:
        """This host's node and the bytes it exchanged with callers on each node."""
        import ray

        with self._counting:
            traffic, reads = dict(self.traffic), dict(self.remote_reads)
            by_function: dict[str, dict[str, dict[str, int]]] = {}
            for (kind, node, function), n in self.by_function.items():
                by_function.setdefault(kind, {}).setdefault(node, {})[function] = n
        return {"node": ray.get_runtime_context().get_node_id(),
                "bytes_by_caller_node": traffic, "remote_read_bytes_by_node": reads,
                "bytes_by_node_function": by_function}


def _fetch(refs: list[Any]) -> None:
    """Copy objects of other nodes into this node's object store (a reader here then
    maps them in place); one that cannot come is left to the reader, who says why."""
    import ray

    try:
        ray.wait(refs, num_returns=len(refs), timeout=FETCH_TIMEOUT_S, fetch_local=True)
    except Exception:  # (the reader's own pull reports it)
        return
