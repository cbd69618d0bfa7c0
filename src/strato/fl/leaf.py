"""A node's leaf and its sender (a backend with several nodes, e.g. Ray): the engine on
the node where a round's updates lie, in front of the aggregator's root.

The root hands the ``leaf`` function of a node the updates lying there, as references;
the leaf maps each update's file in place and adds it in the same engine as on one
machine, and when asked writes one partial (the weighted mean and the total weight of
what it holds) for the root. The node's ``send_up`` function, beside it, sends a round's
late update up as it is when it would be alone in the leaf's next partial, so that it
never waits behind the leaf's partial of the updates before."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.aggregation import Cluster, RoundHandle, attach_input, file_ref, release_input
from strato.codec import decode, encode, encode_into, encoded_size, read_header
from strato.control.autoscaler import TreeShape
from strato.errors import CodecError, CorruptBlob, LayoutError, NotFound, StratoError
from strato.fl._engine import (
    BATCH,
    KEEP_ALIVE_S,
    NONFINITE,
    OUT_SLACK,
    ROUND_TIMEOUT_S,
    Invoke,
    _in_node_memory,
    _Landed,
    _model_ref,
    _warm_one,
    partial_key,
)
from strato.params import Layout, Params
from strato.services import Services
from strato.strategy import all_finite

__all__ = ["leaf", "send_up"]


def send_up(svc: Services, event: dict[str, Any], invoke: Invoke) -> dict[str, Any]:
    """A node's sender, beside its leaf: ``{"forward": key, "updates": [one], ...}`` (a
    generation of one update, a round's late update on this node) sends that update up
    as it is: its blob, copied once from its file to where the root reads it, under
    ``key``, with no pass over it here (the root checks its values as it adds them). Its
    own function, so that it never waits behind the leaf's partial of the updates
    before. When the update's file is not a blob of this node (gone, damaged), the rest
    of the event goes to this node's leaf, whose partial says what became of it."""
    if "warm" in event:  # (the root keeps it warm: nothing to send)
        return {"warm": True}
    key, updates = str(event["forward"]), list(event.get("updates", []))
    try:
        if len(updates) != 1:
            raise StratoError("sent up as it is: one update at a time")
        path, offset, length = svc.blobs.locate(str(updates[0]["blob"]))  # type: ignore[attr-defined]
        mapped = file_ref(path, offset, length)
        view: memoryview | None = attach_input(mapped)
    except (StratoError, LayoutError):
        invoke("leaf", {k: v for k, v in event.items() if k != "forward"},
               node=str(getattr(svc.blobs, "node_id", "")) or None)
        return {"to_leaf": True}
    try:
        svc.blobs.put(key, view)
    finally:
        view = None  # (no view of the mapping left when it is let go)
        release_input(mapped)
    return {"forwarded": key}


