"""Placement: which node runs each aggregator of a round's tree. Pure functions.

A node is a runtime with its own shared memory and a number of cores. Updates land
on nodes (wherever their clients' uploads arrive). An update read by a leaf on its
own node costs nothing to move: the leaf maps the very segment it landed in. An
update or a partial that crosses to another node is sent over a socket. So a
placement is judged by the bytes it makes cross nodes, under the nodes' capacity.

``build_tree`` turns a ``TreeShape`` into named aggregators: leaves split among the
landing nodes in proportion to the updates expected there (each leaf takes a quota
of one node's updates), siblings grouped by node, parents above them.
``place_best_fit`` puts each leaf on the node its updates land on and each parent on
the node holding most of its children, falling back to best fit (the feasible node
left with the least spare capacity) when the preferred node is full.
``place_round_robin`` is the locality-blind comparison: the tree, launched from the
root down, dealt to nodes in turn (skipping full ones).
``cross_node_bytes`` prices a placement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from strato.control.autoscaler import TreeShape, aggregator_names
from strato.errors import ConfigError

__all__ = [
    "AggregatorSpec",
    "NodeCapacity",
    "Placement",
    "Tree",
    "build_tree",
    "cross_node_bytes",
    "leaf_per_node_cross_bytes",
    "node_loads",
    "place_best_fit",
    "place_round_robin",
]

_EPS = 1e-9


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    cores: float


@dataclass(frozen=True)
class AggregatorSpec:
    """One aggregator of a tree. Leaves have quotas of updates per landing node."""

    name: str
    level: int  # 0 for leaves
    parent: str | None
    children: tuple[str, ...]
    serves: tuple[tuple[str, int], ...]  # leaves: (landing node, updates expected from it)
    demand: float  # cores it is expected to keep busy

    @property
    def is_leaf(self) -> bool:
        return self.level == 0

    @property
    def is_root(self) -> bool:
        return self.parent is None

    @property
    def expected_inputs(self) -> int:
        """Updates (leaf) or partials (parent) it must receive to be complete."""
        return sum(q for _, q in self.serves) if self.is_leaf else len(self.children)

    @property
    def home(self) -> str | None:
        """The landing node this leaf takes the most updates from."""
        if not self.serves:
            return None
        return max(self.serves, key=lambda s: s[1])[0]


@dataclass(frozen=True)
class Tree:
    aggregators: tuple[AggregatorSpec, ...]  # leaves first, root last
    shape: TreeShape

    def get(self, name: str) -> AggregatorSpec:
        for agg in self.aggregators:
            if agg.name == name:
                return agg
        raise ConfigError(f"no aggregator named {name!r} in the tree")

    @property
    def root(self) -> AggregatorSpec:
        return self.aggregators[-1]

    @property
    def leaves(self) -> tuple[AggregatorSpec, ...]:
        return tuple(a for a in self.aggregators if a.is_leaf)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.aggregators]

    def leaves_serving(self, node: str) -> list[AggregatorSpec]:
        return [a for a in self.leaves if any(n == node for n, _ in a.serves)]

    @property
    def expected_updates(self) -> int:
        return sum(a.expected_inputs for a in self.leaves)


@dataclass(frozen=True)
class Placement:
    policy: str
    assignment: tuple[tuple[str, str], ...]  # (aggregator, node)

    def as_dict(self) -> dict[str, str]:
        return dict(self.assignment)

    def node_of(self, name: str) -> str:
        for agg, node in self.assignment:
            if agg == name:
                return node
        raise ConfigError(f"aggregator {name!r} is not placed")


def _split_leaves(leaves: int, landing: Mapping[str, int]) -> list[list[tuple[str, int]]]:
    """Each leaf's (node, quota) list; quotas add up to the landing counts."""
    nodes = [n for n, c in landing.items() if c > 0]
    counts = {n: landing[n] for n in nodes}
    if leaves >= len(nodes):
        per_node = {n: 1 for n in nodes}
        for _ in range(leaves - len(nodes)):
            # D'Hondt: the next leaf goes where updates per leaf are highest.
            open_nodes = [n for n in nodes if per_node[n] < counts[n]]
            best = max(open_nodes, key=lambda n: (counts[n] / per_node[n], -nodes.index(n)))
            per_node[best] += 1
        out: list[list[tuple[str, int]]] = []
        for n in nodes:
            m = per_node[n]
            base, extra = divmod(counts[n], m)
            out.extend([[(n, base + (1 if i < extra else 0))] for i in range(m)])
        return out
    # Fewer leaves than landing nodes: largest node first onto the least-loaded leaf.
    shares: list[list[tuple[str, int]]] = [[] for _ in range(leaves)]
    totals = [0] * leaves
    for n in sorted(nodes, key=lambda n: (-counts[n], nodes.index(n))):
        i = min(range(leaves), key=lambda i: (totals[i], i))
        shares[i].append((n, counts[n]))
        totals[i] += counts[n]
    return shares


