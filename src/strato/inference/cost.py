"""Cost model: count every billable operation, predict the counts, price them.

Prices are AWS list prices (us-east-1, x86 Lambda, S3 Standard, SNS/SQS standard):
Lambda $0.0000166667 per GB-s and $0.20 per million requests; SNS $0.50 per million
publish requests, each 64 KB chunk of a payload billed as one (deliveries to SQS are
free); SQS $0.40 per million requests, a receive billed per 64 KB chunk it returns
(an empty receive is one request), a delete one; S3 $0.005 per thousand PUT/LIST and
$0.0004 per thousand GET.

Prediction happens before the run, from the partition and the sizes. The exchange
lists come from the partition; the bytes of each (source, target) block from a
*profile*: the kernel runs on a sample of the inputs, and every block is compressed
at its full size. Two measured pitfalls shape the profile (docs/inference.md):

- MNIST is ordered in clusters, so every k-th image gives the live-image count to
  ±25% at a 5% sample; the sample is therefore *stratified* by the images' nonzero
  count (every k-th image in that order), 20% by default (±2–3%).
- Compressed sizes do not scale with the image count (fixed overheads per block,
  matches that fit the compressor's window at one size and not at another: −30% to
  +40% per layer). So the sample's activation rows are widened to the full image
  count (each sampled image reappears ⌈K/s⌉ times at random column positions, the
  same for every row: a bootstrap of the images) and each block is compressed
  exactly as the worker will, at its real size.

Message counts then come from the same packing function the bus channel uses
(``plan_bus_messages``); object and notice counts from the blob protocol, which
is deterministic (``channels.BlobChannel``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from strato.codec.rows import block_layout
from strato.inference import _numba_rows as nr
from strato.inference._wire import pack_block
from strato.inference.channels import (
    NOTICE_BYTES,
    bus_groups,
    chunks,
    notice_groups,
    plan_bus_messages,
)
from strato.inference.kernel import apply_layer, release_scratch, transposed_layers
from strato.inference.partition import Partition, send_lists
from strato.inference.plan import twin_classes

__all__ = [
    "PRICES",
    "SizeProfile",
    "predict_counts",
    "predict_seconds",
    "price",
    "profile_sample",
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

SAMPLE_FRACTION = 0.2  # of the inputs profiled (stratified)
SAMPLE_MIN = 2000  # profile every input when there are at most this many


def price(counts: dict[str, float]) -> float:
    """US dollars for a run's operation counts."""
    c = Counter(counts)
    sns = c["publish_chunks"] + c["control_publishes"] + c["notice_publishes"]
    sqs = (
        c["receive_chunks"] + c["empty_receives"] + c["deletes"]
        + c["control_receives"] + c["control_empty_receives"] + c["control_deletes"]
        + c["notice_receives"] + c["notice_empty_receives"] + c["notice_deletes"]
    )
    return float(
        c["gb_s"] * PRICES["lambda_gb_s"]
        + c["invocations"] * PRICES["lambda_request"]
        + sns * PRICES["sns_request"]
        + sqs * PRICES["sqs_request"]
        + (c["puts"] + c["lists"] + c["setup_puts"]) * PRICES["s3_put_list"]
        + (c["gets"] + c["setup_gets"]) * PRICES["s3_get"]
    )


@dataclass
class SizeProfile:
    """Predicted bytes of every exchanged block and the compute seconds of one process."""

    block_bytes: np.ndarray  # (L-1, W, W): source × target, compressed bytes (0 = empty)
    compute_s: float  # single-process kernel seconds for all inputs (scaled from the sample)
    sample: int


def profile_sample(
    inputs: sp.csr_matrix, fraction: float = SAMPLE_FRACTION, minimum: int = SAMPLE_MIN
) -> np.ndarray:
    """Sorted indices of the profiled images: all of them up to ``minimum``, else a
    systematic sample of ``fraction`` of them in order of their nonzero count (the
    count stratifies survival: the densest tenth of the 1024-neuron MNIST images
    holds 83% of the survivors)."""
    k = inputs.shape[0]
    size = max(minimum, round(k * fraction))
    if size >= k:
        return np.arange(k, dtype=np.int64)
    order = np.argsort(np.diff(inputs.indptr), kind="stable")
    picks = (np.arange(size, dtype=np.int64) * k) // size + (k // size) // 2
    return np.sort(order[picks])


