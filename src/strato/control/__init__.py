"""Pure control-plane policies: state in, decision and state out. No I/O, no clocks."""

from strato.control.autoscaler import (
    AutoscalerContext,
    AutoscalerState,
    Estimate,
    TreeShape,
    aggregator_names,
    choose_shards,
    decide,
    estimate,
)
from strato.control.placement import (
    AggregatorSpec,
    NodeCapacity,
    Placement,
    Tree,
    build_tree,
    cross_node_bytes,
    node_loads,
    place_best_fit,
    place_round_robin,
)

__all__ = [
    "AggregatorSpec",
    "AutoscalerContext",
    "AutoscalerState",
    "Estimate",
    "NodeCapacity",
    "Placement",
    "Tree",
    "TreeShape",
    "aggregator_names",
    "build_tree",
    "choose_shards",
    "cross_node_bytes",
    "decide",
    "estimate",
    "node_loads",
    "place_best_fit",
    "place_round_robin",
]
