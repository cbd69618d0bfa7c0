"""The per-node dispatcher: routes tiny "arrived" descriptors to aggregators.

One thread per node owns all of the node's round state and handles one event at a
time from a queue, so none of that state needs a lock. Events:

    begin   a round's plan (the tree, where each aggregator runs)
    arrive  an update landed in this node's shared memory: (round, client, ref, weight)
    input   an update or a partial for one of our aggregators, received from another node
    empty   a child finished with nothing to send
    count   after close: how many updates a landing node sent to one of our leaves
    close   no more arrivals this round (quorum or deadline)
    flush   add what is pending now, without waiting for full batches
    done    an aggregator invocation returned
    abort   forget the round (it failed somewhere)

Routing: an update goes to a leaf that serves this node and still has quota —
the least busy local one, else a remote one (its bytes then cross nodes).
Batching: a leaf waits for ``batch`` pending inputs before it is invoked (one pass
over memory for the whole batch), except near the end of its quota (the last
``TAIL_FRACTION``), where inputs are taken as they come so the work left after the
last arrival is about that one input.
Completion: a leaf is done when every input it can still get has been added; its
partial (the accumulator, left in place) goes to its parent like any other input;
the root's last invocation also scales by 1 / total weight, and its accumulator is
the new global model.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from strato.aggregation._inputs import Accumulator
from strato.aggregation._messages import AggregatorStats, Arrived, Input
from strato.control.placement import AggregatorSpec
from strato.errors import StratoError

if TYPE_CHECKING:
    from strato.aggregation._round import RoundSetup
    from strato.aggregation.node import Node, UpdateLease

__all__ = ["Dispatcher"]

BACKLOG_BATCHES = 4  # under a backlog, take up to this many batches in one invocation
TAIL_FRACTION = 0.1  # of a leaf's inputs: the last ones are added without waiting


class _Agg:
    def __init__(
        self, spec: AggregatorSpec, acc: Accumulator, out: Accumulator | None, node: str
    ) -> None:
        self.spec = spec
        self.acc = acc
        self.out = out  # the root's model buffer when it accumulates in another dtype
        self.pending: list[Input] = []
        self.inflight: list[Input] | None = None
        self.inflight_final = False
        self.fresh = True
        self.consumed = 0
        self.weight = 0.0
        self.updates = 0
        self.reported: dict[str, int] = {}  # leaves: landing node -> final count
        self.empties = 0  # parents: children that finished empty
        self.flush = False  # take what is pending as soon as the batch in flight returns
        self.done = False
        self.stats = AggregatorStats(spec.name, node, spec.level)

    def upper(self) -> int:
        """Inputs it will have added when complete (exact once every source reported)."""
        if self.spec.is_leaf:
            return sum(self.reported.get(n, q) for n, q in self.spec.serves)
        return len(self.spec.children) - self.empties

    def to_come(self) -> int:
        return self.upper() - self.consumed - len(self.pending) - len(self.inflight or ())


class _Round:
    def __init__(self, setup: RoundSetup) -> None:
        self.setup = setup
        self.aggs: dict[str, _Agg] = {}
        self.quota: dict[str, int] = {}  # leaves serving this node -> updates left to send
        self.sent: dict[str, int] = {}
        self.closed = False
        self.failed = False
        self.arrivals: list[float] = []  # when each update began to arrive
        self.landed: list[float] = []  # when each was wholly in shared memory
        self.refused = 0
        self.ingested_bytes = 0
        self.ready_at: float | None = None
        self.bad: list[str] = []  # clients whose update a leaf found non-finite
        self.dist: dict[str, float] = {}  # client -> ‖update − model‖² (with a dist_ref)


class Dispatcher:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.round: _Round | None = None
        self.history: dict[int, _Round] = {}
        self.busy: Counter[str] = Counter()  # aggregator -> invocations out, of any round
        self._thread = threading.Thread(
            target=self._loop, name=f"lifl-dispatch-{node.name}", daemon=True
        )
        self._thread.start()

    def post(self, *event: Any) -> None:
        self.events.put(event)

    def stop(self) -> None:
        self.post("stop")
        self._thread.join(timeout=30.0)

    def release_left(self) -> None:
        """After ``stop``, once the executors have finished what they were running: give
        back the memory that events still queued hold (a batch being added when the
        node stopped; an update or a partial that came after), or it stays leased for
        as long as the process lives (a partial held in ``_inputs``' local buffers)."""
        if self._thread.is_alive():
            return  # the loop still owns the queue (stop timed out)
        while True:
            try:
                kind, *args = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "done":
                held: list[Input] = args[3]
            elif kind == "input":
                held = [args[2]]
            elif kind == "arrive":
                args[1].release()
                continue
            else:
                continue
            for item in held:
                if item.release is not None:
                    item.release()

    # ---- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            kind, *args = self.events.get()
            if kind == "stop":
                self._drop_round()
                return
            try:
                getattr(self, f"_on_{kind}")(*args)
            except Exception as exc:  # a bug or a bad message: fail the round, keep serving
                self._fail(exc)

    def _current(self, round_no: int) -> _Round | None:
        r = self.round
        return r if r is not None and r.setup.round == round_no and not r.failed else None

    # ---- events ------------------------------------------------------------------------

    def _on_begin(self, setup: RoundSetup) -> None:
        self._drop_round()
        r = self.round = _Round(setup)
        self.history = {setup.round: r}
        me = self.node.name
        # aggregators on threads of this process add into its private memory
        private = self.node.executor_for(setup.nbytes).kind == "threads"
        mine = [spec for spec in setup.tree.aggregators if setup.where[spec.name] == me]
        wanted = {spec.name: setup.acc_nbytes for spec in mine}
        outs = {f"{spec.name}/out": setup.nbytes for spec in mine
                if spec.is_root and setup.acc_dtype != setup.dtype}
        buffers = self.node.accumulators({**wanted, **outs}, private=private,
                                         busy=frozenset(self._busy_buffers()))
        for spec in mine:
            r.aggs[spec.name] = _Agg(spec, buffers[spec.name],
                                     buffers.get(f"{spec.name}/out"), me)
        for spec in setup.tree.aggregators:  # the leaves this node's arrivals go to
            for landing, quota in spec.serves:
                if landing == me:
                    r.quota[spec.name] = quota
                    r.sent[spec.name] = 0

    def _busy_buffers(self) -> set[str]:
        """Buffers an invocation still out may write: its aggregator's accumulator,
        and the root's output buffer."""
        names = {n for n, count in self.busy.items() if count > 0}
        return names | {f"{n}/out" for n in names}

    def _on_arrive(self, desc: Arrived, lease: UpdateLease) -> None:
        r = self._current(desc.round)
        if r is None:
            lease.release()
            return
        r.arrivals.append(desc.at)
        r.landed.append(desc.landed)
        r.ingested_bytes += desc.ref.nbytes
        leaf = self._route(r)
        if leaf is None:  # beyond every quota (or after close): not part of this round
            r.refused += 1
            lease.release()
            return
        r.quota[leaf] -= 1
        r.sent[leaf] += 1
        ref = {**desc.ref.to_dict(), "dtype": r.setup.dtype}
        item = Input(ref, desc.weight, desc.weight, 1, lease.release, desc.client)
        self._deliver(r, leaf, item, "update", payload=lease.buffer)

    def _on_input(self, round_no: int, to: str, item: Input) -> None:
        r = self._current(round_no)
        if r is None or to not in r.aggs:
            if item.release is not None:
                item.release()
            return
        self._enqueue(r, r.aggs[to], item)

    def _on_empty(self, round_no: int, to: str) -> None:
        r = self._current(round_no)
        if r is not None and to in r.aggs:
            r.aggs[to].empties += 1
            self._pump(r, r.aggs[to])

    def _on_count(self, round_no: int, to: str, source: str, count: int) -> None:
        r = self._current(round_no)
        if r is not None and to in r.aggs:
            r.aggs[to].reported[source] = count
            self._pump(r, r.aggs[to])

    def _on_close(self, round_no: int) -> None:
        r = self._current(round_no)
        if r is None or r.closed:
            return
        r.closed = True
        for leaf, sent in r.sent.items():
            self._send_control(r, leaf, {"kind": "count", "source": self.node.name, "count": sent})

    def _on_done(
        self, round_no: int, name: str, future: Future[dict[str, Any]], batch: list[Input],
        submitted: float, finished: float,
    ) -> None:
        self.busy[name] -= 1
        r = self._current(round_no)
        if r is None:  # the round failed meanwhile: only give the memory back
            for item in batch:
                if item.release is not None:
                    item.release()
            return
        agg = r.aggs[name]
        agg.inflight = None
        try:
            result = future.result()
        except BaseException:
            for item in batch:
                if item.release is not None:
                    item.release()
            raise  # an invocation error fails the round (see _loop)
        bad = set(result.get("bad", ()))
        dist = result.get("dist")
        for k, item in enumerate(batch):
            if k in bad:  # left out by the leaf's check: no weight, no update
                r.bad.append(item.client)
            else:
                agg.weight += item.weight
                agg.updates += item.updates
                if dist is not None:
                    r.dist[item.client] = float(dist[k])
            if item.release is not None:
                item.release()
        agg.consumed += len(batch)
        s = agg.stats
        s.invocations += 1
        s.inputs += len(batch)
        busy = float(result.get("busy_s", 0.0))
        s.busy_s += busy
        s.wall_s += finished - submitted
        s.overheads.append(finished - submitted - busy)
        s.pid = int(result.get("pid", 0))
        s.peak_rss_kb = max(s.peak_rss_kb, int(result.get("hwm_kb", 0)))
        s.batches.append(len(batch))
        if agg.inflight_final:
            self._finish(r, agg, finished)
        elif agg.flush and agg.pending:
            agg.flush = False
            self._on_flush(round_no)
        else:
            self._pump(r, agg)

    def _on_flush(self, round_no: int) -> None:
        """Add what is pending now, without waiting for full batches (the caller waits
        for these inputs: e.g. a function whose billed time must cover their adds)."""
        r = self._current(round_no)
        if r is None:
            return
        for agg in r.aggs.values():
            if agg.spec.is_leaf and agg.pending and agg.inflight is None and not agg.done:
                take = agg.pending[: r.setup.batch * BACKLOG_BATCHES]
                final = agg.to_come() == 0 and len(take) == len(agg.pending)
                self._invoke(r, agg, take, final)
            elif agg.spec.is_leaf and agg.pending:
                agg.flush = True  # when the batch in flight returns

    def _on_fail(self, exc: Exception) -> None:
        self._fail(exc)

    def _on_abort(self, round_no: int) -> None:
        if self.round is not None and self.round.setup.round == round_no:
            self._drop_round()

    # ---- mechanics ---------------------------------------------------------------------

    def _route(self, r: _Round) -> str | None:
        open_leaves = [leaf for leaf, left in r.quota.items() if left > 0]
        if r.closed or not open_leaves:
            return None
        local = [leaf for leaf in open_leaves if leaf in r.aggs]
        if local:
            def busy(leaf: str) -> tuple[int, str]:
                a = r.aggs[leaf]
                return len(a.pending) + len(a.inflight or ()), leaf

            return min(local, key=busy)
        return max(open_leaves, key=lambda leaf: (r.quota[leaf], leaf))

    def _deliver(
        self, r: _Round, to: str, item: Input, kind: str, payload: memoryview | None
    ) -> None:
        """Hand an input to aggregator ``to``: in place if it is ours, else over the wire."""
        if to in r.aggs:
            self._enqueue(r, r.aggs[to], item)
            return
        node = r.setup.where[to]
        header = {
            "kind": kind, "round": r.setup.round, "to": to, "dtype": item.ref["dtype"],
            "coef": item.coef, "weight": item.weight, "updates": item.updates,
        }
        self.node.endpoint.send(r.setup.addresses[node], header, payload, item.release)

    def _send_control(self, r: _Round, to: str, message: dict[str, Any]) -> None:
        if to in r.aggs:
            if message["kind"] == "count":
                self._on_count(r.setup.round, to, message["source"], message["count"])
            else:
                self._on_empty(r.setup.round, to)
            return
        node = r.setup.where[to]
        self.node.endpoint.send(
            r.setup.addresses[node], {**message, "round": r.setup.round, "to": to}
        )

    def _enqueue(self, r: _Round, agg: _Agg, item: Input) -> None:
        if agg.done:
            raise StratoError(f"aggregator {agg.spec.name} got an input after it finished")
        agg.pending.append(item)
        self._pump(r, agg)

    def _pump(self, r: _Round, agg: _Agg) -> None:
        if agg.done or agg.inflight is not None:
            return
        # A batch waiting while the previous one is added must fit the ingest budget
        # together with it, or arrivals stall on back-pressure (10M floats: 12 slots).
        batch = min(r.setup.batch, max(1, self.node.update_slots(r.setup.nbytes) // 2))
        to_come = agg.to_come()
        if agg.pending:
            # Wait for a full batch, unless the quota's end is near or ingest is out of
            # budget (waiting would wait forever). Near the end arrivals thin out: a leaf
            # that waits there for a full batch is still adding it when the last update
            # lands, so the last TAIL_FRACTION of its inputs are taken as they come.
            tail = max(batch, int(agg.upper() * TAIL_FRACTION))
            if (
                len(agg.pending) >= batch
                or to_come < tail
                or not self.node.has_room(r.setup.nbytes)
            ):
                take = agg.pending[: r.setup.batch * BACKLOG_BATCHES]
                final = to_come == 0 and len(take) == len(agg.pending)
                self._invoke(r, agg, take, final)
        elif to_come == 0:  # everything it will ever get is added
            if agg.spec.is_root and agg.consumed > 0:
                self._invoke(r, agg, [], True)  # the last child was empty: just scale
            else:
                self._finish(r, agg, time.monotonic())

    def _invoke(self, r: _Round, agg: _Agg, take: list[Input], final: bool) -> None:
        del agg.pending[: len(take)]
        total = agg.weight + sum(i.weight for i in take)
        root_final = final and agg.spec.is_root
        event = {
            "acc": agg.acc.ref.to_dict(),
            "acc_dtype": r.setup.acc_dtype,
            "dtype": r.setup.dtype,
            "fresh": agg.fresh,
            "inputs": [{**i.ref, "coef": i.coef} for i in take],
            "scale": 1.0 / total if root_final and total > 0 else None,
            "out": agg.out.ref.to_dict() if root_final and agg.out is not None else None,
            "report": final,
            "check": agg.spec.is_leaf,  # a leaf's inputs are updates: validate them
            "dist_ref": r.setup.dist_ref if agg.spec.is_leaf else None,
        }
        agg.fresh = False
        agg.inflight = take
        agg.inflight_final = final
        submitted = time.monotonic()
        round_no = r.setup.round
        try:
            future = self.node.executor_for(r.setup.nbytes).submit(agg.spec.name, event)
        except BaseException:
            agg.inflight = None  # not started: _drop_round releases them as pending
            agg.pending[:0] = take
            raise
        self.busy[agg.spec.name] += 1

        def done(f: Future[dict[str, Any]]) -> None:
            self.post("done", round_no, agg.spec.name, f, take, submitted, time.monotonic())

        future.add_done_callback(done)

    def _finish(self, r: _Round, agg: _Agg, at: float) -> None:
        agg.done = True
        spec = agg.spec
        if spec.is_root:
            if agg.consumed == 0:
                raise StratoError(f"round {r.setup.round} closed with no updates to aggregate")
            r.ready_at = at
            model, key = (agg.acc, spec.name) if agg.out is None else (agg.out, f"{spec.name}/out")
            self.node.hand_over(key, model)
            r.setup.deliver(key, model, agg.weight, agg.updates, at)
            return
        assert spec.parent is not None
        if agg.consumed == 0:
            self._send_control(r, spec.parent, {"kind": "empty", "from": spec.name})
            return
        ref = {**agg.acc.ref.to_dict(), "dtype": r.setup.acc_dtype}
        partial = Input(ref, 1.0, agg.weight, agg.updates)
        self._deliver(r, spec.parent, partial, "partial", payload=agg.acc.buffer)

    def _fail(self, exc: Exception) -> None:
        r = self.round
        if r is not None and not r.failed:
            r.setup.fail(exc)
            self._drop_round()

    def _drop_round(self) -> None:
        r = self.round
        if r is None:
            return
        r.failed = True
        for agg in r.aggs.values():
            for item in agg.pending:
                if item.release is not None:
                    item.release()
            agg.pending.clear()
        self.round = None
