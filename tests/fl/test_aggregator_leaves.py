"""The root's side of a round with leaves on other nodes (a backend with several nodes):
a leaf's partial that cannot be read because its leaf's worker lost it (a handed-off
blob on Ray) sends that leaf's updates to it again, in a new generation; one lost every
time makes its clients train again. The leaves and the blob store are stand-ins here;
tests/backends/ray runs the same code on a real cluster. At the end, a node's leaf
itself and its sender, on the embedded services: a late update alone in its generation
is sent up as it is."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from strato.aggregation import attach_input
from strato.codec import encode
from strato.errors import LayoutError, NotFound, StratoError
from strato.fl import aggregator as agg
from strato.fl import leaf as leaf_node
from strato.params import Params

NODE = "b" * 40
MODEL = Params.from_arrays({"w": np.zeros(4, dtype=np.float32)})


class Blobs:
    """Partials by key; ``lose`` of them read as lost (their writer gone)."""

    def __init__(self, lose: int) -> None:
        self.partials: dict[str, bytes] = {}
        self.lose = lose
        self.only: str | None = None  # lose only this one's, when set
        self.deleted: list[str] = []

    def exists(self, key: str) -> bool:
        return key in self.partials

    def locate(self, key: str) -> tuple[str, int, int]:
        raise StratoError(f"blob {key} is in Ray's object store, not in a file")

    def get(self, key: str) -> memoryview:
        if self.lose > 0 and self.only in (None, key):
            self.lose -= 1
            raise NotFound(f"blob {key} was lost with the process that wrote it")
        return memoryview(self.partials[key])

    def delete(self, key: str) -> None:
        self.deleted.append(key)
        self.partials.pop(key, None)

    def alive(self, node: str) -> bool:
        return True


class Leaf:
    """A node's leaf: adds what it is handed, per generation; a flush hands off the
    partial of that generation's updates (each of weight 1, value 1)."""

    def __init__(self, blobs: Blobs) -> None:
        self.blobs = blobs
        self.calls: list[tuple[str, int, list[str]]] = []
        self.added: dict[int, list[str]] = {}
        self.invocations = 0
        self.woken: list[int] = []  # the sender's calls with nothing to do (per round)
        # when set, a lone update asked for as it is goes up so: these bytes
        self.sends_up: bytes | None = None

    def __call__(self, name: str, event: dict[str, Any], node: str) -> None:
        if name == "send_up" and "warm" in event:
            self.woken.append(int(event["warm"]))
            return
        assert node == NODE and name == ("send_up" if "forward" in event else "leaf")
        gen = int(event["gen"])
        self.invocations += 1
        if "forward" in event:  # the node's sender
            if self.sends_up is not None:
                self.calls.append(("forward", gen, [u["client"] for u in event["updates"]]))
                self.blobs.partials[str(event["forward"])] = self.sends_up
                return
            event = {k: v for k, v in event.items() if k != "forward"}  # to the leaf
        if "add" in event:
            clients = [u["client"] for u in event["updates"]]
            self.added.setdefault(gen, []).extend(clients)
            self.calls.append(("add", gen, clients))
        if "flush" not in event:
            return
        clients = self.added.get(gen, [])
        self.calls.append(("flush", gen, clients))
        mean = Params.from_arrays({"w": np.ones(4, dtype=np.float32)})
        meta = {"weight": repr(float(len(clients))), "clients": json.dumps(clients)}
        key = agg.partial_key(int(event["flush"]), str(event["tag"]), node, gen)
        self.blobs.partials[key] = bytes(encode(mean, meta).payload)


def _round(lose: int) -> tuple[Any, Any, Blobs, Leaf, list[tuple[str, float, Any]]]:
    blobs = Blobs(lose)
    leaf = Leaf(blobs)
    arrived: list[tuple[str, float, Any]] = []
    agent = agg._Agent.__new__(agg._Agent)  # (its engine and services are stand-ins)
    agent.svc = SimpleNamespace(blobs=blobs)  # type: ignore[assignment]
    agent.invoke = leaf
    agent.layout = MODEL.layout
    agent.job = {"config": {}}
    handle = SimpleNamespace(
        arrive=lambda node, landed, client, weight: arrived.append((client, weight, landed)))
    opened = agg._Open(rules=SimpleNamespace(round=2, selected=["c1", "c2"], quorum=2),  # type: ignore[arg-type]
                       strategy=None, handle=handle)  # type: ignore[arg-type]
    for client in ("c1", "c2"):  # two updates lying on NODE, handed to its leaf
        opened.landing[NODE] = opened.landing.get(NODE, 0) + 1
        assert agent._forward(opened, client, f"updates/{client}", 1.0, NODE, NODE) == ""
    return agent, opened, blobs, leaf, arrived


