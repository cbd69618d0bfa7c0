"""Predict a configuration's operation counts, cost and latency; pick one automatically.

``--workers auto`` / ``--channel auto``: every candidate (W in powers of two up to a
maximum, each channel) is partitioned and profiled, its counts predicted and priced,
and the cheapest one whose predicted latency meets the target wins; when none meets
it, the fastest. FSD-Inference left this choice to the user.
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.sparse as sp

from strato.inference.cost import (
    SizeProfile,
    predict_counts,
    predict_seconds,
    price,
    profile_sizes,
)
from strato.inference.partition import Partition, make_partition

__all__ = ["Candidate", "choose", "estimate", "predict"]


@dataclass
class Candidate:
    workers: int
    channel: str
    partition: Partition
    counts: dict[str, float]
    seconds: float
    cost_usd: float

    def summary(self) -> dict[str, object]:
        return {
            "workers": self.workers,
            "channel": self.channel,
            "predicted_s": round(self.seconds, 3),
            "predicted_cost_usd": self.cost_usd,
        }


def estimate(
    profile: SizeProfile, partition: Partition, channel: str, memory_mb: int, group_size: int
) -> Candidate:
    counts = predict_counts(profile, channel, partition.workers, group_size)
    seconds = predict_seconds(profile, channel, partition.workers, counts)
    # every worker is billed for the whole run (they wait for each other)
    counts["gb_s"] = partition.workers * seconds * memory_mb / 1024.0
    return Candidate(partition.workers, channel, partition, counts, seconds, price(counts))


def predict(
    layers: list[sp.csr_matrix],
    biases: list[float],
    inputs: sp.csr_matrix,
    partition: Partition,
    channel: str,
    memory_mb: int,
    group_size: int,
) -> Candidate:
    (profile,) = profile_sizes(layers, biases, inputs, [partition])
    return estimate(profile, partition, channel, memory_mb, group_size)


def choose(
    layers: list[sp.csr_matrix],
    biases: list[float],
    inputs: sp.csr_matrix,
    method: str,
    workers: list[int],
    channels: list[str],
    latency_target_s: float | None,
    memory_mb: int,
    group_size: int,
    seed: int = 0,
) -> tuple[Candidate, list[Candidate]]:
    """The chosen candidate and every candidate considered (one profiling pass
    serves every partition)."""
    parts = [make_partition(method, layers, w, seed) for w in workers]
    profiles = profile_sizes(layers, biases, inputs, parts)
    considered = [
        estimate(profile, part, ch, memory_mb, group_size)
        for part, profile in zip(parts, profiles, strict=True)
        for ch in channels
    ]
    meeting = [
        c for c in considered if latency_target_s is None or c.seconds <= latency_target_s
    ]
    if meeting:
        best = min(meeting, key=lambda c: (c.cost_usd, c.seconds))
    else:
        best = min(considered, key=lambda c: c.seconds)
    return best, considered
