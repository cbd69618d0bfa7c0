"""The table, the bus and the blob store on Ray: proxies of the state host's parts.

Each proxy method sends its arguments as JSON (bytes apart) to the state host
(``_host``), which runs the embedded part's method there and sends the result back
the same way: items, changes and messages as plain dicts, blob bytes as bytes,
message bodies base64 in the JSON of a batch.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strato.backends.ray._cluster import StateClient, ensure_ray
from strato.backends.ray._host import TABLE_FILE, wire_bytes
from strato.errors import NotFound, StratoError
from strato.services._blobs_local import LocalBlobStore, checksum_tag
from strato.services._doorbell import Listener
from strato.services._table_sqlite import SqliteTable
from strato.services.bus import Filter, Message, TopicSchema
from strato.services.table import Change, Item

__all__ = ["HOMES", "HostTable", "RayBlobStore", "RayBus", "RayTable", "node_dir", "table_for"]

class _Proxy:
    kind = ""

    def __init__(self, client: StateClient, *, user: bool = True) -> None:
        self._client = client
        self._closed = False
        self._user = user  # one of the client's users (released on close)

    def _call(self, method: str, *args: Any, data: Any = None, **kwargs: Any) -> Any:
        return self._client.call(self.kind, method, *args, data=data, **kwargs)[0]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._user:
                self._client.release()


class RayTable(_Proxy):
    """The state host's table, through the host (a process on another node than the
    host's; ``table_for`` gives the one to use)."""

    kind = "table"

    def create_table(self, table: str, *, stream: bool = True) -> None:
        self._call("create_table", table, stream=stream)

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

    def trim_stream(self, table: str, upto: str) -> None:
        self._call("trim_stream", table, upto)

    def listen_stream(self, table: str) -> Listener | None:
        """None: no commit of the host's rings a process of another machine (its stream
        trigger polls)."""
        return None


class HostTable(SqliteTable):
    """The state host's table on the host's machine: its very SQLite file, opened in
    place, as the blob store reads the host's blob directory. The embedded table is
    safe for processes, and its commits ring this machine's doorbell whichever process
    makes them, so a stream trigger here sleeps until one rings; a call costs a
    transaction, not a round trip through the host's actor."""

    def __init__(self, client: StateClient, *, user: bool = True) -> None:
        super().__init__(Path(client.root) / TABLE_FILE)
        self._client, self._user = client, user  # (a user of the client: released on close)

    def close(self) -> None:
        super().close()
        if self._user:
            self._user = False
            self._client.release()


