"""A cluster of nodes aggregating one round at a time.

::

    cluster = Cluster.local(2, cores=2.0)                           # two nodes, one machine
    plan = cluster.plan(TreeShape.of(4), landing={"n0": 60, "n1": 40})
    rnd = cluster.begin_round(7, plan, nbytes=model.nbytes)
    rnd.ingest("n0", update, client="c1", weight=120.0)   # copy into shm + arrive
    ...                                                   # (or lease_update + arrive)
    result = rnd.result(timeout=60)    # the weighted mean, in the root's shared memory
    model = result.array.copy(); result.release()

The coordinator decides when a round stops taking updates (quorum or deadline) and
calls ``close()``; a round whose expected updates all arrived completes by itself.
A client arriving twice in a round is counted once (every channel is at-least-once),
unless a leaf left its first update out as non-finite.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from strato.aggregation._inputs import Accumulator
from strato.aggregation._kernels import DTYPES
from strato.aggregation._messages import AggregatorStats, Arrived
from strato.aggregation._round import RoundPlan, RoundResult, RoundSetup, RoundStats
from strato.aggregation.node import Node, UpdateLease
from strato.control.autoscaler import TreeShape
from strato.control.placement import NodeCapacity, build_tree, place_best_fit, place_round_robin
from strato.errors import ConfigError, StratoError

__all__ = ["Cluster", "RoundHandle"]


class Cluster:
    def __init__(self, nodes: Sequence[Node]) -> None:
        names = [n.name for n in nodes]
        if not nodes or len(set(names)) != len(names):
            raise ConfigError(f"a cluster needs nodes with unique names, got {names}")
        self.nodes: dict[str, Node] = {n.name: n for n in nodes}
        self._current: RoundHandle | None = None

    @classmethod
    def local(
        cls, count: int = 1, *, cores: float = 1.0, executor: str = "auto", **node: Any
    ) -> Cluster:
        """``count`` nodes named n0, n1, … in this process (each with its own shm)."""
        return cls([Node(f"n{i}", cores=cores, executor=executor, **node) for i in range(count)])

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise ConfigError(f"no node named {name!r} (nodes: {', '.join(self.nodes)})") from None

    @property
    def capacities(self) -> list[NodeCapacity]:
        return [n.capacity for n in self.nodes.values()]

    def plan(
        self,
        shape: TreeShape,
        landing: Mapping[str, int],
        *,
        policy: str = "best-fit",
        leaf_demand: float = 1.0,
        parent_demand: float = 0.25,
    ) -> RoundPlan:
        """Name the tree's aggregators and place them on this cluster's nodes."""
        for name in landing:
            self.node(name)
        tree = build_tree(shape, landing, leaf_demand=leaf_demand, parent_demand=parent_demand)
        if policy == "best-fit":
            placement = place_best_fit(tree, self.capacities)
        elif policy == "round-robin":
            placement = place_round_robin(tree, self.capacities)
        else:
            raise ConfigError(f"placement policy must be best-fit or round-robin, not {policy!r}")
        return RoundPlan(tree, placement)

    def begin_round(
        self,
        round_no: int,
        plan: RoundPlan,
        *,
        nbytes: int,
        dtype: str = "F32",
        acc_dtype: str = "F32",
        batch: int = 4,
        dist_ref: dict[str, Any] | None = None,
    ) -> RoundHandle:
        """Start aggregating round ``round_no`` of a model of ``nbytes`` bytes of ``dtype``.

        ``acc_dtype`` is what sums are kept in: F32 (default) is one fused pass per batch, at
        float32 rounding (error ≲ n·eps32 of the terms' magnitude, like Flower's and
        PyTorch's float32 FedAvg); F64 makes any tree equal the flat float64 weighted
        mean to 1e-6 relative error even when signs cancel, at about 1.7× the
        aggregation time (its accumulator traffic is twice as large; docs/lifl.md).
        ``batch``: a leaf waits for this many inputs before a pass over memory (except
        at the end of its quota, where it takes each input at once, or when the node's
        ingest budget is full; the node caps it at half the budget's slots). Measured
        at 100 × 10M: 4 gives 0.68-0.77 of the floor with no back-pressure; 8 (capped
        to 6) gains little and stalls arrivals on the budget (docs/lifl.md).
        ``dist_ref``: a reference (shared memory or file, see ``_inputs``) to the round's
        F32 model; each leaf then measures every update's squared distance to it in the
        pass that adds it (``RoundHandle.distances``: what a norm bound needs)."""
        if self._current is not None and not self._current.finished:
            raise StratoError(f"round {self._current.round} is still running")
        for kind in (dtype, acc_dtype):
            if kind not in DTYPES:
                raise ConfigError(f"LIFL works in {' or '.join(DTYPES)}, not {kind!r}")
        if DTYPES[acc_dtype].itemsize < DTYPES[dtype].itemsize:
            raise ConfigError(f"cannot accumulate a {dtype} model in {acc_dtype}")
        if nbytes <= 0 or nbytes % DTYPES[dtype].itemsize:
            raise ConfigError(f"{nbytes} bytes is not a whole number of {dtype} values")
        if batch < 1:
            raise ConfigError(f"batch must be ≥ 1, got {batch}")
        where = plan.placement.as_dict()
        for agg, node_name in where.items():
            if node_name not in self.nodes:
                raise ConfigError(f"aggregator {agg} is placed on unknown node {node_name!r}")
        handle = RoundHandle(self, round_no, plan, nbytes, dtype)
        setup = RoundSetup(
            round=round_no,
            tree=plan.tree,
            where=where,
            addresses={n.name: n.endpoint.address for n in self.nodes.values()},
            dtype=dtype,
            nbytes=nbytes,
            acc_dtype=acc_dtype,
            acc_nbytes=nbytes // DTYPES[dtype].itemsize * DTYPES[acc_dtype].itemsize,
            batch=batch,
            deliver=handle._deliver,
            fail=handle._fail,
            dist_ref=dist_ref,
        )
        self._current = handle
        for node in self.nodes.values():
            node.dispatcher.post("begin", setup)
        return handle

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RoundHandle:
    def __init__(
        self, cluster: Cluster, round_no: int, plan: RoundPlan, nbytes: int, dtype: str
    ) -> None:
        self.cluster = cluster
        self.round = round_no
        self.plan = plan
        self.nbytes = nbytes
        self.dtype = dtype
        self._future: Future[RoundResult] = Future()
        self._lock = threading.Lock()
        self._clients: set[str] = set()
        self._billed0 = {n: node.billed_s() for n, node in cluster.nodes.items()}
        self._cold0 = {n: node.cold_starts() for n, node in cluster.nodes.items()}
        # Counted where the bytes arrive: a receiver counts a payload before it hands the
        # input on, so every byte the round used is counted once its result is ready (a
        # sender counts only after sendall returns, which may be after the round ends).
        self._received0 = {
            n: node.endpoint.payload_bytes_received for n, node in cluster.nodes.items()
        }
        self._waited0 = {n: node.backpressure_s for n, node in cluster.nodes.items()}

    @property
    def finished(self) -> bool:
        return self._future.done()

    def arrive(self, node: str, lease: UpdateLease, *, client: str, weight: float) -> bool:
        """An update landed in ``lease`` on ``node``; False (and the lease released) if this
        client already arrived this round."""
        target = self.cluster.node(node)
        if not (math.isfinite(weight) and weight > 0):
            lease.release()
            raise StratoError(
                f"client {client!r}: weight must be positive and finite, got {weight}"
            )
        if lease.nbytes != self.nbytes:
            lease.release()
            raise StratoError(
                f"client {client!r}: update of {lease.nbytes} bytes, the model has {self.nbytes}"
            )
        with self._lock:
            # a client whose update a leaf found bad may send again
            if client in self._clients and client not in self.bad_clients():
                lease.release()
                return False
            self._clients.add(client)
        desc = Arrived(
            self.round, client, lease.ref, float(weight), lease.requested_at, time.monotonic()
        )
        target.dispatcher.post("arrive", desc, lease)
        return True

    def ingest(
        self,
        node: str,
        data: Any,
        *,
        client: str,
        weight: float,
        timeout: float | None = None,
        requested_at: float | None = None,
    ) -> bool:
        """Copy an update into the node's shared memory and ``arrive`` it (the in-process
        stand-in for a gateway receiving it into place); see ``Node.lease_update``."""
        source = np.frombuffer(data, dtype=np.uint8)
        if source.nbytes != self.nbytes:
            raise StratoError(
                f"client {client!r}: update of {source.nbytes} bytes, the model has {self.nbytes}"
            )
        lease = self.cluster.node(node).lease_update(
            self.nbytes, timeout, requested_at=requested_at
        )
        np.copyto(np.frombuffer(lease.buffer, dtype=np.uint8), source)
        return self.arrive(node, lease, client=client, weight=weight)

    def flush(self) -> None:
        """Have the leaves add what they hold now, without waiting for full batches."""
        for node in self.cluster.nodes.values():
            node.dispatcher.post("flush", self.round)

    def distances(self) -> dict[str, float]:
        """Each added update's squared distance to the round's model (``dist_ref``)."""
        dist: dict[str, float] = {}
        for node in self.cluster.nodes.values():
            r = node.dispatcher.history.get(self.round)
            dist.update(r.dist if r is not None else {})
        return dist

    def waiting(self) -> int:
        """Inputs its leaves hold without having started to add them (a leaf waiting
        for a full batch); read from other threads while the round runs."""
        count = 0
        for node in self.cluster.nodes.values():
            r = node.dispatcher.round
            if r is not None and r.setup.round == self.round:
                count += sum(len(a.pending) for a in list(r.aggs.values()) if a.spec.is_leaf)
        return count

    def bad_clients(self) -> list[str]:
        """Clients whose update a leaf left out so far (NaN or ±Inf)."""
        bad: list[str] = []
        for node in self.cluster.nodes.values():
            r = node.dispatcher.history.get(self.round)
            bad.extend(r.bad if r is not None else ())
        return bad

    def close(self) -> None:
        """No more arrivals: aggregate what came and finish."""
        for node in self.cluster.nodes.values():
            node.dispatcher.post("close", self.round)

    def result(self, timeout: float | None = None) -> RoundResult:
        try:
            return self._future.result(timeout)
        except FutureTimeout:
            raise TimeoutError(f"round {self.round} did not finish in {timeout} s") from None

    # ---- called from the nodes' dispatcher threads --------------------------------------

    def _deliver(self, key: str, model: Accumulator, weight: float, updates: int,
                 at: float) -> None:
        node = self.cluster.node(self.plan.placement.node_of(self.plan.tree.root.name))
        array = np.frombuffer(model.buffer, dtype=DTYPES[self.dtype])
        released = threading.Event()

        def give_back() -> None:
            if not released.is_set():
                released.set()
                node.take_back(key, model)

        result = RoundResult(
            self.round, array, weight, updates, at, give_back, tuple(self.bad_clients())
        )
        with self._lock:
            if not self._future.done():
                self._future.set_result(result)
                return
        give_back()  # the round was failed meanwhile

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            if self._future.done():
                return
            self._future.set_exception(exc)
        for node in self.cluster.nodes.values():
            node.dispatcher.post("abort", self.round)

    # ---- accounting ----------------------------------------------------------------------

    def stats(self) -> RoundStats:
        aggregators: list[AggregatorStats] = []
        arrivals: list[float] = []
        landed: list[float] = []
        ready_at, refused, ingested = None, 0, 0
        for node in self.cluster.nodes.values():
            r = node.dispatcher.history.get(self.round)
            if r is None:
                continue
            aggregators.extend(a.stats for a in r.aggs.values())
            arrivals.extend(r.arrivals)
            landed.extend(r.landed)
            refused += r.refused
            ingested += r.ingested_bytes
            if r.ready_at is not None:
                ready_at = r.ready_at
        nodes = self.cluster.nodes
        return RoundStats(
            round=self.round,
            shape=self.plan.shape,
            placement=self.plan.placement,
            executor=next(iter(nodes.values())).executor_for(self.nbytes).kind,
            aggregators=aggregators,
            arrivals=sorted(arrivals),
            landed=sorted(landed),
            ready_at=ready_at,
            refused=refused,
            ingested_bytes=ingested,
            cross_node_bytes=sum(
                n.endpoint.payload_bytes_received - self._received0[k] for k, n in nodes.items()
            ),
            billed_s=sum(n.billed_s() - self._billed0[k] for k, n in nodes.items()),
            cold_starts=sum(n.cold_starts() - self._cold0[k] for k, n in nodes.items()),
            backpressure_s=sum(n.backpressure_s - self._waited0[k] for k, n in nodes.items()),
        )
