"""The aggregation engine (LIFL): hierarchical, eager aggregation over node memory.

Every run aggregates here (``strato.fl.aggregator`` is its node agent). Updates land
in a node's memory (shared memory, or the blob file a client wrote, mapped in place);
a per-node dispatcher gets a descriptor of a few bytes per update and routes it to a
leaf aggregator, which validates and adds it in one pass (reused buffers) as it
arrives. Leaves' partial sums go up the tree (in place on the same node, over a
socket across nodes); the root's accumulator is the new global model. The tree's
shape comes from ``strato.control.autoscaler`` and where each aggregator runs from
``strato.control.placement``. Robust rules (median, trimmed mean, Krum) run on
coordinate-sharded aggregators (``sharded``), each holding K × |θ|/M values within
a function's memory.
"""

from strato.aggregation._executor import RuntimeExecutor, ThreadExecutor
from strato.aggregation._inputs import attach_input, file_ref, local_ref, release_input
from strato.aggregation._kernels import accumulate
from strato.aggregation._messages import AggregatorStats
from strato.aggregation._round import RoundPlan, RoundResult, RoundStats
from strato.aggregation.cluster import Cluster, RoundHandle
from strato.aggregation.node import Node, UpdateLease
from strato.aggregation.sharded import ShardedRound, ShardedStats, shard_ranges

__all__ = [
    "AggregatorStats",
    "Cluster",
    "Node",
    "RoundHandle",
    "RoundPlan",
    "RoundResult",
    "RoundStats",
    "RuntimeExecutor",
    "ShardedRound",
    "ShardedStats",
    "ThreadExecutor",
    "UpdateLease",
    "accumulate",
    "attach_input",
    "file_ref",
    "local_ref",
    "release_input",
    "shard_ranges",
]