def test_a_partial_lost_with_its_leafs_worker_sends_its_updates_to_the_leaf_again() -> None:
    agent, opened, blobs, leaf, arrived = _round(lose=1)
    lost = agent._collect(opened)
    assert lost == []
    # generation 0's partial was lost: let go, and both updates went to the leaf again
    assert leaf.calls == [("add", 0, ["c1", "c2"]), ("flush", 0, ["c1", "c2"]),
                          ("add", 1, ["c1", "c2"]), ("flush", 1, ["c1", "c2"])]
    assert blobs.deleted == [agg.partial_key(2, opened.tag, NODE, 0)]
    # generation 1's partial went into the root's tree once, with both updates' weight
    assert [a[:2] for a in arrived] == [(f"leaf:{agg.partial_key(2, opened.tag, NODE, 1)}", 2.0)]
    assert opened.partials == [agg.partial_key(2, opened.tag, NODE, 1)]
    assert opened.at_leaf == {}
    # the engine adds the partial where it came, and lets it go once added
    landed = arrived[0][2]
    view = attach_input(landed.ref.to_dict())
    assert np.frombuffer(view, dtype=np.float32).tolist() == [1.0] * 4
    del view
    landed.release()
    with pytest.raises(LayoutError, match="no buffer of this process"):
        attach_input(landed.ref.to_dict())


def test_a_partial_lost_every_time_makes_its_clients_train_again() -> None:
    agent, opened, blobs, leaf, arrived = _round(lose=agg.LEAF_ATTEMPTS)
    lost = agent._collect(opened)
    assert sorted(lost) == [("c1", agg._lost_on(NODE)), ("c2", agg._lost_on(NODE))]
    assert [c for c in leaf.calls if c[0] == "flush"] == [
        ("flush", g, ["c1", "c2"]) for g in range(agg.LEAF_ATTEMPTS)]
    assert arrived == [] and len(blobs.deleted) == agg.LEAF_ATTEMPTS


def _waiting_for(opened: Any, quorum: int) -> None:
    opened.rules = SimpleNamespace(round=2, selected=["c1", "c2", "c3", "c4"], quorum=quorum,
                                   admitted={"c1": "k1", "c2": "k2"})


def test_a_round_waiting_for_its_last_update_has_its_leaves_send_their_partials_then() -> None:
    agent, opened, blobs, leaf, arrived = _round(lose=0)
    head = "a" * 40
    _waiting_for(opened, quorum=3)
    opened.targets = {NODE: NODE, head: head}
    opened.decision = {"nodes": {"root": head}}
    agent.open = opened
    agent.after_batch()  # two of three in: the leaf sends what it has
    early = agg.partial_key(2, opened.tag, NODE, 0)
    assert leaf.calls == [("add", 0, ["c1", "c2"]), ("flush", 0, ["c1", "c2"])]
    assert leaf.invocations == 1  # the updates go with the call for their partial
    assert early in blobs.partials and opened.waiting == {early: NODE}
    assert arrived == []  # (it is not waited for now)
    # the next batch: nothing new at the leaf, nothing sent; the partial that came is
    # added now, before the close
    agent.after_batch()
    assert leaf.invocations == 1
    assert [a[:2] for a in arrived] == [(f"leaf:{early}", 2.0)] and opened.waiting == {}
    assert opened.at_leaf[NODE] == {}
    nbytes = MODEL.layout.nbytes
    # had the last update landed on the head, no partial more would cross
    opened.landing[head] = 1
    assert agent._predicted(opened)["predicted_cross_node_bytes"] == nbytes
    # it lands on the leaf's node: that leaf sends one more partial at the close
    opened.landing = {NODE: 3}
    assert agent._forward(opened, "c3", "updates/c3", 1.0, NODE, NODE) == ""
    assert agent._collect(opened) == []
    assert leaf.calls[2:] == [("add", 1, ["c3"]), ("flush", 1, ["c3"])]
    assert leaf.invocations == 2
    assert sorted(a[:2] for a in arrived) == [
        (f"leaf:{early}", 2.0), (f"leaf:{agg.partial_key(2, opened.tag, NODE, 1)}", 1.0)]
    assert opened.at_leaf == {} and opened.waiting == {}
    predicted = agent._predicted(opened)
    assert predicted["landing_after_early_send"] == {NODE: 1}
    assert predicted["predicted_cross_node_bytes"] == 2 * nbytes