def table_for(client: StateClient, *, user: bool = True) -> RayTable | HostTable:
    """The run's table as this process reaches it: in place on the state host's
    machine, through the host elsewhere."""
    kind = HostTable if client.on_host_node() else RayTable
    return kind(client, user=user)


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
    """Blobs in the state host (read and written in place by processes on its machine),
    except node-local ones (``node_local_blobs`` of the
    config: blobs the application can make again) written on a worker node: those stay
    in that node's directory, and the state host's table ``HOMES`` records the node.

    Handed-off blobs (``handoff_blobs``: written once, read once soon after, and made
    again by the application if lost, such as a leaf's partial) are objects in Ray's
    object store of the writer's node, not files: the state host keeps their refs, the
    reader pulls one once (its bytes cross, counted), and one is lost with the process
    that wrote it (``NotFound``).

    ``locate`` gives a blob's file, offset and length when it lies on this machine (a
    node-local blob of this node; any other blob on the head), for the aggregation
    engine to map in place; ``home`` names the node of a node-local blob (None: the
    state host's), ``node_id`` is this process's node and ``alive`` says whether a node
    is. Reading a blob of another node takes a task there (its bytes cross, counted)."""

    kind = "blobs"

    def __init__(self, client: StateClient, config: Mapping[str, Any]) -> None:
        super().__init__(client)
        self._prefixes = tuple(str(p) for p in config.get("node_local_blobs") or ())
        self._handoffs = tuple(str(p) for p in config.get("handoff_blobs") or ())
        self._root = str(config["root"])
        self.node_id = client.node_id()
        self._on_head = client.on_host_node()
        self._table: RayTable | HostTable | None = None  # node-local blobs' homes, once needed
        self._making = threading.Lock()
        # on the state host's machine, its blob directory is read and written in place
        # (the same atomic files); elsewhere through the host
        self._shared = LocalBlobStore(Path(self._root) / "blobs") if self._on_head else None
        self._local: LocalBlobStore | None = None
        self._homes_made = False
        self._homes_known: dict[str, str] = {}  # node-local blob -> its node, once asked
        # handed-off blobs the host named in ``await_any``: their refs, for the read next
        self._handed_known: dict[str, tuple[list[Any], str, int]] = {}
        self._alive: tuple[float, frozenset[str]] = (0.0, frozenset())

    # ---- where a blob lies --------------------------------------------------------------

    def _node_local(self, key: str) -> bool:
        return bool(self._prefixes) and key.startswith(self._prefixes)

    def _handoff(self, key: str) -> bool:
        return bool(self._handoffs) and key.startswith(self._handoffs)

    def _ask_host(self, method: str, *args: Any) -> Any:
        """A call of the state host's own (handed-off blobs), not of one of its parts."""
        self._client.counted()
        ray = ensure_ray(self._client.config)
        return ray.get(getattr(self._client.actor(), method).remote(*args))

    def _handed(self, key: str) -> tuple[list[Any], str, int] | None:
        """A handed-off blob's ([ref], writer's node, length), if the host keeps it."""
        return self._ask_host("handed_off", key)  # type: ignore[no-any-return]

    def home(self, key: str) -> str | None:
        """The node a node-local blob lies on; None for the state host's blobs."""
        if not self._node_local(key):
            return None
        known = self._homes_known.get(key)
        if known is not None:  # a blob does not move: its node, once known, stays
            return known
        got = self._homes().get(HOMES, key)
        if got is None:
            return None
        node = self._homes_known[key] = str(got.value["node"])
        return node

    def alive(self, node: str) -> bool:
        """Whether Ray node ``node`` is alive (asked at most twice a second)."""
        checked, alive = self._alive
        if time.monotonic() - checked > 0.5:
            ray = ensure_ray({"address": self._client.config.get("address")})
            alive = frozenset(str(n["NodeID"]) for n in ray.nodes() if n.get("Alive"))
            self._alive = (time.monotonic(), alive)
        return node in alive

    def nodes(self) -> list[tuple[str, float]]:
        """The alive nodes blobs can lie on, with their CPUs: this one first."""
        ray = ensure_ray({"address": self._client.config.get("address")})
        alive = [(str(n["NodeID"]), float(n.get("Resources", {}).get("CPU", 0.0)))
                 for n in ray.nodes() if n.get("Alive")]
        return sorted(alive, key=lambda n: (n[0] != self.node_id, n[0]))

    def _homes(self) -> RayTable | HostTable:
        """The table of node-local blobs' homes (made on first use, by one thread)."""
        with self._making:
            if self._table is None:
                self._table = table_for(self._client, user=False)
            if not self._homes_made:
                self._table.create_table(HOMES, stream=False)
                self._homes_made = True
            return self._table

    def _here(self) -> LocalBlobStore:
        """This node's blobs: its own (node-local) ones and its cache of the state host's
        large ones, synced as the state host's blobs are. Unsynced, they are written back
        later (~30 s), and a sync on the same disk meanwhile waits behind them: the
        model's write on the head stalled 0.15-0.46 s behind 1-2 GB of updates when the
        nodes shared one disk. The cache (80 MB a round on the benchmark) is synced for
        the same reason. (Stalls of that write of 0.3-0.5 s in one or two rounds of eight
        remain, with a few MB dirty on the machine: not this; their cause not found.)"""
        if self._local is None:
            self._local = LocalBlobStore(node_dir(self._root, self.node_id) / "blobs")
        return self._local

    def _in_shared(self, key: str) -> bool:
        """On the state host's machine: the blob is in its directory (one stat, no call)."""
        return self._shared is not None and self._shared.exists(key)

    def locate(self, key: str) -> tuple[str, int, int]:
        if self._handoff(key):  # (whether it is there at all: ``get`` says)
            raise StratoError(f"blob {key} is in Ray's object store, not in a file")
        if self._in_shared(key):
            assert self._shared is not None
            return self._shared.locate(key)
        if self._node_local(key) and self._shared is None:
            # one stat here first: a blob in this node's directory lies on this node
            # (its home need not be asked of the state host)
            with contextlib.suppress(NotFound):
                return self._here().locate(key)
        node = self.home(key)
        if node == self.node_id:
            return self._here().locate(key)
        if node is None and self._shared is not None:
            return self._shared.locate(key)  # NotFound
        raise StratoError(f"blob {key} is not on this node ({self.node_id[:12]})")

    def put(self, key: str, data: Any) -> str:
        if self._handoff(key):
            payload = _bytes(data)
            ref = ensure_ray(self._client.config).put(payload)  # copied once, into Ray
            self._ask_host("hand", key, [ref], self.node_id, memoryview(payload).nbytes)
            return key
        if self._node_local(key) and not self._on_head:
            stored = self._here().put(key, data)
            self._homes().put(HOMES, key, {"node": self.node_id})
            return stored
        if self._shared is not None:
            return self._shared.put(key, data)
        return str(self._call("put", key, data=_bytes(data)))

    def put_content(self, data: Any) -> str:
        if self._shared is not None:
            return self._shared.put_content(data)
        return str(self._call("put_content", data=_bytes(data)))

    def get(self, key: str, *, verify: bool = True) -> memoryview:
        if self._handoff(key):  # (Ray checks what it moves: no checksum to verify)
            return self._pull(key)
        if self._in_shared(key):
            assert self._shared is not None
            return self._shared.get(key, verify=verify)
        node = self.home(key)
        if node == self.node_id:
            return self._here().get(key, verify=verify)
        if node is not None:
            return memoryview(self._on_node(node, "get", key, verify))
        if self._shared is not None:
            return self._shared.get(key, verify=verify)
        if not self._node_local(key):  # (those are read once: not worth a copy here)
            digest, length = self._call("stat", key)
            if length >= CACHE_FROM:  # a large blob (a model): once per node, then local
                return self._cached(key, str(digest), verify)
        _, blob = self._client.call("blobs", "get", key, verify=verify)
        return memoryview(blob if blob is not None else b"")

    def _pull(self, key: str) -> memoryview:
        """A handed-off blob: read in place from this node's object store, pulled from
        the writer's node first if it lies there."""
        got = self._handed_known.pop(key, None) or self._handed(key)
        if got is None:
            raise NotFound(f"blob {key} not found")
        (ref,), node, nbytes = got
        ray = ensure_ray(self._client.config)
        try:
            value = ray.get(ref, timeout=PULL_TIMEOUT_S)
        except ray.exceptions.ObjectLostError as exc:  # its writer (or node) is gone
            raise NotFound(f"blob {key} was lost with the process that wrote it "
                           f"({type(exc).__name__})") from None
        except ray.exceptions.RayError as exc:  # (still there: not to be made again)
            raise StratoError(f"blob {key} could not be pulled from node {node[:12]}: "
                              f"{type(exc).__name__}: {exc}") from None
        if node != self.node_id:  # (counted before this process's next call to the host)
            self._client.count_remote(nbytes, wait=False)
        return memoryview(value).cast("B")

    def _cached(self, key: str, digest: str, verify: bool) -> memoryview:
        """A blob of the state host's, through this node's cache: under its key and the
        checksum its header records (one put again under its key has another). Only
        bytes with that very checksum are cached: not those of an unchecked read that
        came damaged, nor those of a blob put again between the two calls."""
        local = self._here()
        cached = f"{NODE_CACHE}/{key}/{digest}"
        try:
            return local.get(cached, verify=verify)
        except NotFound:
            pass
        _, blob = self._client.call("blobs", "get", key, verify=verify)
        data = blob if blob is not None else b""
        if checksum_tag(data, digest.partition("-")[0]) != digest:
            return memoryview(data)  # as read (the host checked it if asked), not cached
        local.put(cached, data)
        # read back from this node's file: the reply lies in Ray's object store (read in
        # place, ``_host.wire_bytes``), which a caller holding it would keep pinned
        del blob, data
        return local.get(cached, verify=False)

    def _on_node(self, node: str, op: str, key: str, verify: bool = True) -> bytes:
        """``op`` on a blob of another node, by a task there."""
        if not self.alive(node):
            raise NotFound(f"blob {key} was lost with node {node[:12]}")
        ray = ensure_ray({"address": self._client.config.get("address")})
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(_node_blob).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        try:
            got = ray.get(task.remote(str(node_dir(self._root, node) / "blobs"), op, key,
                                      verify), timeout=120)
        except ray.exceptions.RayError as exc:
            raise NotFound(f"blob {key} could not be read on node {node[:12]}: "
                           f"{type(exc).__name__}") from None
        if isinstance(got, str):
            raise NotFound(got)
        self._client.count_remote(len(got))
        return bytes(got)

    def exists(self, key: str) -> bool:
        if self._handoff(key):
            return self._handed(key) is not None
        if self._in_shared(key):
            return True
        node = self.home(key)
        if node is not None:
            return node == self.node_id or self.alive(node)
        if self._shared is not None:
            return self._shared.exists(key)
        return bool(self._call("exists", key))

    def await_any(self, keys: list[str], timeout_s: float) -> list[str]:
        """Those of ``keys`` that exist; when none does yet, waits up to ``timeout_s`` for
        a handed-off one to come (one call to the host, which answers as one is handed,
        however many are waited for)."""
        handed = [k for k in keys if self._handoff(k)]
        present = [k for k in keys if not self._handoff(k) and self.exists(k)]
        deadline = time.monotonic() + (0.0 if present else timeout_s)
        while handed:  # (the host holds a wait a few seconds at most: asked again)
            got = self._ask_host("await_handed", handed, deadline - time.monotonic())
            self._handed_known.update(got)
            present += [k for k in handed if k in got]
            if got or time.monotonic() >= deadline:
                break
        return present

    def list(self, prefix: str = "") -> list[str]:
        shared = self._shared.list(prefix) if self._shared is not None else self._call(
            "list", prefix)
        keys = {str(k) for k in shared}
        if any(p.startswith(prefix) or prefix.startswith(p) for p in self._handoffs):
            keys |= set(self._ask_host("handed_keys", prefix))
        if self._prefixes:
            keys |= {item.key for item in self._homes().query(HOMES, prefix)}
        return sorted(keys)

    def delete(self, key: str) -> None:
        if self._handoff(key):  # the host lets go of its ref: the object is freed
            self._handed_known.pop(key, None)
            self._ask_host("drop", key)
            return
        node = self.home(key)
        self._homes_known.pop(key, None)
        if node is None:
            if self._shared is not None:
                self._shared.delete(key)
            else:
                self._call("delete", key)
            return
        if node == self.node_id:
            self._here().delete(key)
        elif self.alive(node):
            self._on_node(node, "delete", key)
        self._homes().delete(HOMES, key)

    def close(self) -> None:
        if not self._closed and self._table is not None:
            self._table.close()
        super().close()


