"""FSD-Inference: fully serverless distributed inference of large sparse DNNs.

The Sparse DNN Graph Challenge workload (``network``, ``inputs``, ``tsv``), the scipy
oracle and the GraphBLAS baseline (``reference``), the workers' kernel (``kernel``),
partitioners (``partition``), the two exchange channels (``channels``), the worker
function (``worker``), the coordinator (``run``) and the cost model (``cost``).
"""

from strato.inference.network import Network, generate_network
from strato.inference.partition import PARTITIONERS, Partition, make_partition
from strato.inference.reference import reference_inference

__all__ = [
    "PARTITIONERS",
    "Network",
    "Partition",
    "generate_network",
    "make_partition",
    "reference_inference",
]