UPDATE = np.array([0.5, -1.0, 2.0, 4.0], dtype=np.float32)


def _late_update_after_the_early_send(sends_up: bytes) -> tuple[Any, Any, Blobs, Leaf,
                                                                 list[tuple[str, float, Any]]]:
    """c1 and c2 sent up early; c3 (weight 3) lands on the leaf's node after."""
    agent, opened, blobs, leaf, arrived = _round(lose=0)
    leaf.sends_up = sends_up
    _waiting_for(opened, quorum=3)
    agent.open = opened
    agent.after_batch()
    assert agent._forward(opened, "c3", "updates/c3", 3.0, NODE, NODE) == ""
    return agent, opened, blobs, leaf, arrived


def test_a_late_update_alone_at_its_leaf_goes_up_as_it_is_and_is_added_as_its_clients() -> None:
    """At the close, the leaf holding only the round's late update sends it up as it is;
    the root adds it under its client's name and weight (checked as the root checks the
    updates of its own node), and waits for no partial of it."""
    update = bytes(encode(Params.from_arrays({"w": UPDATE}), {"clients": '["c9"]'}).payload)
    agent, opened, blobs, leaf, arrived = _late_update_after_the_early_send(update)
    assert agent._collect(opened) == []
    gen1 = agg.partial_key(2, opened.tag, NODE, 1)
    assert leaf.calls[2:] == [("forward", 1, ["c3"])]
    assert leaf.woken == [2]  # its sender woken once this round, with the first updates
    assert [a[:2] for a in arrived] == [
        (f"leaf:{agg.partial_key(2, opened.tag, NODE, 0)}", 2.0), ("c3", 3.0)]
    view = attach_input(arrived[1][2].ref.to_dict())
    assert np.array_equal(np.frombuffer(view, dtype=np.float32), UPDATE)
    del view
    assert opened.waiting == {} and opened.forwarded == {} and opened.at_leaf == {}
    assert agg.forward_key(gen1) in opened.partials and gen1 not in blobs.partials
    assert opened.leaf_bad == {}  # (what its header's metadata says is not read)


def test_a_late_update_in_a_batch_before_the_close_goes_up_then_and_is_added_then() -> None:
    """After the early send, an update landing on a leaf's node in a batch of its own
    goes up as it is from that batch on, and what came is added in the next batch: the
    close has nothing left to wait for."""
    update = bytes(encode(Params.from_arrays({"w": UPDATE})).payload)
    agent, opened, blobs, leaf, arrived = _round(lose=0)
    leaf.sends_up = update
    _waiting_for(opened, quorum=4)
    agent.open = opened
    agent.after_batch()  # two of four in: the early send
    assert agent._forward(opened, "c3", "updates/c3", 3.0, NODE, NODE) == ""
    opened.rules.admitted["c3"] = "k3"
    agent.after_batch()  # c3's batch: the early partial is added, c3 goes up
    assert leaf.calls[2:] == [("forward", 1, ["c3"])]
    assert agg.forward_key(agg.partial_key(2, opened.tag, NODE, 1)) in blobs.partials
    assert [a[0] for a in arrived] == [f"leaf:{agg.partial_key(2, opened.tag, NODE, 0)}"]
    agent.after_batch()  # a batch with nothing for the leaves: c3 is added
    assert [a[:2] for a in arrived][1:] == [("c3", 3.0)]
    assert opened.waiting == {} and opened.forwarded == {} and opened.at_leaf[NODE] == {}
    calls = len(leaf.calls)
    assert agent._collect(opened) == []
    assert len(leaf.calls) == calls and len(arrived) == 2  # (nothing more at the close)


def test_a_late_update_sent_up_with_another_layout_is_left_out() -> None:
    other = bytes(encode(Params.from_arrays({"w": np.ones(5, dtype=np.float32)})).payload)
    agent, opened, _blobs, _leaf, arrived = _late_update_after_the_early_send(other)
    assert agent._collect(opened) == []
    assert [a[0] for a in arrived] == [f"leaf:{agg.partial_key(2, opened.tag, NODE, 0)}"]
    assert opened.leaf_bad["c3"].startswith("wrong layout")
    assert opened.waiting == {} and opened.at_leaf == {}