def build_tree(
    shape: TreeShape,
    landing: Mapping[str, int],
    *,
    leaf_demand: float = 1.0,
    parent_demand: float = 0.25,
) -> Tree:
    """Name the aggregators of ``shape`` and give each leaf its quota of updates."""
    total = sum(landing.values())
    if any(c < 0 for c in landing.values()):
        raise ConfigError("landing counts must be ≥ 0")
    if total < shape.leaves:
        raise ConfigError(f"{shape.leaves} leaves need at least as many updates, got {total}")
    names = aggregator_names(shape)
    sizes = shape.level_sizes()
    quotas = _split_leaves(shape.leaves, landing)
    levels: list[list[str]] = []
    start = 0
    for size in sizes:
        levels.append(names[start : start + size])
        start += size
    parent_of: dict[str, str | None] = {}
    children_of: dict[str, tuple[str, ...]] = {}
    for lvl in range(len(levels) - 1):
        for j, parent in enumerate(levels[lvl + 1]):
            kids = tuple(levels[lvl][j * shape.fan_in : (j + 1) * shape.fan_in])
            children_of[parent] = kids
            for kid in kids:
                parent_of[kid] = parent
    specs: list[AggregatorSpec] = []
    for lvl, level_names in enumerate(levels):
        for i, name in enumerate(level_names):
            specs.append(
                AggregatorSpec(
                    name=name,
                    level=lvl,
                    parent=parent_of.get(name),
                    children=children_of.get(name, ()),
                    serves=tuple(quotas[i]) if lvl == 0 else (),
                    demand=leaf_demand if lvl == 0 else parent_demand,
                )
            )
    return Tree(tuple(specs), shape)


def _check_nodes(nodes: Sequence[NodeCapacity]) -> None:
    if not nodes:
        raise ConfigError("placement needs at least one node")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"node names must be unique, got {names}")
    if any(n.cores <= 0 for n in nodes):
        raise ConfigError("every node needs a positive number of cores")


def _fit(
    demand: float,
    preferred: Iterable[str],
    remaining: dict[str, float],
    order: list[str],
) -> str:
    """The first preferred node with room; else best fit; else the emptiest node."""
    for node in preferred:
        if remaining[node] + _EPS >= demand:
            return node
    feasible = [n for n in order if remaining[n] + _EPS >= demand]
    if feasible:
        return min(feasible, key=lambda n: (remaining[n] - demand, order.index(n)))
    return max(order, key=lambda n: (remaining[n], -order.index(n)))  # over-commit


def place_best_fit(tree: Tree, nodes: Sequence[NodeCapacity]) -> Placement:
    """Locality first (leaf with its updates, parent with its children), then best fit."""
    _check_nodes(nodes)
    order = [n.name for n in nodes]
    remaining = {n.name: n.cores for n in nodes}
    placed: dict[str, str] = {}
    for agg in sorted(tree.leaves, key=lambda a: (-a.demand, tree.names.index(a.name))):
        prefs = [n for n, _ in sorted(agg.serves, key=lambda s: -s[1]) if n in remaining]
        node = _fit(agg.demand, prefs, remaining, order)
        placed[agg.name] = node
        remaining[node] -= agg.demand
    for agg in tree.aggregators:
        if agg.is_leaf:
            continue
        votes: dict[str, int] = {}
        for kid in agg.children:
            votes[placed[kid]] = votes.get(placed[kid], 0) + 1
        prefs = sorted(votes, key=lambda n: (-votes[n], order.index(n)))
        node = _fit(agg.demand, prefs, remaining, order)
        placed[agg.name] = node
        remaining[node] -= agg.demand
    return Placement("best-fit", tuple((a.name, placed[a.name]) for a in tree.aggregators))


def place_round_robin(tree: Tree, nodes: Sequence[NodeCapacity]) -> Placement:
    """Root first, breadth first, dealt to nodes in turn; a full node is skipped."""
    _check_nodes(nodes)
    order = [n.name for n in nodes]
    remaining = {n.name: n.cores for n in nodes}
    launch = sorted(tree.aggregators, key=lambda a: -a.level)  # stable: root, mids, leaves
    placed: dict[str, str] = {}
    cursor = 0
    for agg in launch:
        for step in range(len(order)):
            node = order[(cursor + step) % len(order)]
            if remaining[node] + _EPS >= agg.demand:
                cursor = (cursor + step + 1) % len(order)
                break
        else:
            node = order[cursor]
            cursor = (cursor + 1) % len(order)
        placed[agg.name] = node
        remaining[node] -= agg.demand
    return Placement("round-robin", tuple((a.name, placed[a.name]) for a in tree.aggregators))


def cross_node_bytes(
    tree: Tree, placement: Placement, update_bytes: int, partial_bytes: int
) -> int:
    """Bytes that must move between nodes: updates read by a leaf on another node,
    and partials sent to a parent on another node."""
    where = placement.as_dict()
    total = 0
    for agg in tree.aggregators:
        if agg.is_leaf:
            total += sum(q for n, q in agg.serves if n != where[agg.name]) * update_bytes
        if agg.parent is not None and where[agg.parent] != where[agg.name]:
            total += partial_bytes
    return total


def leaf_per_node_cross_bytes(
    landing: Mapping[str, int],
    leaf_node: Mapping[str, str],
    root_node: str,
    update_bytes: int,
    partial_bytes: int,
) -> int:
    """Bytes a round moves between nodes when the updates landing on node n are added by
    a leaf on ``leaf_node[n]`` (default: n itself) and every node holding a leaf, other
    than the root's, sends one partial up: updates read by a leaf on another node, one
    partial per such node. (The tree of a cluster of nodes: one leaf per landing node.)"""
    total = 0
    leaves = set()
    for node, count in landing.items():
        if count <= 0:
            continue
        at = leaf_node.get(node, node)
        if at != node:
            total += count * update_bytes
        leaves.add(at)
    return total + len(leaves - {root_node}) * partial_bytes


def node_loads(tree: Tree, placement: Placement) -> dict[str, float]:
    """Cores of demand placed on each node."""
    loads: dict[str, float] = {}
    for agg in tree.aggregators:
        node = placement.node_of(agg.name)
        loads[node] = loads.get(node, 0.0) + agg.demand
    return loads
