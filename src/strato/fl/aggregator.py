"""The aggregator function: the run's node agent in front of the aggregation engine.

Invoked with batches of the ``updates`` table's stream records (and with ``warm`` and
``close`` events). It is one warm function (``max_concurrency=1``): the per-node
dispatcher of LIFL. For each record it applies the round rules
(``strato.control.round``), and for an admitted update it

1. records the admission durably: one ``accepted`` item per update
   (``state.accepted_key``) and a counter in the round record, never a growing map;
2. hands the update to the engine (``strato.aggregation``) *where it lies*: a dense
   update is the blob file the client wrote, mapped read-only (no copy, no checksum
   pass); a CS upload is decoded once into a node shared-memory lease;
3. the engine's leaves add it eagerly and validate it (NaN/±Inf) in that same pass.

Each round's tree is chosen by the autoscaler from what the previous round measured
(``control.autoscaler.decide``) and placed by ``control.placement.place_best_fit``;
aggregators stay warm across rounds and scale to zero when idle. At quorum (or the
deadline) the engine's root gives the weighted mean, the strategy's server step turns
it into the new global model, and the round's task token is called back.

On a backend with several nodes (Ray), a simulated client's update stays on the node
its client ran on (``BlobStore.home``). This agent is then the root, on the node of the
durable state: it still applies the round rules to every upload, and hands each update
lying elsewhere, as a reference, to the ``leaf`` function (``strato.fl.leaf``) on the
node that ``control.placement`` chose for that node's updates (best fit: that node). A
leaf adds them in place in the same engine. When the round waits for its last updates
(``EARLY_SEND_LEFT``), each leaf writes one partial (weighted mean, total weight) of
what it holds; an update landing on a leaf's node after that goes up as it lands (on
its own, by the node's sender, or in one more partial), and the root adds what comes
into its own tree as it comes. Updates lost with a node are taken out of the round and
their clients train again.

Updates are added ``BATCH`` to a pass over memory: an invocation that leaves fewer
not yet added returns without adding them, the one that completes a batch (and, in
the round's last tenth, every one) returns once they are added, so every add happens
inside an invocation and its billed time covers it (``_Agent.settle``). An update
found non-finite is refused before the round closes and before its client's next
update is judged. Nothing is lost to a crash: an admitted
update's blob and item are durable before the engine sees it, and a cold worker (or a
resumed run) rebuilds the open round from those items before it takes new records.
Duplicated stream deliveries are recognised by their record key and change nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.aggregation import (
    Cluster,
    RoundHandle,
    ShardedRound,
    attach_input,
    file_ref,
    local_ref,
    release_input,
)
from strato.codec import decode, encode, encode_into, encoded_size, read_header
from strato.control import round as rules
from strato.control.autoscaler import AutoscalerContext, AutoscalerState, TreeShape, decide
from strato.control.placement import (
    NodeCapacity,
    build_tree,
    leaf_per_node_cross_bytes,
    place_best_fit,
    place_round_robin,
)
from strato.errors import (
    CodecError,
    ConditionFailed,
    CorruptBlob,
    InvalidToken,
    LayoutError,
    NotFound,
    StratoError,
)
from strato.fl import buffered, state
from strato.fl._engine import (
    BATCH,
    KEEP_ALIVE_S,
    NONFINITE,
    ROUND_TIMEOUT_S,
    Invoke,
    _in_node_memory,
    _Landed,
    _model_ref,
    _warm,
    _warm_one,
    forward_key,
    partial_key,
)
from strato.fl.strategies import RoundAggregator, download_key
from strato.params import Layout, Params
from strato.services import Services

__all__ = ["admit_batch", "close_round", "warm_up"]

LOST = "update lost with the node it lay on; its client trains again: node"
# A stored update found cut short or damaged when read (its upload was checked whole):
# the storage's fault, not the client's, so the client trains again, as for a lost one.
CORRUPT = "update blob damaged on disk; its client trains again"
POLL_S = 0.005  # how often the root looks for the partials it waits for
WAIT_S = 0.25  # the longest the root waits to be told of a partial before it looks at the nodes
# The leaves send their partials when the round waits for this many more updates: more
# than finish at once at the end of a round (one per node on the 3-node benchmark), so
# that the partials (~0.15 s to write) are up before the last ones land, and each update
# that lands after goes up as it lands (with 2, a round's last three updates often came
# in one batch and the close waited for every leaf's partial)
EARLY_SEND_LEFT = 5
LEAF_ATTEMPTS = 4  # times an update goes to a leaf whose worker lost it before it is made again


def _lost_on(node: str) -> str:
    return f"{LOST} {node[:12]}"


@dataclass
class _Open:
    """A round this worker aggregates."""

    rules: rules.RoundState
    strategy: RoundAggregator
    handle: RoundHandle | None = None
    shape: TreeShape | None = None
    decision: dict[str, Any] = field(default_factory=dict)
    # robust strategies: the coordinate-sharded aggregators, and what they were given
    sharded: ShardedRound | None = None
    shard_inputs: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    leases: list[Any] = field(default_factory=list)  # node memory they read (AWS)
    added: list[threading.Event] = field(default_factory=list)  # this invocation's inputs
    handed: int = 0  # updates handed to the engine this round (its quota: the selection)
    found_bad: int = 0  # of the engine's bad clients, how many were already refused
    # updates lying on other nodes (a backend with several nodes): each node's leaf adds
    # them there and sends its partial up (early, and at the close); per node, the leaf's
    # current generation, the updates handed to it and not yet in a partial the root
    # added, and those still to send
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    gen: dict[str, int] = field(default_factory=dict)
    at_leaf: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    to_send: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    leaf_bad: dict[str, str] = field(default_factory=dict)  # clients a leaf left out: why
    lost_at_leaf: list[tuple[str, str]] = field(default_factory=list)  # (client, reason)
    targets: dict[str, str] = field(default_factory=dict)  # node -> where its updates go
    landing: dict[str, int] = field(default_factory=dict)  # node -> updates lying there
    flushed: list[dict[str, int]] = field(default_factory=list)  # landing at each early send
    waiting: dict[str, str] = field(default_factory=dict)  # partials asked for: key -> node
    # a lone update a leaf was asked to send up as it is: its blob's key -> (the client,
    # the key of the partial the leaf writes instead when it cannot)
    forwarded: dict[str, tuple[str, str]] = field(default_factory=dict)
    senders: set[str] = field(default_factory=set)  # nodes whose sender was woken
    partials: list[str] = field(default_factory=list)  # the leaves' partial blobs
    # the norm bound ([aggregation] max_update_norm): each handed update's blob and
    # weight, the distances other nodes' leaves measured, and the model's copy in node
    # memory when its blob is not a file here
    handed_as: dict[str, tuple[str, float]] = field(default_factory=dict)
    leaf_dist: dict[str, float] = field(default_factory=dict)
    ref_lease: Any = None
    # async mode: each admitted client's base round (its update started from model
    # base - 1) and its staleness-weighted weight
    bases: dict[str, tuple[int, float]] = field(default_factory=dict)

    def landed(self) -> dict[str, int]:
        """The nodes updates of this round lie on, and how many on each."""
        return {n: c for n, c in self.landing.items() if c > 0}


class _Agent:
    def __init__(self, svc: Services, job: dict[str, Any]) -> None:
        self.svc, self.job = svc, job
        self.layout = Layout.from_json(job["layout"])
        if any(t.dtype != "F32" for t in self.layout.tensors):
            raise LayoutError("the aggregation engine works on float32 models")
        self.cores = float(os.cpu_count() or 1)
        self.cluster = Cluster.local(1, cores=self.cores, executor="threads",
                                     keep_alive_s=KEEP_ALIVE_S)
        self.autoscale = AutoscalerState()
        self.measured: AutoscalerContext | None = None
        self.shard_runtime: Any = None  # robust strategies' shard functions
        # the last two models written, encoded (round r's input is round r - 1's output)
        self._model_bufs: list[tuple[npt.NDArray[np.uint8] | None, int]] = [(None, 0)] * 2
        self._last_model = -1
        self.open: _Open | None = None
        self.closed: set[int] = set()
        self.invoke: Invoke | None = None  # the invocation at hand's, to reach the leaves
        self.asynchronous = buffered.is_async(job)  # buffered versions, no round barrier
        self.staleness = buffered.staleness(job)

    # ---- rounds ---------------------------------------------------------------------

    def round(self, r: int) -> _Open | None:
        """Round r as this worker aggregates it (rebuilt from its items when cold), or
        None when it does not exist or is closed."""
        if self.open is not None and self.open.rules.round == r:
            return self.open
        if r in self.closed:
            return None
        item = self.svc.table.get(state.ROUNDS, state.round_key(r))
        if item is None:
            return None
        rec = item.value
        if rec["status"] != "open":
            self.closed.add(r)
            return None
        self._abandon()
        cfg = self.job["config"]
        strategy = RoundAggregator(cfg["strategy"], cfg["strategy_options"], self.layout, r,
                                   seed=int(cfg.get("seed", 0)))
        selected = state.selected(self.svc.table, r, rec)
        opened = _Open(rules.RoundState.open(r, selected, int(rec["quorum"]),
                                             bool(rec.get("open_to_all", False))), strategy)
        self.open = opened
        if strategy.streaming:
            self._begin(opened)
        else:
            self._begin_sharded(opened)
        # A cold worker (or a resumed run): what was admitted before goes in again. One
        # that cannot be (its file was damaged or lost since) is made again by its client.
        unusable = []
        for acc in self.svc.table.query(state.ACCEPTED, state.round_key(r) + "/"):
            a = acc.value
            opened.rules = dataclasses.replace(
                opened.rules, admitted={**opened.rules.admitted, a["client"]: a["key"]})
            if "base" in a:
                opened.bases[a["client"]] = (int(a["base"]), float(a["weight"]))
            reason = self._land(opened, a["client"], a["blob"], float(a["weight"]))
            if reason:
                unusable.append((a["client"], reason))
        if unusable:
            self._lose(opened, unusable)
        return opened

    def _begin(self, opened: _Open) -> None:
        """The round's tree: the autoscaler's choice, placed on this node's cores. The
        rules close it (at quorum or the deadline), not its leaves' quota."""
        expected = _expected(opened)
        if self.measured is None:  # nothing measured yet: as many leaves as cores
            shape = TreeShape.of(max(1, min(int(self.cores), expected)))
            inputs: dict[str, Any] = {"measured": False}
        else:
            ctx = dataclasses.replace(self.measured, expected_updates=expected,
                                      now=time.monotonic())
            shape, self.autoscale = decide(ctx, self.autoscale)
            inputs = {
                "measured": True,
                "arrival_rate": round(ctx.arrival_rate, 3),
                "service_s": round(ctx.service_s, 6),
                "update_bytes": ctx.update_bytes,
                "cores": ctx.cores,
            }
        # Room for every selected client to send again after an update found bad.
        plan = self.cluster.plan(shape, {"n0": _quota(opened)})
        # float64 sums (the default): any tree, any arrival order gives the same model (to
        # float32 rounding of one exact sum), so a rerun or a resumed run reproduces a
        # run. float32 when the job asks: less memory traffic, arrival order in the bits.
        acc = "F32" if self.job["config"].get("accumulator") == "float32" else "F64"
        dist_ref = None
        if self._bound() > 0:
            dist_ref, opened.ref_lease = _model_ref(self.svc, self.cluster, self.layout,
                                                    opened.rules.round)
        opened.handle = self.cluster.begin_round(
            opened.rules.round, plan, nbytes=self.layout.nbytes, batch=BATCH, acc_dtype=acc,
            dist_ref=dist_ref,
        )
        opened.shape = shape
        opened.decision = {
            "tree": {**shape.to_dict(), "shards": 1},
            "placement": plan.placement.as_dict(),
            "autoscaler": {"expected_updates": expected, **inputs},
        }
        self._place_leaves(opened)

    def _place_leaves(self, opened: _Open) -> None:
        """Several nodes (Ray): which node's leaf adds the updates lying on each node,
        by ``control.placement`` over the cluster's alive nodes and their CPUs, a leaf
        per node (best fit: each on its own node; round robin: dealt in turn)."""
        nodes_of = getattr(self.svc.blobs, "nodes", None)
        if nodes_of is None or self.invoke is None:
            return
        nodes = nodes_of()  # this node (the root's) first
        if len(nodes) < 2:
            return
        names = [n for n, _ in nodes]
        tree = build_tree(TreeShape.of(len(names), fan_in=len(names)), dict.fromkeys(names, 1))
        caps = [NodeCapacity(n, max(cpus, 0.25)) for n, cpus in nodes]
        policy = str(self.job["config"].get("placement", "best-fit"))
        place = place_round_robin if policy == "round-robin" else place_best_fit
        placed = place(tree, caps).as_dict()
        opened.targets = {leaf.serves[0][0]: placed[leaf.name] for leaf in tree.leaves}
        opened.decision["nodes"] = {"policy": policy, "root": names[0],
                                    "cpus": dict(nodes), "leaf_of": dict(opened.targets)}

    def _begin_sharded(self, opened: _Open) -> None:
        """Median, trimmed mean, Krum: M shard functions, each holding K × |θ|/M values;
        M is the fewest whose rows fit ``function_memory_mb``."""
        if self.shard_runtime is None:
            from strato.services._runtime_process import ProcessRuntime

            self.shard_runtime = ProcessRuntime()
        cfg = self.job["config"]
        memory = int(cfg.get("function_memory_mb", 1024))
        opened.sharded = ShardedRound(
            self.shard_runtime, cfg["strategy"], cfg["strategy_options"], self.layout.numel,
            _quota(opened), function_memory_mb=memory,
        )
        m = opened.sharded.shards
        opened.decision = {
            "tree": {"leaves": m, "levels": 1, "shards": m},
            "autoscaler": {"expected_updates": len(opened.rules.selected),
                           "function_memory_mb": memory},
        }

    def _abandon(self) -> None:
        """Forget a round left open here (another worker or the deadline closed it)."""
        opened, self.open = self.open, None
        if opened is not None and opened.sharded is not None:
            opened.sharded.close()
            for held in opened.leases:
                held.release()
        if opened is not None and opened.handle is not None and not opened.handle.finished:
            opened.handle.close()
            with contextlib.suppress(Exception):
                opened.handle.result(timeout=60).release()
        if opened is not None and opened.ref_lease is not None:
            opened.ref_lease.release()
            opened.ref_lease = None

    # ---- updates --------------------------------------------------------------------

    def _land(self, opened: _Open, client: str, blob: str, weight: float) -> str:
        """Hand an admitted update to the engine; '' or why it cannot be read."""
        strategy = opened.strategy
        opened.handed_as[client] = (blob, weight)
        node = self._away(blob)  # where it lies, when not on this node
        if opened.targets:
            source = node or str(getattr(self.svc.blobs, "node_id", ""))
            opened.landing[source] = opened.landing.get(source, 0) + 1
            target = opened.targets.get(source, source)
            here = getattr(self.svc.blobs, "node_id", None)
            if target != here and strategy.streaming and not strategy.coded:
                return self._forward(opened, client, blob, weight, source, target)
        try:
            if strategy.coded:
                params = strategy.decode_update(self.svc.blobs.get(blob), self._previous)
                return self._land_array(opened, client, params.flat(), weight)
            where = getattr(self.svc.blobs, "locate", None)
            if where is None or node is not None:  # not on this machine: one read, into node memory
                params = decode(self.svc.blobs.get(blob), expect=self.layout)
                return self._land_array(opened, client, params.flat(), weight)
            path, offset, length = where(blob)
            try:
                view = attach_input(file_ref(path, offset, length))
            except LayoutError:  # shorter than when it was stored: cut since
                return CORRUPT
            layout, _meta, start = read_header(view)
        except NotFound:
            return "update blob is missing"
        except CorruptBlob:
            return CORRUPT
        except LayoutError as exc:
            return str(exc)
        except CodecError as exc:
            return f"not decodable: {exc}"
        if layout != self.layout:
            return f"wrong layout: {self.layout.describe_mismatch(layout)}"
        ref = file_ref(path, offset + start, self.layout.nbytes)
        if opened.sharded is not None:
            # The shards copy their slices; they do not check values: look first.
            if not np.isfinite(np.frombuffer(view[start:], dtype=np.float32)).all():
                return NONFINITE
            return self._add_sharded(opened, client, ref, weight)
        assert opened.handle is not None
        if not _take_slot(opened):
            return f"round {opened.rules.round} has taken all the updates it can"
        done = threading.Event()
        landed = _Landed(ref, view[start:], done)
        opened.added.append(done)
        opened.handle.arrive("n0", landed, client=client, weight=weight)  # type: ignore[arg-type]
        return ""

    def _away(self, blob: str) -> str | None:
        """The node an update lies on when it is another node than this one (a backend
        with several nodes keeps updates where they were written); else None."""
        home = getattr(self.svc.blobs, "home", None)
        if home is None or self.invoke is None:
            return None
        node = home(blob)
        return None if node in (None, getattr(self.svc.blobs, "node_id", None)) else str(node)

    def _forward(self, opened: _Open, client: str, blob: str, weight: float, source: str,
                 node: str) -> str:
        """Hand an update lying on ``source`` to the leaf on ``node`` (sent when the
        invocation ends)."""
        alive = self.svc.blobs.alive  # type: ignore[attr-defined]
        if not alive(source):
            opened.landing[source] -= 1
            return _lost_on(source)
        if not alive(node):  # its leaf's node went: the update's own node adds it
            node = source
        gen = opened.gen.setdefault(node, 0)
        entry = {"client": client, "blob": blob, "weight": weight, "gen": gen}
        opened.at_leaf.setdefault(node, {})[client] = entry
        opened.to_send.setdefault(node, []).append(entry)
        return ""

    def _send(self, opened: _Open) -> None:
        """The updates handed to leaves in this invocation, one call per node."""
        assert self.invoke is not None
        for node, entries in opened.to_send.items():
            self.invoke("leaf", _leaf_event(opened, node, entries), node=node)
            self._wake_sender(opened, node)
        opened.to_send.clear()

    def _wake_sender(self, opened: _Open, node: str) -> None:
        """Once a round, the sender beside a leaf handed updates is called with nothing
        to do: it is warm when the round's late update comes (a cold start would take
        about a second), and it goes with its leaf once the rounds stop."""
        if node not in opened.senders:
            opened.senders.add(node)
            assert self.invoke is not None
            self.invoke("send_up", {"warm": opened.rules.round}, node=node)

    def _flush_leaves(self, opened: _Open) -> bool:
        """Have each leaf holding updates of its current generation send their partial
        up, in the call that hands it those not sent yet (a new generation takes the
        updates handed to it after); whether any was asked."""
        r, asked = opened.rules.round, False
        for node, entries in opened.at_leaf.items():
            gen = opened.gen[node]
            current = [entry for entry in entries.values() if entry["gen"] == gen]
            if current:
                assert self.invoke is not None
                updates = opened.to_send.pop(node, [])
                event = (_leaf_event(opened, node, updates) if updates
                         else {"tag": opened.tag, "gen": gen})
                key = partial_key(r, opened.tag, node, gen)
                function = "leaf"
                if self._forwards(current, updates):
                    # a generation of one update not sent yet: the node's sender sends
                    # the update up as it is, with no pass over it (the root adds it as
                    # it adds those of its own node); when it cannot, the leaf writes
                    # the partial
                    alone = forward_key(key)
                    opened.forwarded[alone] = (str(updates[0]["client"]), key)
                    opened.waiting[alone] = node
                    event["forward"], function = alone, "send_up"
                self.invoke(function, {**event, "flush": r}, node=node)
                self._wake_sender(opened, node)
                opened.waiting[key] = node
                opened.gen[node] = gen + 1
                asked = True
        return asked

    def _land_sent_up(self, opened: _Open, wait_s: float) -> None:
        """Add what leaves have sent up of what the root waits for: waiting up to
        ``wait_s`` for something when nothing has come yet."""
        blobs, waiting = self.svc.blobs, opened.waiting
        await_any = getattr(blobs, "await_any", None)
        if await_any is not None:  # told as each comes (a backend with several nodes)
            came = await_any(list(waiting), wait_s)
        else:
            came = [key for key in waiting if blobs.exists(key)]
            if not came and wait_s > 0:
                time.sleep(POLL_S)
        for key in came:
            node = waiting.pop(key, None)
            if node is None:  # (the other of a pair, one of which came)
                continue
            try:
                self._land_partial_or_update(opened, node, key)
            except NotFound:
                # lost with the leaf's worker (a handed-off blob): let go, and its
                # updates go to a leaf again (``_collect``)
                with contextlib.suppress(StratoError):
                    blobs.delete(key)

    def _forwards(self, current: list[dict[str, Any]], updates: list[dict[str, Any]]) -> bool:
        """Whether a leaf sends its generation's update up as it is: the only one, not
        handed to it before, of a positive weight (the engine refuses others, the leaf's
        add says why), and no norm bound (whose distance the leaf's add measures)."""
        return (len(current) == 1 and len(updates) == 1 and updates[0] is current[0]
                and 0.0 < float(updates[0]["weight"]) < math.inf
                and float(self.job["config"].get("max_update_norm", 0.0)) <= 0)

    def _collect(self, opened: _Open) -> list[tuple[str, str]]:
        """Have every leaf that was handed updates send its partial up, and add each to
        the root's tree (with those sent early). Updates a leaf did not add (a leaf's
        worker was replaced) go to it again; those on a node that is gone are returned
        as (client, node): lost."""
        assert opened.handle is not None
        lost: list[tuple[str, str]] = []
        r, blobs, waiting = opened.rules.round, self.svc.blobs, opened.waiting
        for _attempt in range(LEAF_ATTEMPTS):
            if not any(opened.at_leaf.values()) and not waiting:
                break
            self._flush_leaves(opened)
            self._send(opened)
            deadline = time.monotonic() + ROUND_TIMEOUT_S
            while waiting:
                if time.monotonic() > deadline:
                    raise StratoError(f"round {r}: leaves on {len(set(waiting.values()))} "
                                      "node(s) did not send their partial in time")
                self._land_sent_up(opened, WAIT_S)
                for key, node in list(waiting.items()):
                    if not blobs.alive(node):  # type: ignore[attr-defined]
                        del waiting[key]
                        lost += [(c, _lost_on(node)) for c in opened.at_leaf.pop(node, {})]
            for node, entries in opened.at_leaf.items():  # not added: hand them over again
                for entry in entries.values():
                    entry["gen"] = opened.gen[node]
                    opened.to_send.setdefault(node, []).append(entry)
        for node, entries in opened.at_leaf.items():  # a leaf that never added them: made again
            lost += [(c, _lost_on(node)) for c in entries]
        opened.at_leaf.clear()
        opened.to_send.clear()
        lost += opened.lost_at_leaf
        opened.lost_at_leaf = []
        return lost

    def _predicted(self, opened: _Open) -> dict[str, Any]:
        """Where the round's updates landed and the bytes placement predicts its
        aggregation moves between nodes. The leaves send a partial at each early send
        and at the close: each wave of updates (those landed since the send before) is
        predicted on its own."""
        landing = opened.landed()
        waves: list[dict[str, int]] = []
        before: dict[str, int] = {}
        for upto in [*opened.flushed, landing]:
            waves.append({n: c - before.get(n, 0) for n, c in upto.items()})
            before = upto
        nbytes, root = self.layout.nbytes, opened.decision["nodes"]["root"]
        return {"landing": landing,
                "landing_after_early_send": waves[-1] if opened.flushed else None,
                "predicted_cross_node_bytes": sum(
                    leaf_per_node_cross_bytes(wave, opened.targets, root, nbytes, nbytes)
                    for wave in waves)}

    def after_batch(self) -> None:
        """An invocation's batch is in: the leaves send their partials early when the
        round waits for its last updates (each leaf's call carrying the updates handed
        to it in this batch), and the updates for leaves are handed over. What leaves
        sent up before is added now, as it comes, rather than all at the close."""
        opened = self.open
        if opened is not None and opened.handle is not None and opened.waiting:
            self._land_sent_up(opened, 0.0)
        self._send_partials_early()
        if self.open is not None and self.open.to_send:
            self._send(self.open)

    def _send_partials_early(self) -> None:
        """When the open round waits for its last updates (``EARLY_SEND_LEFT`` or fewer),
        its leaves send their partials up now, while it waits (the backend may move them
        to the root's node meanwhile): at the close only the nodes the last updates land
        on send one more (those that are a leaf's), instead of every leaf's node then.
        The root adds each as it comes: in a later batch, or at the close."""
        opened = self.open
        if (opened is not None and opened.handle is not None
                and 0 < opened.rules.quorum - len(opened.rules.admitted) <= EARLY_SEND_LEFT
                and self._flush_leaves(opened)):
            opened.flushed.append(opened.landed())

    def _land_partial_or_update(self, opened: _Open, node: str, key: str) -> None:
        """What a leaf sent up: a partial, or the lone update it was asked to send as it
        is (then the partial it would have written instead is not waited for)."""
        forwarded = opened.forwarded.pop(key, None)
        if forwarded is None:
            for alone, (_client, instead) in list(opened.forwarded.items()):
                if instead == key:  # the leaf could not send the update: its partial
                    del opened.forwarded[alone]
                    opened.waiting.pop(alone, None)
            self._land_partial(opened, node, key)
            return
        client, instead = forwarded
        opened.waiting.pop(instead, None)
        self._land_update_sent_up(opened, node, key, client)

    def _partial_view(self, key: str) -> tuple[dict[str, Any] | None, memoryview]:
        """A blob a leaf sent up: (its file's reference, when it lies on this node and is
        mapped in place, or None) and its bytes."""
        try:  # on this node: mapped in place
            path, offset, length = self.svc.blobs.locate(key)  # type: ignore[attr-defined]
            mapped = file_ref(path, offset, length)
            return mapped, attach_input(mapped)
        except StratoError:  # on the leaf's node: its bytes come over once
            return None, memoryview(self.svc.blobs.get(key))

    def _land_update_sent_up(self, opened: _Open, node: str, key: str, client: str) -> None:
        """A lone update a leaf sent up as it is: one more input of the root's tree, as an
        update of this node is (its values checked as they are added)."""
        assert opened.handle is not None
        opened.partials.append(key)  # deleted once the round's model is out
        entries = opened.at_leaf.get(node, {})
        if client not in entries:  # in the round another way (written off as lost)
            return
        ref, view = self._partial_view(key)  # (NotFound: lost, the update goes again)
        entry = entries.pop(client)
        try:
            layout, _meta, start = read_header(view)
            why = ("" if layout == self.layout
                   else f"wrong layout: {self.layout.describe_mismatch(layout)}")
        except CodecError as exc:
            why = f"not decodable: {exc}"
        if why:  # left out at the close, as a leaf's bad update is
            opened.leaf_bad[client] = why
            if ref is not None:
                release_input(ref)
            return
        if not _take_slot(opened):
            raise StratoError(f"round {opened.rules.round} has taken all the inputs it can")
        opened.added.append(self._arrive(opened, ref, view, start, client,
                                         float(entry["weight"])))

    def _arrive(self, opened: _Open, ref: dict[str, Any] | None, view: memoryview,
                start: int, client: str, weight: float) -> threading.Event:
        """Hand the root's tree an input a leaf sent up (its data from ``start``)."""
        assert opened.handle is not None
        done = threading.Event()
        if ref is not None:
            landed = _Landed(file_ref(ref["path"], ref["offset"] + start, self.layout.nbytes),
                             view[start:], done)
        else:  # added where it came (the root's aggregators are threads of this process)
            data = view[start : start + self.layout.nbytes]
            landed = _Landed(local_ref(data), data, done)
        opened.handle.arrive("n0", landed, client=client, weight=weight)  # type: ignore[arg-type]
        return done

    def _land_partial(self, opened: _Open, node: str, key: str) -> None:
        """A leaf's partial (its updates' weighted mean and their total weight): one more
        input of the root's tree, mapped in place."""
        assert opened.handle is not None
        ref, view = self._partial_view(key)
        layout, meta, start = read_header(view)
        covered = json.loads(meta.get("clients", "[]"))
        bad = json.loads(meta.get("bad", "{}"))
        entries = opened.at_leaf.get(node, {})
        if any(client not in entries for client in [*covered, *bad]):
            # some of its updates are in the round another way (written off as lost
            # with their node, their clients training again): it is not added
            opened.partials.append(key)
            if ref is not None:
                release_input(ref)
            return
        for client in json.loads(meta.get("lost", "[]")):  # its file is gone
            if entries.pop(client, None) is not None:
                opened.lost_at_leaf.append((client, _lost_on(node)))
        for client in json.loads(meta.get("corrupt", "[]")):  # its file is damaged
            if entries.pop(client, None) is not None:
                opened.lost_at_leaf.append((client, CORRUPT))
        for client in [*covered, *bad]:
            entries.pop(client, None)
        opened.leaf_bad.update(bad)
        opened.leaf_dist.update(json.loads(meta.get("dist", "{}")))
        weight = float(meta.get("weight", 0.0))
        opened.partials.append(key)  # deleted once the round's model is out
        if not covered or weight <= 0:
            if ref is not None:
                release_input(ref)
            return
        if layout != self.layout:
            raise StratoError(f"a leaf's partial has the wrong layout: "
                              f"{self.layout.describe_mismatch(layout)}")
        if not _take_slot(opened):
            raise StratoError(f"round {opened.rules.round} has taken all the inputs it can")
        opened.added.append(self._arrive(opened, ref, view, start, f"leaf:{key}", weight))

    def _lose(self, opened: _Open, lost: list[tuple[str, str]]) -> None:
        """Updates that lay on a node now gone, or whose file was found damaged: no
        longer admitted, and their clients train again (a simulated client's update can
        be made again, as Ray rebuilds a lost object by running its task again)."""
        r = opened.rules.round
        admitted = dict(opened.rules.admitted)
        for client, reason in lost:
            key = admitted.pop(client, None)
            item = self.svc.table.get(state.ACCEPTED, state.accepted_key(r, client))
            if key is None or item is None:
                continue
            _reject(self.svc, {**item.value, "round": r}, key, reason)
            self.svc.table.delete(state.ACCEPTED, state.accepted_key(r, client))
            state.cas_update(self.svc.table, state.ROUNDS, state.round_key(r),
                             lambda v: {**v, "accepted_count": int(v.get("accepted_count", 0)) - 1})
            self._train_again(r, client)
        opened.rules = dataclasses.replace(opened.rules, admitted=admitted)

    def _train_again(self, r: int, client: str) -> None:
        """A client whose update was lost: its uploads of round r are forgotten, it gets
        the round's notice again and a simulated one is started."""
        for upload in self.svc.table.query(state.UPDATES, f"{state.round_key(r)}/{client}/"):
            self.svc.table.delete(state.UPDATES, upload.key)
        state.send_notice(self.svc.bus, r, client)
        if self.job.get("simulate", True) and self.invoke is not None:
            self.invoke("client", {"client": client})

    def _land_array(self, opened: _Open, client: str, flat: Any, weight: float) -> str:
        if opened.sharded is not None:  # robust: the shards read it until the round closes
            if not np.isfinite(flat).all():
                return NONFINITE
            held = self.cluster.node("n0").pool.lease(self.layout.nbytes)
            np.copyto(np.frombuffer(held.buffer, dtype=np.float32), flat, casting="unsafe")
            opened.leases.append(held)
            return self._add_sharded(opened, client, held.ref.to_dict(), weight)
        assert opened.handle is not None
        if not _take_slot(opened):
            return f"round {opened.rules.round} has taken all the updates it can"
        lease = _in_node_memory(self.cluster, self.layout, flat)
        done = threading.Event()
        landed = _Landed({**lease.ref.to_dict()}, lease.buffer, done, lease)
        opened.added.append(done)
        opened.handle.arrive("n0", landed, client=client, weight=weight)  # type: ignore[arg-type]
        return ""

    def _add_sharded(self, opened: _Open, client: str, ref: dict[str, Any], weight: float) -> str:
        assert opened.sharded is not None
        if not opened.sharded.add(client, ref, weight):
            return f"round {opened.rules.round} has taken all the updates it can"
        opened.shard_inputs.append((client, ref, weight))
        return ""

    def _previous(self) -> Params:
        assert self.open is not None
        return decode(self.svc.blobs.get(state.model_key(self.open.rules.round - 1)),
                      expect=self.layout)

    def admit(self, rec: dict[str, Any], counts: dict[str, int]) -> None:
        meta = rec.get("new")
        if rec.get("kind") != "INSERT" or rec.get("table") != state.UPDATES or not meta:
            counts["ignored"] += 1
            return
        key, r, client = rec["key"], int(meta.get("round", -1)), str(meta.get("client", ""))
        if not self.asynchronous:
            self._admit_to(r, key, client, meta, meta.get("num_examples"), counts)
            return
        # async: the update goes into the open buffer, weighted by how stale it is
        base, r = r, buffered.open_round(self.svc)
        stale = r - base
        if self._decided(key, client, base, r):  # a redelivered record: told before
            counts["ignored"] += 1
            return
        try:
            refusal = self.staleness.refusal(base, r)
            if refusal is not None:
                _reject(self.svc, meta, key, refusal)
                counts["rejected"] += 1
            else:
                weight = meta.get("num_examples")
                if rules.positive_weight(weight) is not None:
                    weight = float(weight) * self.staleness.weight(stale)
                self._admit_to(r, key, client, {**meta, "base": base}, weight, counts)
        finally:  # admitted or not, its client's slot goes to the next one
            self._next_clients(done=(client, base))

    def _decided(self, key: str, client: str, base: int, r: int) -> bool:
        """Async: was this update record refused, or admitted into a buffer before the
        open one (round ``r``; the rules recognise it in that one)?"""
        if self.svc.table.get(state.REJECTIONS, key) is not None:
            return True
        for earlier in range(max(1, base), r):
            item = self.svc.table.get(state.ACCEPTED, state.accepted_key(earlier, client))
            if item is not None and item.value.get("key") == key:
                return True
        return False

    def _next_clients(self, done: tuple[str, int] | None = None) -> None:
        """Async: free ``done``'s slot and fill the clients in flight up to the
        concurrency, with clients not already in the open buffer (none once the last
        version is made)."""
        opened = self.round(buffered.open_round(self.svc))
        buffered.dispatch(self.svc, self.job, pool=buffered.pool(self.svc, self.job),
                          done=done, accepting=opened is not None,
                          exclude=frozenset(opened.rules.admitted if opened else ()),
                          invoke=self._invoke_clients())

    def _invoke_clients(self) -> Invoke | None:
        if not bool(self.job.get("simulate", True)) or self.invoke is None:
            return None
        return self.invoke

    def _admit_to(self, r: int, key: str, client: str, meta: dict[str, Any], weight: Any,
                  counts: dict[str, int]) -> None:
        """Round r's rules and admission for one update record."""
        opened = self.round(r)
        if opened is not None and len(opened.rules.admitted) >= opened.rules.quorum:
            self.close(r, "quorum")  # a cold rebuild of a round whose quorum was in
            opened = None
        if opened is None:
            for k, v in self._refuse_closed(key, r, client, meta).items():
                counts[k] += v
            return
        if client in opened.rules.admitted and opened.added:
            # its admitted update may yet be found bad: know that before calling this
            # one a duplicate (a client whose update held NaN may send again)
            refused = self.settle()
            counts["accepted"] -= refused
            counts["rejected"] += refused
        new_rules, actions = rules.step(opened.rules, rules.Arrival(client, key, weight))
        for action in actions:
            if isinstance(action, rules.Seen):
                counts["ignored"] += 1
            elif isinstance(action, rules.Refuse):
                _reject(self.svc, meta, key, action.reason)
                counts["rejected"] += 1
            elif isinstance(action, rules.Admit):
                reason = self._admit(opened, key, meta, action)
                if reason:
                    _reject(self.svc, meta, key, reason)
                    counts["rejected"] += 1
                    return  # the rules' state stays as it was: not admitted
                opened.rules = new_rules
                counts["accepted"] += 1
            elif isinstance(action, rules.Close):
                # an update found bad now does not count towards the quorum
                refused = self.settle(hand_over=False)
                counts["accepted"] -= refused
                counts["rejected"] += refused
                if len(opened.rules.admitted) >= opened.rules.quorum:
                    self.close(r, action.cause)
                else:
                    opened.rules = dataclasses.replace(opened.rules, status=rules.OPEN,
                                                       closed_by=None)

    def _refuse_closed(self, key: str, r: int, client: str, meta: dict[str, Any]) -> dict[str, int]:
        item = self.svc.table.get(state.ACCEPTED, state.accepted_key(r, client))
        if item is not None and item.value.get("key") == key:
            return {"ignored": 1}
        exists = self.svc.table.get(state.ROUNDS, state.round_key(r)) is not None
        reason = f"late: round {r} is already closed" if exists else f"round {r} does not exist"
        _reject(self.svc, meta, key, reason)
        return {"rejected": 1}

    def _admit(self, opened: _Open, key: str, meta: dict[str, Any], act: rules.Admit) -> str:
        r = opened.rules.round
        entry: dict[str, Any] = {
            "key": key,
            "client": act.client,
            "blob": str(meta.get("blob", "")),
            "weight": act.weight,
            "bytes_up": int(meta.get("bytes_up", 0)),
            "bytes_down": int(meta.get("bytes_down", 0)),
            "uploaded_at": float(meta.get("uploaded_at", time.time())),
        }
        if "base" in meta:  # async: the round whose model it started from
            entry |= {"base": int(meta["base"]), "staleness": r - int(meta["base"])}
        # Durable first (the blob already is): from here the update cannot be lost.
        try:
            self.svc.table.put(state.ACCEPTED, state.accepted_key(r, act.client), entry,
                               if_absent=True)
        except ConditionFailed:
            return f"duplicate: client {act.client} already has an update in round {r}"
        reason = self._land(opened, act.client, entry["blob"], act.weight)
        if reason:
            self.svc.table.delete(state.ACCEPTED, state.accepted_key(r, act.client))
            if reason.startswith((LOST, CORRUPT)):
                self._train_again(r, act.client)
            return reason
        state.cas_update(self.svc.table, state.ROUNDS, state.round_key(r),
                         lambda v: {**v, "accepted_count": int(v.get("accepted_count", 0)) + 1})
        if "base" in entry:
            opened.bases[act.client] = (int(entry["base"]), act.weight)
        return ""

    def settle(self, *, wait: bool = True, hand_over: bool = True) -> int:
        """Have the updates handed over added, and refuse those the leaves found
        non-finite (their clients may send again); returns how many were refused.

        Without ``wait``, fewer than ``BATCH`` updates not yet added are left waiting
        for more (each is durable already: its blob and its accepted item), so a leaf
        adds them in one pass over memory; the invocation that makes a batch waits for
        it, so every add happens inside an invocation (billed, and where a function's
        environment is frozen between invocations, done). In the round's last tenth
        each update is added as it comes: at the close no batch is left waiting. An
        update found bad is refused by the invocation that added it: before the round
        can close, and before the same client's next update is judged. Without
        ``hand_over``, updates for leaves on other nodes are kept for the close, which
        sends each leaf its last ones with the call for its partial."""
        opened = self.open
        if opened is None or opened.handle is None:
            return 0
        if opened.to_send and hand_over:
            self._send(opened)
        opened.added = [done for done in opened.added if not done.is_set()]
        every = wait or _near_quorum(opened)
        if every and opened.added:
            opened.handle.flush()
        # Otherwise those a leaf has started on (a full batch, or each as it comes near
        # the end of the leaf's own quota, e.g. with a leaf per core) are finished here,
        # inside the invocation; the others wait in the leaf for a batch.
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while len(opened.added) > (0 if every else opened.handle.waiting()):
            if time.monotonic() > deadline:
                raise StratoError("the aggregation engine did not add an update in time")
            opened.added[0].wait(0.005)
            opened.added = [done for done in opened.added if not done.is_set()]
        bad = opened.handle.bad_clients()
        for client in bad[opened.found_bad :]:
            opened.rules, actions = rules.step(opened.rules, rules.Invalid(client, NONFINITE))
            for action in actions:
                if isinstance(action, rules.Refuse):
                    self._unadmit(opened.rules.round, client, action.key)
        refused, opened.found_bad = len(bad) - opened.found_bad, len(bad)
        return refused

    # ---- closing --------------------------------------------------------------------

    def close(self, r: int, cause: str) -> dict[str, Any]:
        closing_at = time.time()  # a deadline close's aggregation latency counts from here
        item = self.svc.table.get(state.ROUNDS, state.round_key(r))
        if item is None:
            raise NotFound(f"round {r} does not exist")
        if "model" in item.value:
            return item.value
        opened = self.round(r) if item.value["status"] == "open" else None
        if opened is None:  # closed but no model: a closer died; rebuild from its items
            self.closed.discard(r)
            state.cas_update(self.svc.table, state.ROUNDS, state.round_key(r),
                             lambda v: {**v, "status": "open"})
            opened = self.round(r)
            assert opened is not None
        if opened.targets:
            opened.decision["nodes"] = {**opened.decision["nodes"], **self._predicted(opened)}
        parts: dict[str, float] = {}  # where the close's time went, for the records
        if any(opened.at_leaf.values()):
            started = time.perf_counter()
            lost = self._collect(opened)
            parts["partials_s"] = time.perf_counter() - started
            if lost:
                self._lose(opened, lost)
                if cause == "quorum" and len(opened.rules.admitted) < opened.rules.quorum:
                    # the lost updates' clients train again: the round waits for them
                    opened.rules = dataclasses.replace(opened.rules, status=rules.OPEN,
                                                       closed_by=None)
                    return item.value
        self.open = None
        self.closed.add(r)
        try:
            return self._write_close(opened, r, cause, closing_at, parts)
        except BaseException:
            # Nothing of it is final (the table still says open): a later close, or an
            # update arriving meanwhile, rebuilds the round from its accepted items.
            self.closed.discard(r)
            raise

    def _write_close(self, opened: _Open, r: int, cause: str, closing_at: float,
                     parts: dict[str, float]) -> dict[str, Any]:
        started = time.perf_counter()
        previous = self._previous_model(r)
        strategy_state = _load_strategy_state(self.svc, r - 1)
        (out, payload), new_state, bad = self._result(opened, previous, strategy_state)
        parts["result_s"] = time.perf_counter() - started
        left_out = {c: NONFINITE for c in bad[opened.found_bad :]} | opened.leaf_bad
        for client, why in left_out.items():
            opened.rules, actions = rules.step(opened.rules, rules.Invalid(client, why))
            for action in actions:
                if isinstance(action, rules.Refuse):
                    self._unadmit(r, client, action.key, why)
        opened.strategy.round = r
        download = opened.strategy.download_payload(out)  # CS: what the clients fetch
        if download is not None:
            self.svc.blobs.put(download_key(state.model_key(r)), download)
        started = time.perf_counter()
        self.svc.blobs.put(state.model_key(r), payload)
        parts["model_write_s"] = time.perf_counter() - started
        self._last_model = r
        if new_state:
            self.svc.blobs.put(_strategy_key(r), encode(Params.from_arrays(new_state)).payload)
        accepted = len(opened.rules.admitted)

        def done(value: dict[str, Any]) -> dict[str, Any] | None:
            if "model" in value:
                return None
            return {**value, "status": "closed", "closed_at": value.get("closed_at", closing_at),
                    "closed_by": cause, "accepted_count": accepted, **opened.decision,
                    "model": state.model_key(r), "model_ready_at": time.time(),
                    "close_parts_s": parts}

        state.cas_update(self.svc.table, state.ROUNDS, state.round_key(r), done)
        self._drop_partials(r, opened)
        if self.asynchronous and r < int(self.job["config"]["rounds"]):
            buffered.open_version(self.svc, self.job, r + 1)  # no client waits for the loop
        final = self.svc.table.get(state.ROUNDS, state.round_key(r))
        assert final is not None
        # InvalidToken: the round was already called back (or timed out into the deadline).
        if "token" in final.value:  # async: the loop may not have reached round r yet
            with contextlib.suppress(InvalidToken):
                self.svc.workflow.send_task_success(final.value["token"],
                                                    {"round": r, "model": state.model_key(r)})
        self._forget_updates(r)
        return final.value

    def _drop_partials(self, r: int, opened: _Open) -> None:
        """Round r's model is out: its leaves' partials are not needed any more, nor
        those of an attempt at it that was given up (a closer replaced, a partial
        thought lost that came after all): on Ray each holds its leaf node's memory."""
        if not opened.gen:  # a round without leaves has no partials
            return
        keys = set(opened.partials)  # (all of them, should the listing fail)
        with contextlib.suppress(StratoError):
            keys.update(self.svc.blobs.list(f"partials/{state.round_key(r)}/"))
        for key in sorted(keys):
            with contextlib.suppress(StratoError):
                self.svc.blobs.delete(key)

    def _forget_updates(self, r: int) -> None:
        """``[job] keep_rounds = K``: once round r's model is written, round r - K's
        updates are not needed any more: their blobs, their records and acceptances
        (round r - K's metrics record sums them up: counts, bytes; refusals stay, with
        their reasons), nor is round r - K's model (with its CS download and strategy
        state: round r's are what a resumed run goes on from; the initial model is
        kept); without it every round's updates and models are kept."""
        keep = int(self.job["config"].get("keep_rounds", 0))
        old = r - keep
        if keep <= 0 or old < 1:
            return
        model = state.model_key(old)
        for key in [*self.svc.blobs.list(f"updates/{state.round_key(old)}/"), model,
                    download_key(model), _strategy_key(old)]:  # fmt: skip
            with contextlib.suppress(StratoError):  # best effort: a miss only costs disk
                self.svc.blobs.delete(key)
        if self.svc.table.get(state.METRICS, state.round_key(old)) is None:
            return  # not summed up yet (cannot happen for K >= 1): keep the records
        for table in (state.UPDATES, state.ACCEPTED):
            for item in self.svc.table.query(table, state.round_key(old) + "/"):
                with contextlib.suppress(StratoError):
                    self.svc.table.delete(table, item.key)

    def _previous_model(self, r: int) -> Params:
        """Round r's input model: the one this worker wrote last round (still in its
        buffer), or read back from its blob (a cold worker)."""
        if self._last_model == r - 1:
            buf, n = self._model_bufs[(r - 1) % 2]
            assert buf is not None
            return Params(self.layout, buf[n - self.layout.nbytes : n])
        return decode(self.svc.blobs.get(state.model_key(r - 1)), expect=self.layout)

    def _encode(self, r: int, flat: npt.NDArray[Any]) -> tuple[Params, memoryview]:
        """Round r's model as its blob's payload, in one of two warm buffers (the other
        holds round r - 1's, the input of this round's step)."""
        model = Params(self.layout, np.ascontiguousarray(flat, dtype=np.float32).view(np.uint8))
        meta = {"round": str(r)}
        size = encoded_size(model, meta)
        buf, _ = self._model_bufs[r % 2]
        if buf is None or len(buf) < size:
            buf = np.empty(size + 64, dtype=np.uint8)  # room for a longer round number
            other, used = self._model_bufs[(r + 1) % 2]
            if other is None:  # both at once: next round's first touch is not on its path
                spare = np.empty(size + 64, dtype=np.uint8)
                spare.fill(0)
                self._model_bufs[(r + 1) % 2] = (spare, used)
        n = encode_into(model, buf, meta)
        self._model_bufs[r % 2] = (buf, n)
        return Params(self.layout, buf[n - self.layout.nbytes : n]), buf.data[:n]

    def _result(
        self, opened: _Open, previous: Params, strategy_state: dict[str, npt.NDArray[Any]]
    ) -> tuple[tuple[Params, memoryview], dict[str, npt.NDArray[Any]], list[str]]:
        """The round's new model (encoded), the strategy's new state, and the clients
        whose update the leaves found bad at the end."""
        r, strategy, flat = opened.rules.round, opened.strategy, previous.flat()
        if opened.sharded is not None:
            reduced = self._sharded_result(opened) if opened.shard_inputs else None
            new, st = strategy.robust_step(flat, reduced, len(opened.shard_inputs),
                                           strategy_state)
            return self._encode(r, new), st, []
        handle = opened.handle
        assert handle is not None
        if not opened.rules.admitted:  # nothing came: the model stays
            self._abandon_handle(handle)
            return self._encode(r, np.array(flat)), strategy_state, []
        handle.close()
        result = handle.result(timeout=ROUND_TIMEOUT_S)
        try:
            stats = handle.stats()
            self.measured = stats.autoscaler_context(
                expected_updates=_expected(opened), cores=self.cores,
                now=time.monotonic(),
            )
            bad = list(result.bad)
            if result.updates == 0:  # every update was bad
                return self._encode(r, np.array(flat)), strategy_state, bad
            reduced = result.array
            if opened.bases:
                reduced = self._from_bases(opened, flat, reduced, {*bad, *opened.leaf_bad})
            if self._bound() > 0:
                reduced = self._clip(opened, flat, reduced, float(result.weight),
                                     {**handle.distances(), **opened.leaf_dist}, set(bad))
            new, st = strategy.step(flat, reduced, strategy_state)
            return self._encode(r, new), st, bad  # encoded before the buffer goes back
        finally:
            result.release()
            if opened.ref_lease is not None:
                opened.ref_lease.release()
                opened.ref_lease = None

    def _from_bases(self, opened: _Open, flat: npt.NDArray[Any], mean: npt.NDArray[Any],
                    bad: set[str]) -> npt.NDArray[Any]:
        """Async: the buffer's weighted mean of trained models, turned into the round's
        model plus the weighted mean of each update's change against the model it
        started from: mean + flat - sum_b (W_b / W) x_b (control.asynchronous)."""
        r = opened.rules.round
        per_base: dict[int, float] = {}
        for client in opened.rules.admitted:
            if client in opened.bases and client not in bad:
                base, weight = opened.bases[client]
                per_base[base] = per_base.get(base, 0.0) + weight
        total = sum(per_base.values())
        if total <= 0 or set(per_base) <= {r}:
            return mean  # nothing stale: the plain weighted mean
        out = np.array(mean, dtype=np.float64)
        out += flat
        for base, weight in sorted(per_base.items()):
            started = flat if base == r else self._model_of(base - 1)
            out -= (weight / total) * started.astype(np.float64)
        return out.astype(np.float32)

    def _model_of(self, version: int) -> npt.NDArray[Any]:
        return decode(self.svc.blobs.get(state.model_key(version)), expect=self.layout).flat()

    def _bound(self) -> float:
        return float(self.job["config"].get("max_update_norm", 0.0))

    def _clip(self, opened: _Open, flat: npt.NDArray[Any], mean: npt.NDArray[Any],
              total: float, dist: dict[str, float], bad: set[str]) -> npt.NDArray[Any]:
        """The norm bound: an update farther from the round's model ``g`` than ``k`` times
        the round's median distance (``k``: max_update_norm) counts as
        ``g + c·(x − g)`` with ``c = k·median / ‖x − g‖``. Its distance was measured in
        the leaf's pass that added it; only such an update is read again, to take
        ``(w/W)·(1 − c)·(x − g)`` back out of the weighted mean."""
        norms = {c: float(np.sqrt(d)) for c, d in dist.items()
                 if not c.startswith("leaf:") and c not in bad and d is not None
                 and np.isfinite(d)}  # fmt: skip
        if not norms:
            return mean
        median = float(np.median(list(norms.values())))
        limit = self._bound() * median
        clipped: dict[str, float] = {}
        out = mean
        for client, norm in sorted(norms.items()):
            if norm <= limit or client not in opened.handed_as or total <= 0:
                continue
            blob, weight = opened.handed_as[client]
            x = decode(self.svc.blobs.get(blob), expect=self.layout).flat()
            if out is mean:
                out = np.array(mean, dtype=np.float64)
            keep = limit / norm
            out -= (weight / total) * (1.0 - keep) * (x.astype(np.float64) - flat)
            clipped[client] = round(norm / median, 3) if median > 0 else float("inf")
        opened.decision["norm_bound"] = {
            "median_distance": round(median, 6), "limit": round(limit, 6),
            "clipped": clipped,  # client -> its distance in medians
        }  # fmt: skip
        return out if out is mean else out.astype(np.float32)

    def _sharded_result(self, opened: _Open) -> npt.NDArray[np.float32] | None:
        """The shards' reduction; a shard worker lost mid-round lost its rows, so the
        round is given to fresh shards once more from the updates' references."""
        assert opened.sharded is not None
        if len(opened.shard_inputs) < max(1, opened.strategy.min_updates):
            opened.sharded.close()
            return None
        try:
            try:
                return np.array(opened.sharded.result(timeout=ROUND_TIMEOUT_S))
            except Exception:  # a lane's error, whatever its type: rebuild once
                opened.sharded.close()
                self._begin_sharded(opened)
                assert opened.sharded is not None
                for client, ref, weight in opened.shard_inputs:
                    opened.sharded.add(client, ref, weight)
                return np.array(opened.sharded.result(timeout=ROUND_TIMEOUT_S))
        finally:
            for held in opened.leases:
                held.release()
            opened.leases.clear()

    @staticmethod
    def _abandon_handle(handle: RoundHandle) -> None:
        handle.close()
        with contextlib.suppress(Exception):
            handle.result(timeout=5).release()

    def _unadmit(self, r: int, client: str, key: str, why: str = NONFINITE) -> None:
        item = self.svc.table.get(state.ACCEPTED, state.accepted_key(r, client))
        if item is None:
            return
        _reject(self.svc, {**item.value, "round": r}, key, why)
        self.svc.table.delete(state.ACCEPTED, state.accepted_key(r, client))
        state.cas_update(self.svc.table, state.ROUNDS, state.round_key(r),
                         lambda v: {**v, "accepted_count": int(v.get("accepted_count", 0)) - 1})

    def shutdown(self) -> None:
        self._abandon()
        self.cluster.close()
        if self.shard_runtime is not None:
            self.shard_runtime.close()