def test_a_late_update_lost_on_its_way_up_goes_to_the_leaf_again() -> None:
    update = bytes(encode(Params.from_arrays({"w": UPDATE})).payload)
    agent, opened, blobs, leaf, arrived = _late_update_after_the_early_send(update)
    blobs.lose = 1
    blobs.only = agg.forward_key(agg.partial_key(2, opened.tag, NODE, 1))
    assert agent._collect(opened) == []
    assert leaf.calls[2:] == [("forward", 1, ["c3"]), ("forward", 2, ["c3"])]
    assert [a[:2] for a in arrived][1:] == [("c3", 3.0)]
    assert blobs.deleted == [blobs.only]
    assert opened.waiting == {} and opened.forwarded == {}


def test_a_leaf_that_cannot_send_the_update_up_sends_its_partial_and_that_is_added() -> None:
    agent, opened, _blobs, leaf, arrived = _late_update_after_the_early_send(b"")
    leaf.sends_up = None  # (it writes the general path's partial instead)
    assert agent._collect(opened) == []
    assert leaf.calls[2:] == [("add", 1, ["c3"]), ("flush", 1, ["c3"])]
    assert [a[0] for a in arrived][1:] == [f"leaf:{agg.partial_key(2, opened.tag, NODE, 1)}"]
    assert opened.waiting == {} and opened.forwarded == {}


def test_a_partial_sent_early_and_lost_sends_its_updates_to_the_leaf_again() -> None:
    agent, opened, blobs, leaf, arrived = _round(lose=1)
    _waiting_for(opened, quorum=4)  # two to come: the early send is due
    agent.open = opened
    agent.after_batch()
    blobs.only = agg.partial_key(2, opened.tag, NODE, 0)  # the early one is lost
    assert agent._forward(opened, "c3", "updates/c3", 1.0, NODE, NODE) == ""
    assert agent._collect(opened) == []
    # the early partial (generation 0) was lost; generation 1 had c3 only, so c1 and c2
    # went to the leaf again, in generation 2
    assert [c for c in leaf.calls if c[0] == "flush"] == [
        ("flush", 0, ["c1", "c2"]), ("flush", 1, ["c3"]), ("flush", 2, ["c1", "c2"])]
    assert blobs.deleted == [agg.partial_key(2, opened.tag, NODE, 0)]
    assert sorted(a[1] for a in arrived) == [1.0, 2.0]
    assert opened.waiting == {} and not any(opened.at_leaf.values())


def test_a_partial_whose_updates_were_written_off_meanwhile_is_not_added() -> None:
    agent, opened, _blobs, leaf, arrived = _round(lose=0)
    _waiting_for(opened, quorum=3)
    agent.open = opened
    agent.after_batch()
    del opened.at_leaf[NODE]["c1"]  # (as when written off as lost: its client trains again)
    assert agent._collect(opened) == []
    # the early partial held c1 as well: not added; c2 went to the leaf again, alone
    assert [c for c in leaf.calls if c[0] == "flush"] == [
        ("flush", 0, ["c1", "c2"]), ("flush", 1, ["c2"])]
    assert [a[1] for a in arrived] == [1.0]
    assert agg.partial_key(2, opened.tag, NODE, 0) in opened.partials  # (let go later)


def test_a_round_waiting_for_more_updates_than_the_early_send_or_none_sends_nothing_early(
        ) -> None:
    agent, opened, _blobs, leaf, arrived = _round(lose=0)
    agent.open = opened
    # all in (the close sends), or one more to come than the early send waits for
    for quorum in (2, 2 + agg.EARLY_SEND_LEFT + 1):
        _waiting_for(opened, quorum)
        agent.after_batch()
    # the updates were handed over (in one call), no partial was asked for
    assert leaf.calls == [("add", 0, ["c1", "c2"])] and leaf.invocations == 1
    assert arrived == [] and opened.flushed == [] and opened.waiting == {}


# ---- a node's leaf, on the embedded services (its blobs are files it maps) ----------


def _leaf_with_updates(tmp_path: Any, values: dict[str, np.ndarray],
                       norm_bound: float = 0.0) -> tuple[Any, Any]:
    from strato.services import embedded

    svc = embedded(tmp_path / "services")
    layout = Params.from_arrays({"w": next(iter(values.values()))}).layout
    for client, array in values.items():
        svc.blobs.put(f"updates/{client}", encode(Params.from_arrays({"w": array})).payload)
    job = {"layout": layout.to_json(),
           "config": {"accumulator": "float64", "max_update_norm": norm_bound}}
    return svc, leaf_node._Leaf(svc, job)


