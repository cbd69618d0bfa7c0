"""Cost model: count every billable operation, predict the counts, price them.

Prices are AWS list prices (us-east-1, x86 Lambda, S3 Standard, SNS/SQS standard):
Lambda $0.0000166667 per GB-s and $0.20 per million requests; SNS $0.50 per million
publish requests, each 64 KB chunk of a payload billed as one (deliveries to SQS are
free); SQS $0.40 per million requests, a receive billed per 64 KB chunk it returns
(an empty receive is one request), a delete one; S3 $0.005 per thousand PUT/LIST and
$0.0004 per thousand GET.

Prediction happens before the run, from the partition and the sizes: the exchange
lists come from the partition, and the bytes of each (source, target) block from a
*profile*: the kernel run on a small sample of the inputs (every k-th image), whose
per-neuron row lengths are scaled to the full input count and whose blocks are
compressed to measure the compression ratio. Message counts then come from the same
packing function the bus channel uses (``plan_bus_messages``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from strato.inference._wire import encode_rows
from strato.inference.channels import bus_groups, chunks, plan_bus_messages
from strato.inference.kernel import apply_layer, release_scratch, transposed_layers
from strato.inference.partition import Partition, send_lists

__all__ = [
    "PRICES",
    "SizeProfile",
    "predict_counts",
    "predict_seconds",
    "price",
    "profile_sizes",
]

PRICES = {
    "lambda_gb_s": 0.0000166667,
    "lambda_request": 0.20e-6,
    "sns_request": 0.50e-6,  # per 64 KB chunk published
    "sqs_request": 0.40e-6,  # per 64 KB chunk received, per empty receive, per delete
    "s3_put_list": 0.005e-3,
    "s3_get": 0.0004e-3,
}


def price(counts: dict[str, float]) -> float:
    """US dollars for a run's operation counts."""
    c = Counter(counts)
    return float(
        c["gb_s"] * PRICES["lambda_gb_s"]
        + c["invocations"] * PRICES["lambda_request"]
        + (c["publish_chunks"] + c["control_publishes"]) * PRICES["sns_request"]
        + (c["receive_chunks"] + c["empty_receives"] + c["deletes"]) * PRICES["sqs_request"]
        + (c["control_receives"] + c["control_empty_receives"] + c["control_deletes"])
        * PRICES["sqs_request"]
        + (c["puts"] + c["lists"] + c["setup_puts"]) * PRICES["s3_put_list"]
        + (c["gets"] + c["setup_gets"]) * PRICES["s3_get"]
    )


@dataclass
class SizeProfile:
    """Predicted bytes of every exchanged block and the compute seconds of one process."""

    block_bytes: np.ndarray  # (L-1, W, W): source × target, compressed bytes (0 = empty)
    compute_s: float  # single-process kernel seconds for all inputs (scaled from the sample)
    sample: int


def profile_sizes(
    layers: list[sp.csr_matrix],
    biases: list[float],
    inputs: sp.csr_matrix,
    partition: Partition,
    sample: int | None = None,
) -> SizeProfile:
    """Run the kernel on every k-th input and extrapolate its block sizes to all inputs.

    Compressed sizes do not scale in proportion (fixed overheads, better matching in
    bigger blocks), so each block is compressed at two sample sizes (all sampled
    images, and the first half of them) and its size extrapolated linearly in the
    number of images."""
    k_all = inputs.shape[0]
    if sample is None:
        sample = max(1000, k_all // 20)
    step = max(1, k_all // sample)
    picked = inputs[::step]
    s2 = picked.shape[0]
    s1 = max(1, s2 // 2)
    nw, nl = partition.workers, len(layers)
    out = np.zeros((max(nl - 1, 0), nw, nw), dtype=np.float64)
    a = sp.csr_matrix(picked.T, dtype=np.float32)
    kernel_s = 0.0
    for li, (wt, b) in enumerate(zip(transposed_layers(layers), biases, strict=True)):
        t0 = time.perf_counter()
        a = apply_layer(wt, a, b)
        kernel_s += time.perf_counter() - t0
        if li == nl - 1:
            break
        half = sp.csr_matrix(a[:, :s1])
        lists = send_lists(layers[li + 1], partition.owner[li], partition.owner[li + 1], nw)
        for (s, t), rows in lists.items():
            c2, c1 = len(encode_rows(a, rows)), len(encode_rows(half, rows))
            if s2 == s1 or s2 >= k_all:
                out[li, s, t] = c2 * k_all / s2
            else:
                out[li, s, t] = max(c2 + (c2 - c1) * (k_all - s2) / (s2 - s1), 16.0)
    release_scratch()
    return SizeProfile(out, kernel_s * k_all / s2, s2)


def predict_counts(
    profile: SizeProfile, channel: str, workers: int, group_size: int = 16
) -> dict[str, float]:
    """Operation counts of a run, before it runs."""
    nb = profile.block_bytes.shape[0]
    c: Counter[str] = Counter()
    c["invocations"] = workers
    c["control_publishes"] = c["control_receives"] = c["control_deletes"] = workers
    c["setup_puts"] = workers + 1 + workers  # plans, inputs, results
    c["setup_gets"] = 2 * workers + workers
    if workers == 1 or nb == 0:
        return dict(c)
    sizes = np.rint(profile.block_bytes).astype(np.int64)
    if channel == "bus":
        groups = bus_groups(workers, group_size)
        for li in range(nb):
            for s in range(workers):
                row = {q: int(sizes[li, s, q]) for q in range(workers) if q != s}
                for _, _, sections, nbytes in plan_bus_messages(s, row, groups):
                    c["publish_calls"] += 1
                    c["publish_chunks"] += chunks(nbytes)
                    c["bytes_published"] += nbytes
                    delivered = len(sections)  # one queue per target section
                    c["messages_received"] += delivered
                    c["receive_calls"] += delivered
                    c["receive_chunks"] += delivered * chunks(nbytes)
                    c["deletes"] += delivered
    else:
        pairs = workers * (workers - 1)
        c["puts"] = c["gets"] = nb * pairs
        c["lists"] = nb * workers  # at least one listing per receiver and layer
        c["bytes_put"] = int(sizes.sum())
    return dict(c)


def predict_seconds(
    profile: SizeProfile, channel: str, workers: int, counts: dict[str, float]
) -> float:
    """Rough latency of a run on the embedded backend (used by --workers/--channel auto).

    Compute divides across workers up to the cores they can use; every message and
    object costs a measured per-operation overhead; each layer boundary costs one
    synchronisation. Constants measured on this machine (docs/inference.md)."""
    import os

    cores = max(1, min(workers, os.cpu_count() or 1))
    compute = profile.compute_s / cores * (1.0 + 0.05 * (workers - 1))
    nb = profile.block_bytes.shape[0]
    if channel == "bus":
        ops = counts.get("publish_calls", 0) + counts.get("receive_calls", 0)
        per_op, per_byte, per_layer = 1.5e-3, 1.0 / 100e6, 0.02
        nbytes = counts.get("bytes_published", 0)
    else:
        ops = counts.get("puts", 0) + counts.get("gets", 0) + counts.get("lists", 0)
        per_op, per_byte, per_layer = 2.0e-3, 1.0 / 200e6, 0.02
        nbytes = counts.get("bytes_put", 0)
    exchange = 0.0 if workers == 1 else (ops * per_op + nbytes * per_byte) / cores + nb * per_layer
    launch = 1.0 + 0.1 * workers
    return float(compute + exchange + launch)