HOMES = "strato_blob_homes"  # node-local blob -> {"node": the Ray node it lies on}
# Blobs of the state host at least this large are read once per node (then from its cache)
CACHE_FROM = 1 << 20
NODE_CACHE = "node-cache"  # a node's copies of the state host's large blobs (models)
PULL_TIMEOUT_S = 120.0  # a handed-off blob's pull from its writer's node


def node_dir(root: str, node: str) -> Path:
    """The directory of a run's node-local blobs on Ray node ``node`` (on that node's
    own disk: its temporary directory)."""
    tag = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "strato-ray" / tag / node[:16]


def _node_blob(directory: str, op: str, key: str, verify: bool) -> bytes | str:
    """A task on a blob's node: its bytes (``get``) or its removal (``delete``); a
    message when it is not there."""
    store = LocalBlobStore(Path(directory))
    try:
        if op == "delete":
            store.delete(key)
            return b""
        return bytes(store.get(key, verify=verify))
    except StratoError as exc:
        return str(exc)


def _bytes(data: Any) -> Any:
    """Blob data as the state host takes it (``_host.wire_bytes``: no copy here)."""
    try:
        return wire_bytes(data)
    except TypeError:
        raise TypeError(f"blob data must be bytes-like, got {type(data).__name__}") from None
