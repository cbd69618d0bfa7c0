"""Joining Ray, and the state host: where a run's durable state lives on a cluster.

``ensure_ray(config)`` joins the cluster ``config["address"]`` (or ``RAY_ADDRESS``)
names, or starts a local Ray of its own when there is none (and does nothing inside a
Ray worker, which has joined already). Every Strato process of a run then reaches the
run's durable state through one actor, the **state host**, placed on the head node:
it keeps the embedded backend's SQLite table, SQLite bus and blob directory under the
run's ``root`` on the head's disk. Worker nodes hold nothing durable, so losing one
loses nothing but the work in flight there; a head that restarts reopens the same files.

Calls to the host carry JSON text and raw bytes only (and, for a handed-off blob, the
ref of a Ray object holding its raw bytes): what Ray transports for us is our own
encoding, never a pickled Python object of ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from typing import Any

from strato import errors
from strato.backends.ray._host import wire_bytes

__all__ = ["NAMESPACE", "StateClient", "ensure_ray", "node_id", "raise_remote", "state_client"]

NAMESPACE = "strato"
HEAD_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource
GRACE_S = 5.0  # a state host outlives its last user in the process that made it by this

_LOCK = threading.Lock()


def ensure_ray(config: Mapping[str, Any]) -> Any:
    """The ``ray`` module, joined to the run's cluster."""
    # Ray's notice about GPU variables concerns GPU jobs; Strato asks for no GPU.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray

    with _LOCK:
        if not ray.is_initialized():
            # No address (in the config or RAY_ADDRESS) means a Ray of this process's
            # own: "local" starts one even where another Ray runs on this machine
            # (Ray would otherwise join the latest one started here, whoever's it is).
            address = config.get("address") or os.environ.get("RAY_ADDRESS") or "local"
            options: dict[str, Any] = {"namespace": NAMESPACE, "include_dashboard": False,
                                       "log_to_driver": False, "configure_logging": False}
            if address == "local":  # one node, this machine
                options["num_cpus"] = os.cpu_count() or 1
            try:
                ray.init(address=address, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = "a local Ray" if address == "local" else address
                raise errors.ConfigError(f"cannot join Ray at {where}: {exc}") from None
    return ray


def raise_remote(fields: Mapping[str, Any]) -> None:
    """Raise, in this process, the Strato error a remote call reported."""
    kind = getattr(errors, str(fields.get("type")), None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        kind = errors.StratoError
    raise kind(str(fields.get("message", "")))


FUNCTION_ENV = "STRATO_RAY_FUNCTION"  # set in a function's actor: its name


class StateClient:
    """A handle on the state host of one root, shared by a process's parts of it."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.root = os.path.abspath(str(config["root"]))
        self.name = "strato-state-" + hashlib.sha256(self.root.encode()).hexdigest()[:16]
        self.users = 0
        self.owner = False
        self._actor: Any = None
        self._making = threading.Lock()
        self._host_node: str | None = None
        self._counts: list[Any] = []  # counts told the host, not yet known to be counted

    def actor(self) -> Any:
        with self._making:  # one handle per process: a second one made at once dies
            return self._make()

    def _make(self) -> Any:
        if self._actor is None:
            ray = ensure_ray(self.config)
            try:
                self._actor = ray.get_actor(self.name, namespace=NAMESPACE)
            except ValueError:  # none yet: this process makes it, and stops it on close
                on_head = {HEAD_RESOURCE: 0.001} if _has_head_resource(ray) else {}
                from strato.backends.ray._host import StateHost

                self._actor = ray.remote(StateHost).options(
                    name=self.name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
                    max_concurrency=64, resources=on_head, max_restarts=-1,
                ).remote(self.root)
                self.owner = True
            ray.get(self._actor.ping.remote())
        return self._actor

    def call(self, part: str, method: str, *args: Any, data: Any = None, **kwargs: Any) -> Any:
        """Call ``method`` of the host's ``part``; returns ``(result, bytes | None)``."""
        ray = ensure_ray(self.config)
        self.counted()
        payload = None if data is None else wire_bytes(data)
        request = json.dumps({"args": list(args), "kwargs": kwargs})
        try:
            text, blob = ray.get(self.actor().call.remote(part, method, request, payload,
                                                          node_id(ray), _function()))
        except ray.exceptions.RayActorError:
            # The host went (with the process that made it, or its node): the next call
            # makes a new one on the same files, which held everything durable. This
            # call may or may not have taken effect, so it is not repeated blindly.
            with self._making:
                self._actor, self._host_node = None, None
            raise errors.StratoError(
                f"the run's state host went away during {part}.{method}; the next call "
                "starts a new one on the same files") from None
        reply = json.loads(text)
        if "error" in reply:
            raise_remote(reply["error"])
        return reply.get("result"), blob

    def host_node(self) -> str:
        """The Ray node the state host runs on."""
        if self._host_node is None:
            ray = ensure_ray(self.config)
            self._host_node = str(ray.get(self.actor().where.remote())["node"])
        return self._host_node

    def on_host_node(self) -> bool:
        return self.host_node() == self.node_id()

    def node_id(self) -> str:
        """The Ray node this process runs on."""
        return node_id(ensure_ray(self.config))

    def count_remote(self, nbytes: int, *, wait: bool = True) -> None:
        """Tell the host that ``nbytes`` of a blob of another node crossed to this node.
        The host serves calls on many threads, so a reading of the counts made right
        after could race the count: it is waited for here, or (``wait=False``, a read
        on a round's critical path) before this process's next call to the host."""
        ray = ensure_ray(self.config)
        try:
            told = self.actor().moved.remote(self.node_id(), int(nbytes), _function())
        except ray.exceptions.RayActorError:  # the host went: the read itself stands
            self._lost_host()
            return
        with self._making:
            self._counts.append(told)
        if wait:
            self.counted()

    def counted(self) -> None:
        """Wait until the host has counted what this process told it crossed."""
        with self._making:
            told, self._counts = self._counts, []
        if not told:
            return
        ray = ensure_ray(self.config)
        try:
            ray.get(told)
        except ray.exceptions.RayActorError:  # the host went: the reads themselves stand
            self._lost_host()

    def _lost_host(self) -> None:
        with self._making:
            self._actor, self._host_node = None, None

    def release(self) -> None:
        """One user fewer. The process that made the host stops it a few seconds after
        its last user is gone (a quick reconnect, e.g. a resumed run, finds it warm)."""
        with _LOCK:
            self.users -= 1
            if self.users > 0:
                return
        timer = threading.Timer(GRACE_S, self._expire)
        timer.daemon = True
        timer.start()

    def _expire(self) -> None:
        with _LOCK:
            if self.users > 0:
                return
            if _CLIENTS.get(self.root) is self:
                del _CLIENTS[self.root]
            actor, self._actor = self._actor, None
        if self.owner and actor is not None:
            import ray

            if ray.is_initialized():
                with contextlib.suppress(Exception):
                    ray.kill(actor)


def _function() -> str:
    """The function this process serves ('' outside a function's actor)."""
    return os.environ.get(FUNCTION_ENV, "")


def node_id(ray: Any) -> str:
    """The Ray node this process runs on (asked each time: a process that joins another
    cluster, as a test does, is on another node)."""
    return str(ray.get_runtime_context().get_node_id())


def _has_head_resource(ray: Any) -> bool:
    return any(HEAD_RESOURCE in node.get("Resources", {}) for node in ray.nodes()
               if node.get("Alive"))


_CLIENTS: dict[str, StateClient] = {}


def state_client(config: Mapping[str, Any]) -> StateClient:
    """This process's client of the state host of ``config``'s root (one per root)."""
    root = os.path.abspath(str(config["root"]))
    with _LOCK:
        client = _CLIENTS.get(root)
        if client is None:
            client = _CLIENTS[root] = StateClient(config)
        client.users += 1
    return client