def _partial(svc: Any, key: str) -> tuple[np.ndarray, dict[str, str]]:
    from strato.codec import read_header

    view = svc.blobs.get(key)
    layout, meta, start = read_header(view)
    return np.frombuffer(view, np.float32, count=layout.numel, offset=start).copy(), meta


def _one_update(client: str, weight: float) -> list[dict[str, Any]]:
    return [{"client": client, "blob": f"updates/{client}", "weight": weight}]


def _stored(svc: Any, key: str) -> bytes:
    return bytes(svc.blobs.get(key))


def test_a_late_update_alone_in_its_generation_is_sent_up_as_it_is(tmp_path: Any) -> None:
    """Asked to send a generation's one update up as it is, a node's sender copies the
    update's blob, byte for byte, under the key it was given: no pass over its values
    (the root checks them as it adds them), so a non-finite one goes up too."""
    rng = np.random.default_rng(7)
    broken = rng.standard_normal(3000).astype(np.float32)
    broken[17] = np.nan
    values = {"c1": rng.standard_normal(3000).astype(np.float32), "bad": broken}
    svc, leaf = _leaf_with_updates(tmp_path, values)
    leaf.shutdown()
    to_leaf: list[Any] = []
    try:
        for gen, client in enumerate(("c1", "bad"), start=1):
            key = agg.forward_key(agg.partial_key(3, "t", "n", gen))
            event = {"forward": key, "add": 3, "flush": 3, "tag": "t", "gen": gen,
                     "updates": _one_update(client, 7.0)}
            assert leaf_node.send_up(svc, event, lambda *a, **k: to_leaf.append((a, k))) == {
                "forwarded": key}
            assert _stored(svc, key) == _stored(svc, f"updates/{client}")
        assert to_leaf == []
    finally:
        svc.close()


def test_an_update_that_cannot_go_up_as_it_is_goes_to_the_leaf(tmp_path: Any) -> None:
    """Its blob gone (or more than one update): the rest of the event goes to the node's
    leaf, whose partial says what became of it; nothing is written under the key."""
    svc, leaf = _leaf_with_updates(tmp_path, {"ok": np.ones(3000, dtype=np.float32)})
    leaf.shutdown()
    key = agg.forward_key(agg.partial_key(1, "t", "n", 1))
    to_leaf: list[Any] = []
    try:
        for updates in (_one_update("gone", 1.0), _one_update("ok", 1.0) * 2):
            event = {"forward": key, "add": 1, "flush": 1, "tag": "t", "gen": 1,
                     "updates": updates}
            assert leaf_node.send_up(svc, event, lambda *a, **k: to_leaf.append((a, k))) == {
                "to_leaf": True}
            name, rest = to_leaf.pop()[0]
            assert name == "leaf" and rest == {k: v for k, v in event.items() if k != "forward"}
        assert not svc.blobs.exists(key)
    finally:
        svc.close()


def test_a_leaf_whose_updates_all_failed_to_land_writes_a_partial_saying_so(
        tmp_path: Any) -> None:
    """(What the leaf does with the update its sender could not send up.)"""
    svc, leaf = _leaf_with_updates(tmp_path, {"ok": np.ones(3000, dtype=np.float32)})
    try:
        leaf.add(2, "t", 1, 1, _one_update("gone", 1.0))
        out = leaf.flush(2, "t", 1)
        assert out["updates"] == 0
        _values, meta = _partial(svc, out["partial"])
        assert json.loads(meta["lost"]) == ["gone"] and json.loads(meta["clients"]) == []
        assert float(meta["weight"]) == 0.0 and leaf.current is None
    finally:
        leaf.shutdown()
        svc.close()


def test_a_sender_called_to_stay_warm_does_nothing(tmp_path: Any) -> None:
    svc, leaf = _leaf_with_updates(tmp_path, {"ok": np.ones(3000, dtype=np.float32)})
    leaf.shutdown()
    try:
        assert leaf_node.send_up(svc, {"warm": 3}, lambda *a, **k: pytest.fail("nothing to hand on")
                           ) == {"warm": True}
        assert svc.blobs.list("partials/") == []
    finally:
        svc.close()
