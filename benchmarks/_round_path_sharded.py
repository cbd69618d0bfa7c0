"""The sharded-median part of benchmarks/round_path.py (a child process of its own).

While ``strato.aggregation.sharded`` does not exist, ``probe()`` says so and the
benchmark reports ``sharded_median_peak_mb: null`` with the note
``"pending: sharded aggregation"``. Once it does, ``run()`` drives one median round
(``fedmedian``) over 64 clients × 25M float32 with ``function_memory_mb=1024`` through
``ShardedRound(runtime, "fedmedian", {}, n, k, shards=None, function_memory_mb=...)``
on an embedded ``ProcessRuntime``: client c's update is ``bases[c % 4] + c·1e-3``
(4 bases drawn once), written once into its own node shared-memory segment
(``ShmPool``) before the round and added by reference, all 64, then ``result()``.
Reported: the largest shard's peak RSS (``stats().max_peak_rss_mb``: each shard
worker's VmHWM during the round), the shard count, the round's wall time, and whether
the result equals ``np.median`` over the 64 updates on 8 sampled coordinate ranges of
1000 values (recomputed from the bases, exactly as the updates were made).
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np

from _aggregation_common import log, mem_available

PENDING = "pending: sharded aggregation"
F32 = np.float32


def probe() -> dict[str, Any]:
    try:
        from strato.aggregation import sharded
    except ImportError:
        return {"available": False, "note": PENDING}
    cls = getattr(sharded, "ShardedRound", None)
    if cls is None:
        return {"available": False,
                "note": f"{PENDING} (strato.aggregation.sharded has no ShardedRound yet)"}
    try:
        sig = str(inspect.signature(cls))
    except (TypeError, ValueError):
        sig = "?"
    return {"available": True, "signature": sig}


def memory_needed(clients: int, params: int, function_memory_mb: int) -> int:
    """Inputs in shared memory plus every shard at its cap (they hold rows together)."""
    from strato.control.autoscaler import choose_shards

    shards = choose_shards(clients, 4 * params, function_memory_mb)
    return clients * params * 4 + shards * function_memory_mb * 2**20


def _update_slice(bases: list[Any], c: int, lo: int, hi: int) -> Any:
    x = bases[c % len(bases)][lo:hi].copy()
    x += F32(1e-3 * c)
    return x


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    from strato.aggregation.sharded import ShardedRound
    from strato.services._runtime_process import ProcessRuntime
    from strato.services.shm import ShmPool

    clients, params = int(cfg.get("clients", 64)), int(cfg.get("params", 25_000_000))
    memory_mb = int(cfg.get("function_memory_mb", 1024))
    out: dict[str, Any] = {"clients": clients, "params": params, "strategy": "fedmedian",
                           "function_memory_mb": memory_mb, "inputs": "node shared memory"}
    rng = np.random.default_rng(0)
    bases = [rng.standard_normal(params, dtype=F32) for _ in range(4)]
    with ShmPool(max_idle_bytes=0) as pool, ProcessRuntime() as runtime:
        leases = []
        try:
            for c in range(clients):
                lease = pool.lease(4 * params)
                x = np.frombuffer(lease.buffer, dtype=F32, count=params)
                x[:] = bases[c % len(bases)]
                x += F32(1e-3 * c)
                del x
                leases.append(lease)
            log(f"  {clients} updates of {params:,} in shared memory "
                f"({mem_available() / 2**30:.1f} GiB available)")
            started = time.monotonic()
            with ShardedRound(runtime, "fedmedian", {}, params, clients, None,
                              function_memory_mb=memory_mb) as rnd:
                for c, lease in enumerate(leases):
                    rnd.add(f"c{c}", lease, 1.0)
                result = rnd.result(timeout=1800)
                wall = time.monotonic() - started
                stats = rnd.stats()
        finally:
            for lease in leases:
                lease.release()
    lo_s = np.linspace(0, params - 1000, 8).astype(int)
    ranges = [(int(lo), int(lo) + 1000) for lo in lo_s]
    equal = all(
        np.array_equal(
            np.median(np.stack([_update_slice(bases, c, lo, hi) for c in range(clients)]),
                      axis=0),
            result[lo:hi],
        )
        for lo, hi in ranges
    )
    out.update({
        "value": stats.max_peak_rss_mb,
        "equals_np_median_on_samples": bool(equal),
        "sampled_ranges": ranges,
        "round_wall_s": wall,
        "stats": stats.to_dict(),
    })
    log(f"  sharded median: {stats.shards} shards, largest peak {stats.max_peak_rss_mb:.0f} MiB, "
        f"{wall:.1f}s, equals np.median on samples: {equal}")
    return out