def _expected(opened: _Open) -> int:
    """Updates a round expects: its selection (a sync round) or its buffer (async)."""
    return max(1, len(opened.rules.selected), opened.rules.quorum)


def _near_quorum(opened: _Open) -> bool:
    """The round's last tenth (at least a batch) of the updates it waits for."""
    quorum = opened.rules.quorum
    return len(opened.rules.admitted) >= quorum - max(BATCH, quorum // 10)


def _leaf_event(opened: _Open, node: str, updates: list[dict[str, Any]]) -> dict[str, Any]:
    """The call that hands ``node``'s leaf ``updates`` (in its current generation)."""
    return {"add": opened.rules.round, "tag": opened.tag, "gen": opened.gen[node],
            "quota": _quota(opened), "updates": updates}


def _quota(opened: _Open) -> int:
    """Updates the engine takes in a round: each expected one, and once more each."""
    return 2 * _expected(opened)


def _take_slot(opened: _Open) -> bool:
    """Count one more update into the engine's quota; False when it is full."""
    if opened.handed >= _quota(opened):
        return False
    opened.handed += 1
    return True


def _reject(svc: Services, meta: dict[str, Any], key: str, reason: str) -> None:
    # A ConditionFailed means this very update was rejected before (a redelivered record).
    with contextlib.suppress(ConditionFailed):
        svc.table.put(state.REJECTIONS, key, {**meta, "reason": reason}, if_absent=True)


def _agent(svc: Services, invoke: Invoke | None = None) -> _Agent:
    agent: _Agent = _warm_one(svc, "agent", _Agent)
    agent.invoke = invoke
    return agent


def reset() -> None:
    """Drop this worker's warm state (tests: a cold worker)."""
    agent = _warm.pop("agent", None)
    if isinstance(agent, _Agent):
        agent.shutdown()


def warm_up(svc: Services, r: int, invoke: Invoke | None = None) -> dict[str, int]:
    """Set round r's tree up before its first update arrives (async: and fill the
    clients in flight up to the concurrency)."""
    agent = _agent(svc, invoke)
    agent.round(r)
    if agent.asynchronous:
        agent._next_clients()
    return {"accepted": 0, "rejected": 0, "ignored": 0}


def admit_batch(svc: Services, records: list[dict[str, Any]],
                invoke: Invoke | None = None) -> dict[str, int]:
    """Handle stream records of the updates table; returns counts for this batch.
    ``invoke``: the invocation's ``ctx.invoke_async``, which reaches the leaves on
    other nodes (a backend with several nodes) and restarts clients."""
    agent = _agent(svc, invoke)
    counts = {"accepted": 0, "rejected": 0, "ignored": 0}
    try:
        for rec in records:
            agent.admit(rec, counts)
    finally:
        refused = agent.settle(wait=False, hand_over=False)
    counts["accepted"] -= refused
    counts["rejected"] += refused
    agent.after_batch()
    return counts


def close_round(svc: Services, r: int, cause: str = "deadline",
                invoke: Invoke | None = None) -> dict[str, Any]:
    """Close round ``r`` (if still open), write its global model, call back its token."""
    agent = _agent(svc, invoke)
    rnd = agent.close(r, cause)
    if agent.asynchronous:  # clients given up on (lost) make room for others
        agent._next_clients()
    accepted = int(rnd.get("accepted_count", 0))
    return {"round": r, "model": rnd["model"], "accepted": accepted}


def _strategy_key(r: int) -> str:
    return f"strategy/round-{r:05d}.safetensors"


def _load_strategy_state(svc: Services, r: int) -> dict[str, npt.NDArray[Any]]:
    try:
        return {k: np.array(v) for k, v in decode(svc.blobs.get(_strategy_key(r))).arrays().items()}
    except NotFound:
        return {}
