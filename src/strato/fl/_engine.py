"""What the aggregator's root (``aggregator``) and a node's leaf and sender (``leaf``)
share: the engine's settings, an update as the engine's input, the round's model as the
leaves' reference, each worker's warm state, and the keys of what a leaf sends up."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from strato.aggregation import Cluster, UpdateLease, attach_input, file_ref, release_input
from strato.codec import decode, read_header
from strato.errors import CorruptBlob, NotFound, StratoError
from strato.fl import state
from strato.params import Layout
from strato.services import Services

# ctx.invoke_async of the invocation at hand: (function, event, node)
Invoke = Callable[..., None]

BATCH = 4  # inputs a leaf adds per pass over memory (see aggregation.Cluster.begin_round)
KEEP_ALIVE_S = 120.0  # an aggregator idle this long ends (scale to zero)
ROUND_TIMEOUT_S = 600.0
NONFINITE = "update holds NaN or Inf values"
OUT_SLACK = 64 * 1024  # a leaf's partial buffer: room for a longer header next time


# Warm state of this worker: the root's agent (engine, autoscaler state, the open
# round), or a node's leaf. An optimisation only: the table and the blobs are the truth.
_warm: dict[str, Any] = {}


class _Landed:
    """An update that lies in memory the engine's leaves can map: a blob file
    (read-only) or a node lease. Released once the leaf has added it. It is its own
    ``ref`` (the engine reads ``ref.to_dict()`` and ``ref.nbytes``)."""

    def __init__(self, ref: dict[str, Any], buffer: memoryview, done: threading.Event,
                 lease: UpdateLease | None = None) -> None:
        self._ref, self.buffer, self.nbytes = ref, buffer, len(buffer)
        self.requested_at = time.monotonic()
        self._done, self._lease = done, lease

    @property
    def ref(self) -> _Landed:
        return self

    def to_dict(self) -> dict[str, Any]:
        return self._ref

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
        else:
            self.buffer = memoryview(b"")
            release_input(self._ref)  # added: its pages need not stay mapped here
        self._done.set()


def _model_ref(svc: Services, cluster: Cluster, layout: Layout, r: int
               ) -> tuple[dict[str, Any], Any]:
    """Round r's input model for the leaves to measure distances to: its blob's file
    mapped in place on this node (no copy), else one copy in node memory (returned
    with it: release it when the round ends)."""
    key = state.model_key(r - 1)
    locate = getattr(svc.blobs, "locate", None)
    try:
        if locate is not None:
            path, offset, length = locate(key)
            _layout, _meta, start = read_header(attach_input(file_ref(path, offset, length)))
            return file_ref(path, offset + start, layout.nbytes), None
    except (NotFound, CorruptBlob):
        raise
    except StratoError:  # on another node: one copy comes over
        pass
    lease = _in_node_memory(cluster, layout, decode(svc.blobs.get(key), expect=layout).flat())
    return {**lease.ref.to_dict()}, lease


def _in_node_memory(cluster: Cluster, layout: Layout, flat: Any) -> UpdateLease:
    """One copy of ``flat`` (values of ``layout``) into a lease of the node's memory,
    where the engine's aggregators read it; release the lease once it is added."""
    lease = cluster.node("n0").lease_update(layout.nbytes, timeout=ROUND_TIMEOUT_S)
    np.copyto(np.frombuffer(lease.buffer, dtype=np.float32), flat, casting="unsafe")
    return lease


def _warm_one(svc: Services, key: str, kind: Any) -> Any:
    """This worker's warm ``kind`` (an agent or a leaf) for ``svc``, made from the job
    record when there is none yet (or it served other services)."""
    held = _warm.get(key)
    if not isinstance(held, kind) or held.svc is not svc:
        if isinstance(held, kind):
            held.shutdown()
        item = svc.table.get(state.JOB, "config")
        if item is None:
            raise NotFound("the run has no job record")
        held = _warm[key] = kind(svc, item.value)
    return held


def partial_key(r: int, tag: str, node: str, gen: int) -> str:
    """The blob of a leaf's partial: round, the root's tag, the node, the generation."""
    return f"partials/{state.round_key(r)}/{tag}/{node[:16]}-{gen}"


def forward_key(partial: str) -> str:
    """The blob of a lone update sent up as it is, in place of partial ``partial``."""
    return f"{partial}-update"
