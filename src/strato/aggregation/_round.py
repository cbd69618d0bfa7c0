"""Plain data of one round: its plan, what nodes are told, its result and its stats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from strato.aggregation._inputs import Accumulator
from strato.aggregation._messages import AggregatorStats
from strato.control.autoscaler import AutoscalerContext, TreeShape
from strato.control.placement import Placement, Tree

__all__ = ["RoundPlan", "RoundResult", "RoundSetup", "RoundStats", "peak_arrival_rate"]


def peak_arrival_rate(arrivals: list[float], window: int | None = None) -> float:
    """Updates per second over the densest run of ``window`` consecutive arrivals
    (default: a tenth of them, at least 5)."""
    times = sorted(arrivals)
    if len(times) < 2:
        return 0.0
    k = min(len(times), window or max(5, len(times) // 10))
    best = 0.0
    for i in range(len(times) - k + 1):
        span = times[i + k - 1] - times[i]
        if span > 0:
            best = max(best, (k - 1) / span)
    if best == 0.0:  # every arrival at the same instant
        return float("inf")
    return best


def _occupancy_per_input(aggs: list[AggregatorStats]) -> float | None:
    """Seconds an aggregator is occupied per input: kernel time plus the typical
    (median) dispatch overhead per invocation. The median keeps a cold start — one
    slow first invocation — from posing as the steady state."""
    inputs = sum(a.inputs for a in aggs)
    if not inputs:
        return None
    overheads = sorted(o for a in aggs for o in a.overheads)
    typical = overheads[len(overheads) // 2] if overheads else 0.0
    calls = sum(a.invocations for a in aggs)
    return (sum(a.busy_s for a in aggs) + typical * calls) / inputs


@dataclass(frozen=True)
class RoundPlan:
    """The tree (who aggregates what) and the placement (where each aggregator runs)."""

    tree: Tree
    placement: Placement

    @property
    def shape(self) -> TreeShape:
        return self.tree.shape


@dataclass
class RoundSetup:
    """What every node's dispatcher gets at the start of a round."""

    round: int
    tree: Tree
    where: dict[str, str]
    addresses: dict[str, tuple[str, int]]
    dtype: str  # the model's (updates arrive in it; the root writes it)
    nbytes: int
    acc_dtype: str  # accumulators' and partials' (F64: the exact path; F32: BLAS saxpy)
    acc_nbytes: int
    batch: int
    deliver: Callable[[str, Accumulator, float, int, float], None]
    fail: Callable[[Exception], None]
    # the round's model, for the leaves to measure each update's distance to it in the
    # pass that adds it (a norm bound); None: not measured
    dist_ref: dict[str, Any] | None = None


@dataclass
class RoundResult:
    round: int
    array: npt.NDArray[Any]  # the global model: a view of the root's shared memory
    weight: float
    updates: int
    ready_at: float  # time.monotonic() when the root's last invocation returned
    _release: Callable[[], None] = field(repr=False)
    bad: tuple[str, ...] = ()  # clients whose update a leaf left out (NaN or ±Inf)

    def release(self) -> None:
        """Give the buffer back for the next round (drop views of ``array`` first)."""
        self._release()


@dataclass
class RoundStats:
    round: int
    shape: TreeShape
    placement: Placement
    executor: str
    aggregators: list[AggregatorStats]
    arrivals: list[float]  # time.monotonic() when each update began to arrive
    landed: list[float]  # ... and when it was wholly in shared memory
    ready_at: float | None
    refused: int
    ingested_bytes: int
    cross_node_bytes: int  # payload bytes sent between nodes this round
    billed_s: float  # function-seconds billed by the executors this round
    cold_starts: int
    backpressure_s: float  # time uploads waited for room on their node (memory budget)

    @property
    def busy_s(self) -> float:
        """Seconds aggregators spent in the kernel (the aggregation's compute)."""
        return sum(a.busy_s for a in self.aggregators)

    @property
    def completion_s(self) -> float | None:
        """Last arrival to global model ready. The last arrival is when the last update
        was wholly in shared memory, less any time uploads waited for room on their node
        (``backpressure_s``: that wait is the aggregation falling behind, so it counts),
        and never before that update began to arrive."""
        if self.ready_at is None or not self.landed:
            return None
        arrived = max(max(self.arrivals), max(self.landed) - self.backpressure_s)
        return self.ready_at - arrived

    @property
    def invocations(self) -> int:
        return sum(a.invocations for a in self.aggregators)

    def peak_rss_kb(self) -> dict[int, int]:
        """Peak RSS of each aggregator process that reported one (pid -> KiB)."""
        out: dict[int, int] = {}
        for a in self.aggregators:
            if a.pid:
                out[a.pid] = max(out.get(a.pid, 0), a.peak_rss_kb)
        return out

    def autoscaler_context(
        self, *, expected_updates: int, cores: float, now: float, **settings: Any
    ) -> AutoscalerContext:
        """What this round measured, as the autoscaler's input for the next one: the
        arrivals (their pattern and peak rate), and the seconds a leaf (and a parent) is
        occupied per input."""
        leaves = [a for a in self.aggregators if a.level == 0 and a.inputs]
        parents = [a for a in self.aggregators if a.level > 0 and a.inputs]
        service = _occupancy_per_input(leaves) or 0.0
        merge = _occupancy_per_input(parents)
        landed = len(self.arrivals)
        rate = peak_arrival_rate(self.arrivals)
        return AutoscalerContext(
            expected_updates=expected_updates,
            arrival_rate=min(rate, 1e9),
            service_s=service,
            update_bytes=self.ingested_bytes // landed if landed else 0,
            cores=cores,
            now=now,
            merge_s=merge,
            arrival_offsets=tuple(t - self.arrivals[0] for t in self.arrivals),
            **settings,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "shape": self.shape.to_dict(),
            "placement": self.placement.as_dict(),
            "executor": self.executor,
            "updates": len(self.arrivals) - self.refused,
            "completion_s": self.completion_s,
            "busy_s": self.busy_s,
            "billed_s": self.billed_s,
            "invocations": self.invocations,
            "cold_starts": self.cold_starts,
            "backpressure_s": self.backpressure_s,
            "cross_node_bytes": self.cross_node_bytes,
            "ingested_bytes": self.ingested_bytes,
            "refused": self.refused,
        }