class _Leaf:
    """The engine on one node for updates that lie there: it adds what the root hands
    it (mapping each update's file in place) and, when asked, writes its partial (the
    weighted mean and the total weight) for the root. One generation at a time; a
    generation it does not hold when asked (a worker that replaced another) is an empty
    partial, and the root hands those updates over again."""

    def __init__(self, svc: Services, job: dict[str, Any]) -> None:
        self.svc, self.job = svc, job
        self.layout = Layout.from_json(job["layout"])
        self.cluster = Cluster.local(1, cores=float(os.cpu_count() or 1), executor="threads",
                                     keep_alive_s=KEEP_ALIVE_S)
        self.current: tuple[int, str, int] | None = None
        self.handle: RoundHandle | None = None
        self.clients: list[str] = []
        self.unreadable: dict[str, str] = {}
        self.lost: list[str] = []
        self.corrupt: list[str] = []
        self.done: list[threading.Event] = []
        self.ref_lease: Any = None  # the round's model in node memory (a norm bound)
        self.out: npt.NDArray[np.uint8] | None = None  # the partial's encoding, reused
        all_finite(np.zeros(1, dtype=np.float32))  # its kernel loaded now, not in a close

    def add(self, r: int, tag: str, gen: int, quota: int, updates: list[dict[str, Any]]) -> int:
        if self.current != (r, tag, gen):
            self._drop()
            acc = "F32" if self.job["config"].get("accumulator") == "float32" else "F64"
            plan = self.cluster.plan(TreeShape.of(1), {"n0": max(1, quota)})
            dist_ref = None
            if float(self.job["config"].get("max_update_norm", 0.0)) > 0:
                dist_ref, self.ref_lease = _model_ref(self.svc, self.cluster, self.layout, r)
            self.handle = self.cluster.begin_round(r, plan, nbytes=self.layout.nbytes,
                                                   batch=BATCH, acc_dtype=acc,
                                                   dist_ref=dist_ref)
            self.current, self.clients, self.unreadable = (r, tag, gen), [], {}
            self.lost, self.corrupt = [], []
        assert self.handle is not None
        for u in updates:
            client, blob = str(u["client"]), str(u["blob"])
            try:
                landed = self._landed(blob)
            except NotFound:  # gone (its node's files were removed): made again
                self.lost.append(client)
                continue
            except CorruptBlob:  # damaged on disk: made again too
                self.corrupt.append(client)
                continue
            except (StratoError, CodecError) as exc:
                self.unreadable[client] = f"update blob is unreadable: {exc}"
                continue
            if isinstance(landed, str):
                self.unreadable[client] = landed
                continue
            done = landed._done
            if self.handle.arrive("n0", landed, client=client,  # type: ignore[arg-type]
                                  weight=float(u["weight"])):
                self.clients.append(client)
                self.done.append(done)
        self.handle.flush()
        for done in self.done:
            if not done.wait(ROUND_TIMEOUT_S):
                raise StratoError("the aggregation engine did not add an update in time")
        self.done.clear()
        return len(updates)

    def _landed(self, blob: str) -> _Landed | str:
        """An update as the engine's input: its file mapped in place when it lies on this
        node, else read from where it lies into this node's memory (the round-robin
        placement's leaves); a string says why it cannot be added."""
        try:
            path, offset, length = self.svc.blobs.locate(blob)  # type: ignore[attr-defined]
        except (NotFound, CorruptBlob):
            raise
        except StratoError:  # it lies on another node
            path = ""
        if path:
            view = attach_input(file_ref(path, offset, length))
            layout, _meta, start = read_header(view)
            if layout != self.layout:
                return f"wrong layout: {self.layout.describe_mismatch(layout)}"
            return _Landed(file_ref(path, offset + start, self.layout.nbytes), view[start:],
                           threading.Event())
        params = decode(self.svc.blobs.get(blob), expect=self.layout)
        lease = _in_node_memory(self.cluster, self.layout, params.flat())
        return _Landed({**lease.ref.to_dict()}, lease.buffer, threading.Event(), lease)

    def _partial_key(self, r: int, tag: str, gen: int) -> str:
        return partial_key(r, tag, str(getattr(self.svc.blobs, "node_id", "")), gen)

    def _put_partial(self, key: str, r: int, flat: npt.NDArray[np.float32], weight: str,
                     clients: list[str], *, bad: dict[str, str] | None = None,
                     lost: list[str] | None = None, corrupt: list[str] | None = None,
                     dist: dict[str, float] | None = None) -> None:
        """Write a partial: ``flat`` (the weighted mean) and what the root reads of it."""
        meta = {"round": str(r), "weight": weight, "clients": json.dumps(clients),
                "bad": json.dumps(bad or {}), "lost": json.dumps(lost or []),
                "corrupt": json.dumps(corrupt or []), "dist": json.dumps(dist or {})}
        self.svc.blobs.put(key, self._encoded(Params(self.layout, flat.view(np.uint8)), meta))

    def flush(self, r: int, tag: str, gen: int) -> dict[str, Any]:
        key = self._partial_key(r, tag, gen)
        if self.current != (r, tag, gen) or self.handle is None:  # an empty partial
            meta = {"round": str(r), "weight": "0", "clients": "[]", "bad": "{}"}
            self.svc.blobs.put(key, encode(Params(self.layout), meta).payload)
            return {"partial": key, "updates": 0}
        if not self.clients:  # none reached the engine (each gone, damaged or unreadable)
            self._drop()
            self._put_partial(key, r, np.zeros(self.layout.numel, dtype=np.float32), "0", [],
                              bad=self.unreadable, lost=self.lost, corrupt=self.corrupt)
            return {"partial": key, "updates": 0}
        handle, self.handle, self.current = self.handle, None, None
        handle.close()
        result = handle.result(timeout=ROUND_TIMEOUT_S)
        try:
            bad = {c: NONFINITE for c in result.bad} | self.unreadable
            flat = (np.ascontiguousarray(result.array, dtype=np.float32) if result.updates
                    else np.zeros(self.layout.numel, dtype=np.float32))
            self._put_partial(key, r, flat, repr(float(result.weight)) if result.updates
                              else "0", [c for c in self.clients if c not in bad], bad=bad,
                              lost=self.lost, corrupt=self.corrupt, dist=handle.distances())
        finally:
            result.release()
            self._release_ref()
        return {"partial": key, "updates": int(result.updates)}

    def _encoded(self, params: Params, meta: dict[str, str]) -> memoryview:
        """The partial's encoding, in this leaf's own buffer: one pass over warm memory
        (fresh memory is slow to touch the first time). ``put`` copies it, so the
        buffer serves the next flush."""
        size = encoded_size(params, meta)
        if self.out is None or self.out.nbytes < size:
            self.out = np.empty(size + OUT_SLACK, dtype=np.uint8)  # room for more clients
        return memoryview(self.out.data)[: encode_into(params, self.out, meta)]

    def _drop(self) -> None:
        handle, self.handle, self.current = self.handle, None, None
        self.done.clear()
        if handle is not None and not handle.finished:
            handle.close()
            with contextlib.suppress(Exception):
                handle.result(timeout=60).release()
        self._release_ref()

    def _release_ref(self) -> None:
        if self.ref_lease is not None:
            self.ref_lease.release()
            self.ref_lease = None

    def shutdown(self) -> None:
        self._drop()
        self.cluster.close()


def leaf(svc: Services, event: dict[str, Any]) -> dict[str, Any]:
    """A node's leaf: ``{"add": r, "tag", "gen", "quota", "updates": [...]}`` adds
    updates lying on this node; ``{"flush": r, "tag", "gen"}`` writes the partial; an
    event with both adds, then writes."""
    agent: _Leaf = _warm_one(svc, "leaf", _Leaf)
    tag, gen = str(event["tag"]), int(event["gen"])
    out: dict[str, Any] = {}
    if "add" in event:
        out["added"] = agent.add(int(event["add"]), tag, gen, int(event.get("quota", 1)),
                                 list(event.get("updates", [])))
    if "flush" in event:
        out |= agent.flush(int(event["flush"]), tag, gen)
    return out
