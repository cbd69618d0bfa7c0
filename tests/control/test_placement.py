"""Placement: trees split by where updates land, best fit with locality, round robin."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strato.control import (
    NodeCapacity,
    TreeShape,
    build_tree,
    cross_node_bytes,
    node_loads,
    place_best_fit,
    place_round_robin,
)
from strato.errors import ConfigError

B = 1000  # bytes per update in these examples


def nodes(*cores: float) -> list[NodeCapacity]:
    return [NodeCapacity(f"n{i}", c) for i, c in enumerate(cores)]


def test_leaves_split_in_proportion_to_where_updates_land() -> None:
    tree = build_tree(TreeShape.of(6, 8), {"n0": 50, "n1": 30, "n2": 20})
    serves = [a.serves for a in tree.leaves]
    assert serves == [(("n0", 17),), (("n0", 17),), (("n0", 16),), (("n1", 15),),
                      (("n1", 15),), (("n2", 20),)]
    assert tree.expected_updates == 100
    assert tree.root.name == "top" and tree.root.children == tuple(a.name for a in tree.leaves)


def test_fewer_leaves_than_nodes_take_several_nodes_each() -> None:
    tree = build_tree(TreeShape.of(2), {"n0": 10, "n1": 40, "n2": 35, "n3": 5})
    assert [dict(a.serves) for a in tree.leaves] == [{"n1": 40, "n3": 5}, {"n2": 35, "n0": 10}]


def test_a_one_leaf_tree_is_its_own_root() -> None:
    tree = build_tree(TreeShape.of(1), {"n0": 3, "n1": 4})
    assert [a.name for a in tree.aggregators] == ["leaf0"]
    assert tree.root.is_leaf and tree.root.is_root and tree.root.expected_inputs == 7


def test_more_leaves_than_updates_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least as many updates"):
        build_tree(TreeShape.of(5), {"n0": 4})


def test_best_fit_keeps_every_update_on_its_node_when_there_is_room() -> None:
    tree = build_tree(TreeShape.of(8, 4), {f"n{i}": 25 for i in range(4)}, leaf_demand=0.5)
    placement = place_best_fit(tree, nodes(2, 2, 2, 2))
    where = placement.as_dict()
    for leaf in tree.leaves:
        assert all(where[leaf.name] == n for n, _ in leaf.serves)
    for agg in tree.aggregators:  # each parent sits with (one of) its children
        if agg.children:
            assert where[agg.name] in {where[c] for c in agg.children}
    # only partials move: mid1.0 on n0 gets n1's two leaves, mid1.1 on n2 gets n3's,
    # the top (with mid1.0 on n0) gets mid1.1's
    assert cross_node_bytes(tree, placement, B, 2 * B) == 5 * 2 * B
    assert all(load <= 2 for load in node_loads(tree, placement).values())


def test_a_full_node_sends_its_leaf_to_the_tightest_node_that_fits() -> None:
    tree = build_tree(TreeShape.of(3), {"n0": 30}, leaf_demand=1.0, parent_demand=0.5)
    placement = place_best_fit(tree, nodes(1, 3, 1.5))
    where = placement.as_dict()
    assert where["leaf0"] == "n0"  # the home node, while it has room
    assert where["leaf1"] == "n2" and where["leaf2"] == "n1"  # 1.5 is the tighter fit
    assert where["top"] == "n1"  # with a child, and it fits there
    assert node_loads(tree, placement) == {"n0": 1.0, "n2": 1.0, "n1": 1.5}


def test_round_robin_deals_the_tree_root_first() -> None:
    tree = build_tree(TreeShape.of(4), {f"n{i}": 10 for i in range(4)}, leaf_demand=0.5)
    placement = place_round_robin(tree, nodes(1, 1, 1, 1))
    assert placement.as_dict() == {"top": "n0", "leaf0": "n1", "leaf1": "n2", "leaf2": "n3",
                                   "leaf3": "n0"}
    # every leaf is off its updates' node: all 40 updates move, plus 3 partials
    assert cross_node_bytes(tree, placement, B, B) == 40 * B + 3 * B


def test_round_robin_skips_full_nodes() -> None:
    tree = build_tree(TreeShape.of(3), {"n0": 9}, leaf_demand=1.0, parent_demand=1.0)
    placement = place_round_robin(tree, nodes(1, 3))
    assert list(placement.as_dict().values()).count("n0") == 1


def test_cross_node_bytes_counts_updates_and_partials() -> None:
    tree = build_tree(TreeShape.of(2), {"n0": 3, "n1": 5})
    from strato.control import Placement

    placement = Placement("manual", (("leaf0", "n0"), ("leaf1", "n0"), ("top", "n1")))
    # leaf1 (n1's 5 updates) runs on n0: 5 updates move; both partials go to n1
    assert cross_node_bytes(tree, placement, 10, 100) == 5 * 10 + 2 * 100


@settings(max_examples=150, deadline=None)
@given(
    counts=st.lists(st.integers(0, 60), min_size=1, max_size=6).filter(lambda c: sum(c) > 0),
    leaves=st.integers(1, 12),
    fan=st.integers(2, 5),
    demand=st.floats(0.1, 1.0),
)
def test_with_ample_room_best_fit_moves_no_update_and_beats_round_robin(
    counts: list[int], leaves: int, fan: int, demand: float
) -> None:
    landing = {f"n{i}": c for i, c in enumerate(counts)}
    leaves = min(leaves, sum(counts))
    tree = build_tree(TreeShape.of(leaves, fan), landing, leaf_demand=demand)
    cluster = nodes(*[100.0] * len(counts))
    best = place_best_fit(tree, cluster)
    rr = place_round_robin(tree, cluster)
    assert {a.name for a in tree.aggregators} == set(best.as_dict()) == set(rr.as_dict())
    assert sum(q for a in tree.leaves for _, q in a.serves) == sum(counts)
    if leaves >= sum(1 for c in counts if c):  # a leaf for every node with updates
        moved = cross_node_bytes(tree, best, B, 0)
        assert moved == 0
    assert cross_node_bytes(tree, best, B, B) <= cross_node_bytes(tree, rr, B, B)


def test_nodes_must_be_named_once_and_have_cores() -> None:
    tree = build_tree(TreeShape.of(1), {"n0": 1})
    with pytest.raises(ConfigError, match="unique"):
        place_best_fit(tree, [NodeCapacity("a", 1), NodeCapacity("a", 1)])
    with pytest.raises(ConfigError, match="positive"):
        place_round_robin(tree, [NodeCapacity("a", 0)])


def test_leaf_per_node_cross_bytes_counts_updates_read_across_and_partials_up() -> None:
    from strato.control.placement import leaf_per_node_cross_bytes

    landing = {"head": 30, "a": 40, "b": 30, "idle": 0}
    # each leaf on its own node: only the two partials of the other nodes go up
    assert leaf_per_node_cross_bytes(landing, {}, "head", 100, 7) == 2 * 7
    # dealt in turn: every update is read on another node; the head's leaf is b's
    dealt = {"head": "a", "a": "b", "b": "head"}
    assert leaf_per_node_cross_bytes(landing, dealt, "head", 100, 7) == 100 * 100 + 2 * 7
    # two nodes' updates on one leaf: one partial from it
    assert leaf_per_node_cross_bytes({"a": 1, "b": 2}, {"b": "a"}, "head", 10, 3) == 2 * 10 + 3