def _widening(sample: int, full: int, seed: int) -> np.ndarray:
    """``newcol[t, c]``: where copy ``t`` of sampled image ``c`` sits among ``full``
    columns (−1: not used). Copies interleave (column ``perm_t[c]·copies + t``) so
    each copy's images are spread over the whole width in a random order."""
    copies = -(-full // sample)
    rng = np.random.default_rng(seed)
    newcol = np.empty((copies, sample), dtype=np.int64)
    for t in range(copies):
        newcol[t] = rng.permutation(sample) * copies + t
    newcol[newcol >= full] = -1
    return newcol


def profile_sizes(
    layers: list[sp.csr_matrix],
    biases: list[float],
    inputs: sp.csr_matrix,
    partitions: Sequence[Partition],
    fraction: float = SAMPLE_FRACTION,
    minimum: int = SAMPLE_MIN,
    seed: int = 0,
) -> list[SizeProfile]:
    """One pass of the kernel over the profiled images; the block sizes of every
    partition in ``partitions`` at the full input count."""
    k_all = inputs.shape[0]
    picked = profile_sample(inputs, fraction, minimum)
    s = picked.size
    newcol = _widening(s, k_all, seed) if s < k_all else None
    nl = len(layers)
    outs = [np.zeros((max(nl - 1, 0), p.workers, p.workers)) for p in partitions]
    a = sp.csr_matrix(inputs[picked].T, dtype=np.float32)
    kernel_s = 0.0
    wts = transposed_layers(layers)
    for li, (wt, b) in enumerate(zip(wts, biases, strict=True)):
        t0 = time.perf_counter()
        a = apply_layer(wt, a, b)
        kernel_s += time.perf_counter() - t0
        if li == nl - 1:
            break
        classes = twin_classes(wt)
        _, reps = np.unique(classes, return_index=True)  # class c's first neuron
        if newcol is None:
            full, row_of = a, None
        else:
            sub = a[reps]
            ip, ix, dx = nr.expand_columns(sub.indptr, sub.indices, sub.data, newcol, k_all)
            full = sp.csr_matrix((dx, ix, ip), shape=(reps.size, k_all))
            row_of = classes  # neuron → its class's row in ``full``
        for part, out in zip(partitions, outs, strict=True):
            lists = send_lists(layers[li + 1], part.owner[li], part.owner[li + 1], part.workers)
            for (src, dst), rows in lists.items():
                distinct, ref = block_layout(rows, classes[rows])
                if row_of is not None:
                    distinct = row_of[distinct].astype(np.int64)
                out[li, src, dst] = len(pack_block(full, distinct, ref))
    release_scratch()
    compute_s = kernel_s * k_all / s
    return [SizeProfile(out, compute_s, s) for out in outs]


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
    groups = bus_groups(workers, group_size)
    if channel == "bus":
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
        blocks = int(np.count_nonzero(sizes))  # empty blocks are not stored
        c["puts"] = c["gets"] = blocks
        c["bytes_put"] = int(sizes.sum())
        c["lists"] = nb * workers  # one per receiver and boundary, after the notices
        per_layer = sum(len(notice_groups(s, groups)) for s in range(workers))
        c["notice_publishes"] = nb * per_layer
        c["notice_receives"] = c["notice_deletes"] = nb * workers * (workers - 1)
        c["notice_bytes"] = c["notice_publishes"] * NOTICE_BYTES
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
        ops = sum(
            counts.get(k, 0)
            for k in ("puts", "gets", "lists", "notice_publishes", "notice_receives")
        )
        per_op, per_byte, per_layer = 2.0e-3, 1.0 / 200e6, 0.02
        nbytes = counts.get("bytes_put", 0)
    exchange = 0.0 if workers == 1 else (ops * per_op + nbytes * per_byte) / cores + nb * per_layer
    launch = 1.0 + 0.1 * workers
    return float(compute + exchange + launch)

