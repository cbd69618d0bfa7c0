"""A Flower strategy's train replies, aggregated eagerly by Strato's engine.

Flower's FedAvg and the strategies built on it (FedAvgM, FedProx, FedAdam, FedYogi,
FedAdagrad) average the train replies' arrays with ``aggregate_arrayrecords`` once a
round's replies are all in, and then apply their server step. In a Strato run each
train reply is instead added by the aggregation engine (``strato.aggregation``) the
moment its function returns: its frame's tensor section, float32 arrays in the dense
codec, is the engine's input as it is, weighted by the reply's ``num-examples``.
When the strategy asks for the average, it gets the engine's (float64 sums).

FedMedian, FedTrimmedAvg, MultiKrum and Krum run on the engine's coordinate-sharded
aggregators (``strato.aggregation.ShardedRound``): each reply's values go to every shard
as they arrive, each shard holds its slice of every reply, and the result is the rule's
(``np.median`` exactly; the trimmed mean and Krum's average to float32 rounding; Krum's
distances are summed over the shards, so an exact tie may pick another reply). They
need a Runtime whose functions share this machine's memory (the embedded backend);
elsewhere their own code answers.

The engine answers only for exactly the replies it added, each with the very arrays it
had then, weighted by ``num-examples``. Otherwise (a strategy that picks some replies
and averages those; replies changed first, as server-side DP clipping does; another
weighting key; arrays that are not all float32, or named otherwise; more than one
ArrayRecord; a NaN or ±Inf) Flower's own code answers, on the same replies: the
strategy works either way.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from strato.aggregation import Cluster, RoundHandle, ShardedRound
from strato.codec import decode
from strato.control.autoscaler import TreeShape
from strato.params import Layout
from strato.services import Runtime
from strato.services.shm import ShmPool

__all__ = ["EagerTrain", "patched_strategies"]

WEIGHT_KEY = "num-examples"  # Flower's strategies' default weighting key
RESULT_TIMEOUT_S = 120.0


class EagerTrain:
    """One train batch at a time: its replies added as they come, its average on ask."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self._lock = threading.Lock()
        self._runtime = runtime  # where coordinate shards run (None: no robust rules)
        self._cluster: Cluster | None = None
        self._handle: RoundHandle | None = None
        self._rule: tuple[str, dict[str, Any]] | None = None  # a robust rule, next batch
        self._batch_rule: tuple[str, dict[str, Any]] | None = None
        self._sharded: ShardedRound | None = None
        self._pool: ShmPool | None = None
        self._leases: list[Any] = []  # robust: each reply's values, until the result
        self._order: list[Any] = []  # the replies' contents, in the order added
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
            self._batch_rule, self._rule = self._rule, None

    def expect(self, rule: str, options: dict[str, Any]) -> None:
        """The next batch is aggregated by a robust rule (``fedmedian``, ``trimmedmean``)."""
        with self._lock:
            self._rule = (rule, options) if self._runtime is not None else None

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
            if self._layout is None:
                if not self._start(params.layout, records[0]):
                    self._eligible = False
                    return
            elif (params.layout != self._layout
                  or list(records[0].keys()) != list(self._template.keys())):
                self._eligible = False  # Flower averages by name: so must the engine
                return
            if self._sharded is not None:  # robust: every shard copies its slice of it
                assert self._pool is not None
                lease = self._pool.lease(params.layout.nbytes)
                np.frombuffer(lease.buffer, np.uint8)[:] = params.buffer
                added = self._sharded.add(node, lease, float(weight))
                self._leases.append(lease)
            else:
                assert self._handle is not None
                added = self._handle.ingest("n0", params.buffer, client=node,
                                            weight=float(weight))
            if added:
                self._added[id(content)] = (records[0], tuple(records[0].values()))
                self._order.append(content)

    def _start(self, layout: Layout, template: Any) -> bool:
        """The batch's aggregation, for updates of ``layout``; False if it cannot be."""
        self._layout, self._template = layout, template
        if self._batch_rule is not None:
            assert self._runtime is not None
            if self._pool is None:
                self._pool = ShmPool(max_idle_bytes=0)
            rule, options = self._batch_rule
            try:
                self._sharded = ShardedRound(self._runtime, rule, options, layout.nbytes // 4,
                                             max(1, self._expected), prefix="flower-shard")
            except Exception:  # e.g. too few nodes for Krum's f: the strategy's own code
                return False
            return True
        if self._cluster is None:
            self._cluster = Cluster.local(1, cores=float(os.cpu_count() or 1),
                                          executor="threads")
        plan = self._cluster.plan(TreeShape.of(1), {"n0": max(1, self._expected)})
        self._handle = self._cluster.begin_round(self._number, plan, nbytes=layout.nbytes,
                                                 acc_dtype="F64")
        return True

    def average(self, records: list[Any], key: str) -> Any:
        """The engine's average of ``records`` (an ArrayRecord), or None when it has not
        added exactly these replies weighted by ``key``."""
        with self._lock:
            if self._handle is None or key != WEIGHT_KEY:
                self._settle()
                return None
            return self._take(records, self._mean)

    def robust(self, records: list[Any]) -> tuple[Any, list[Any]] | None:
        """The robust rule's result over ``records`` (an ArrayRecord) and the replies it
        chose (Krum: those it picked; else all), or None when the engine did not add
        exactly these replies by that rule."""
        with self._lock:
            if self._sharded is None:
                self._settle()
                return None
            sharded, order = self._sharded, list(self._order)
            arrays = self._take(records, lambda: sharded.result(RESULT_TIMEOUT_S))
            if arrays is None:
                return None
            chosen = (order if sharded.selected is None
                      else [order[i] for i in sorted(sharded.selected)])
            return arrays, chosen

    def _mean(self) -> Any:
        assert self._handle is not None
        self._handle.close()
        result = self._handle.result(RESULT_TIMEOUT_S)
        try:
            if result.bad:  # a NaN or ±Inf update: Flower's average carries it
                return None
            return result.array.copy()
        finally:
            result.release()

    def _take(self, records: list[Any], reduce: Callable[[], Any]) -> Any:
        # caller holds the lock
        from flwr.app import Array, ArrayRecord

        if not self._eligible or not self._unchanged(records):
            self._settle()
            return None
        try:
            flat = reduce()
        except Exception:  # the engine failed (or too few replies): Flower's code answers
            flat = None
        if flat is None or not np.isfinite(flat).all():
            self._settle()
            return None
        assert self._layout is not None
        names = list(self._template.keys())  # the frame names them "<item>.<index>"
        arrays = {}
        for spec in sorted(self._layout.tensors, key=lambda t: int(t.name.partition(".")[2])):
            values = flat[spec.offset // 4: spec.end // 4].reshape(spec.shape)
            arrays[names[int(spec.name.partition(".")[2])]] = Array(np.asarray(values))
        self._open = False
        self._drop()
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
        if self._sharded is not None:
            sharded, self._sharded = self._sharded, None
            with contextlib.suppress(Exception):
                sharded.close()
        for lease in self._leases:
            lease.release()
        self._leases, self._added, self._layout, self._template = [], {}, None, None
        self._order = []

    def close(self) -> None:
        with self._lock:
            self._settle()
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None
            if self._pool is not None:
                self._pool.close()
                self._pool = None


@contextlib.contextmanager
def patched_strategies(engine: EagerTrain) -> Iterator[None]:
    """While the ServerApp runs: Flower's FedAvg family asks ``engine`` for its average,
    and FedMedian and FedTrimmedAvg for their rule's result (their own code otherwise)."""
    from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, MultiKrum, fedavg

    name = "aggregate_arrayrecords"  # what FedAvg.aggregate_train calls, by this name
    original: Callable[[list[Any], str], Any] = getattr(fedavg, name)

    def aggregate_arrayrecords(records: list[Any], weighting_metric_name: str) -> Any:
        averaged = engine.average(list(records), weighting_metric_name)
        return original(records, weighting_metric_name) if averaged is None else averaged

    rules: dict[type, Callable[[Any], tuple[str, dict[str, Any]]]] = {
        FedMedian: lambda s: ("fedmedian", {}),
        FedTrimmedAvg: lambda s: ("trimmedmean", {"beta": float(s.beta)}),
        MultiKrum: lambda s: ("krum", {"f": int(s.num_malicious_nodes),  # and Krum: m = 1
                                       "m": int(s.num_nodes_to_select)}),
    }
    saved = [(cls, attr, cls.__dict__.get(attr)) for cls in rules
             for attr in ("configure_train", "aggregate_train")]
    for cls, rule in rules.items():
        _robust(cls, rule, engine)
    setattr(fedavg, name, aggregate_arrayrecords)
    try:
        yield
    finally:
        setattr(fedavg, name, original)
        for cls, attr, value in saved:
            if value is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, value)


def _robust(cls: type, rule: Callable[[Any], tuple[str, dict[str, Any]]],
            engine: EagerTrain) -> None:
    """``cls`` tells the engine its rule before a round's train messages go out, and
    takes the engine's result for the replies it validated."""
    configure, aggregate = cls.configure_train, cls.aggregate_train  # type: ignore[attr-defined]

    def configure_train(self: Any, server_round: int, arrays: Any, config: Any,
                        grid: Any) -> Any:
        engine.expect(*rule(self))
        return configure(self, server_round, arrays, config, grid)

    def aggregate_train(self: Any, server_round: int, replies: Any) -> Any:
        replies = list(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        done = engine.robust([m.content for m in valid]) if valid else None
        if done is None:
            return aggregate(self, server_round, replies)
        arrays, chosen = done
        return arrays, self.train_metrics_aggr_fn(chosen, self.weighted_by_key)

    setattr(cls, "configure_train", configure_train)  # noqa: B010
    setattr(cls, "aggregate_train", aggregate_train)  # noqa: B010
