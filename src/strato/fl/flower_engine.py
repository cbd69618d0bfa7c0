"""A Flower strategy's train replies, aggregated eagerly by Strato's engine.

Flower's FedAvg and the strategies built on it (FedAvgM, FedProx, FedAdam, FedYogi,
FedAdagrad) average the train replies' arrays with ``aggregate_arrayrecords`` once a
round's replies are all in, and then apply their server step. In a Strato run each
train reply is instead added by the aggregation engine (``strato.aggregation``) the
moment its function returns: its frame's tensor section, float32 arrays in the dense
codec, is the engine's input as it is, weighted by the reply's ``num-examples``.
When the strategy asks for the average, it gets the engine's (float64 sums), as long
as it asks for exactly the replies the engine added, weighted by ``num-examples``.
Otherwise (a strategy that picks some replies, as Krum does; another weighting key;
arrays that are not all float32; more than one ArrayRecord) Flower's own function
answers, on the same replies: the strategy works either way.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from strato.aggregation import Cluster, RoundHandle
from strato.codec import decode
from strato.control.autoscaler import TreeShape
from strato.params import Layout

__all__ = ["EagerTrain", "patched_strategies"]

WEIGHT_KEY = "num-examples"  # Flower's strategies' default weighting key
RESULT_TIMEOUT_S = 120.0


class EagerTrain:
    """One train batch at a time: its replies added as they come, its average on ask."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cluster: Cluster | None = None
        self._handle: RoundHandle | None = None
        self._layout: Layout | None = None
        # id(reply content) -> its ArrayRecord and Arrays as added: a strategy that
        # replaces them before it averages (server-side DP clipping) gets Flower's average
        self._added: dict[int, tuple[Any, tuple[Any, ...]]] = {}
        self._template: Any = None  # the first reply's ArrayRecord: names and shapes
        self._expected = 0
        self._number = 0
        self._eligible = True
        self._open = False  # a batch began and the strategy has not asked for it yet
        self.engine_rounds = 0  # batches the strategy took the engine's average of
        self.flower_rounds = 0  # batches it averaged with Flower's own function

    def begin(self, number: int, expected: int) -> None:
        """A new batch of ``expected`` train messages (round ``number``)."""
        with self._lock:
            self._settle()
            self._number, self._expected, self._eligible = number, expected, True
            self._open = True

    def _settle(self) -> None:
        """The batch before: one the strategy did not ask the engine about (FedMedian,
        Krum, a strategy of the app's own) was averaged by the strategy's own code."""
        if self._open:
            self.flower_rounds += 1
            self._open = False
        self._drop()

    def add(self, node: str, frame: Any, reply: Any) -> None:
        """A train reply came in (``frame``: its bytes; ``reply``: the decoded message)."""
        with self._lock:
            if not self._eligible or reply.has_error():
                return
            content = reply.content
            records = list(content.array_records.values())
            metrics = list(content.metric_records.values())
            weight = metrics[0].get(WEIGHT_KEY) if metrics else None
            params = decode(frame)
            if (len(records) != 1 or not isinstance(weight, (int, float)) or weight <= 0
                    or len(params) != len(records[0])
                    or any(spec.dtype != "F32" for spec in params.layout.tensors)):
                self._eligible = False
                return
            if len(self._added) >= self._expected:  # more than the round was planned for
                self._eligible = False
                return
            if self._handle is None:
                self._start(params.layout, records[0])
            elif (params.layout != self._layout
                  or list(records[0].keys()) != list(self._template.keys())):
                self._eligible = False  # Flower averages by name: so must the engine
                return
            assert self._handle is not None
            if self._handle.ingest("n0", params.buffer, client=node, weight=float(weight)):
                self._added[id(content)] = (records[0], tuple(records[0].values()))

    def _start(self, layout: Layout, template: Any) -> None:
        if self._cluster is None:
            self._cluster = Cluster.local(1, cores=float(os.cpu_count() or 1),
                                          executor="threads")
        plan = self._cluster.plan(TreeShape.of(1), {"n0": max(1, self._expected)})
        self._handle = self._cluster.begin_round(self._number, plan, nbytes=layout.nbytes,
                                                 acc_dtype="F64")
        self._layout, self._template = layout, template

    def average(self, records: list[Any], key: str) -> Any:
        """The engine's average of ``records`` (an ArrayRecord), or None when it has not
        added exactly these replies weighted by ``key``."""
        from flwr.app import Array, ArrayRecord

        with self._lock:
            if (not self._eligible or self._handle is None or key != WEIGHT_KEY
                    or not self._unchanged(records)):
                self._settle()
                return None
            try:
                self._handle.close()
                result = self._handle.result(RESULT_TIMEOUT_S)
            except Exception:  # the engine failed: Flower's own code answers
                self._settle()
                return None
            flat = result.array.copy()
            bad = result.bad
            result.release()
            if bad:  # a NaN or ±Inf update: Flower's average carries it, as Flower's does
                self._handle = None
                self._settle()
                return None
            self._open = False
            assert self._layout is not None
            names = list(self._template.keys())  # the frame names them "<item>.<index>"
            arrays = {}
            for spec in sorted(self._layout.tensors,
                               key=lambda t: int(t.name.partition(".")[2])):
                values = flat[spec.offset // 4: spec.end // 4].reshape(spec.shape)
                arrays[names[int(spec.name.partition(".")[2])]] = Array(np.asarray(values))
            self._handle, self._added = None, {}
            self.engine_rounds += 1
            return ArrayRecord(arrays)

    def _unchanged(self, records: list[Any]) -> bool:
        """``records`` are the replies added, each with the arrays it had then."""
        if sorted(id(r) for r in records) != sorted(self._added):
            return False
        for content in records:
            record, arrays = self._added[id(content)]
            now = list(content.array_records.values())
            if len(now) != 1 or now[0] is not record or len(now[0]) != len(arrays) or any(
                    a is not b for a, b in zip(now[0].values(), arrays, strict=True)):
                return False
        return True

    def _drop(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            handle.close()
            with contextlib.suppress(Exception):
                handle.result(RESULT_TIMEOUT_S).release()
        self._added = {}

    def close(self) -> None:
        with self._lock:
            self._settle()
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None


@contextlib.contextmanager
def patched_strategies(engine: EagerTrain) -> Iterator[None]:
    """While the ServerApp runs: Flower's FedAvg family asks ``engine`` for its average."""
    from flwr.serverapp.strategy import fedavg

    name = "aggregate_arrayrecords"  # what FedAvg.aggregate_train calls, by this name
    original: Callable[[list[Any], str], Any] = getattr(fedavg, name)

    def aggregate_arrayrecords(records: list[Any], weighting_metric_name: str) -> Any:
        averaged = engine.average(list(records), weighting_metric_name)
        return original(records, weighting_metric_name) if averaged is None else averaged

    setattr(fedavg, name, aggregate_arrayrecords)
    try:
        yield
    finally:
        setattr(fedavg, name, original)
