"""LIFL: hierarchical, eager aggregation of client updates over node shared memory.

Updates land in a node's shared memory; a per-node dispatcher gets a descriptor of a
few bytes per update and routes it to a leaf aggregator, which adds it in place
(BLAS, reused buffers) as it arrives. Leaves' partial sums go up the tree (in place
on the same node, over a socket across nodes); the root's accumulator is the new
global model. The tree's shape comes from ``strato.control.autoscaler`` and where
each aggregator runs from ``strato.control.placement``.
"""

from strato.aggregation._executor import RuntimeExecutor, ThreadExecutor
from strato.aggregation._kernels import accumulate
from strato.aggregation._messages import AggregatorStats
from strato.aggregation._round import RoundPlan, RoundResult, RoundStats
from strato.aggregation.cluster import Cluster, RoundHandle
from strato.aggregation.node import Node, UpdateLease

__all__ = [
    "AggregatorStats",
    "Cluster",
    "Node",
    "RoundHandle",
    "RoundPlan",
    "RoundResult",
    "RoundStats",
    "RuntimeExecutor",
    "ThreadExecutor",
    "UpdateLease",
    "accumulate",
]
