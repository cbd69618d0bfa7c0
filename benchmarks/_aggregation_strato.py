"""The strato system in the aggregation benchmark (runs in its own child process).

The gateway-less in-process path: at each client's arrival time the load generator
copies the update into the node's shared memory (the stand-in for a gateway reading
a socket into place) and hands the dispatcher its descriptor. One warm-up round,
then measured rounds; the autoscaler decides each round from what the previous
round measured. ``configs`` lists what to run each repetition, interleaved:
``"auto"`` (autoscaler) or a leaf count (a fixed flat tree) — the sweep compares them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from _aggregation_common import (
    Workload,
    huge_zeros,
    log,
    max_rel_error,
    peak_rss_kb,
    reset_peak_rss,
    sleep_until,
    status_kb,
    tree_cpu_s,
)
from strato.aggregation import Cluster, RoundStats
from strato.control import AutoscalerState, TreeShape, decide


def _round(
    cluster: Cluster,
    round_no: int,
    shape: TreeShape,
    wl: Workload,
    bases: list[Any],
    weights: Any,
    schedule: Any,
    batch: int,
    acc_dtype: str,
) -> tuple[RoundStats, float, float, Any, float, float]:
    plan = cluster.plan(shape, {"n0": wl.clients})
    handle = cluster.begin_round(
        round_no, plan, nbytes=wl.params * 4, batch=batch, acc_dtype=acc_dtype
    )
    t0 = time.monotonic() + 0.02
    cpu0 = time.thread_time()  # the ingest's own CPU (sleeps do not count)
    for i in range(wl.clients):
        due = t0 + schedule[i]
        sleep_until(due)
        # the client started uploading when it was due, whatever kept us from it
        handle.ingest("n0", bases[i % len(bases)], client=str(i), weight=float(weights[i]),
                      requested_at=due)
    ingested = time.monotonic()  # the last update is in shared memory
    cpu = time.thread_time() - cpu0
    # Cores the ingest kept busy while updates arrived: the node's aggregators can
    # only use the rest (the autoscaler's "available cores").
    ingest_cores = min(1.0, cpu / max(ingested - (t0 + float(schedule[0])), 1e-9))
    result = handle.result(timeout=600)
    return handle.stats(), t0, result.ready_at, result, ingested - due, ingest_cores


def _floor_probe(wl: Workload, bases: list[Any], rows: int) -> tuple[Any, Any]:
    """A few updates stacked in one array: ``w @ S`` on them, timed right after each
    round in this same process (1 BLAS thread, like one aggregator), is the memory-
    bandwidth floor per update under the very same machine load."""
    rows = max(0, min(rows, wl.clients, (1 << 30) // (wl.params * 4)))
    stacked = huge_zeros((rows, wl.params), np.float32)  # like the server's stacked S
    for i in range(rows):
        stacked[i] = bases[i % len(bases)]
    return stacked, np.full(rows, 1.0 / max(1, rows), dtype=np.float32)


def _time_floor(stacked: Any, w: Any) -> float:
    if not len(stacked):
        return float("nan")
    out = np.empty(stacked.shape[1], dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        np.matmul(w, stacked, out=out)
        best = min(best, time.perf_counter() - started)
    return best


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    wl = Workload(**cfg["workload"])
    reps = int(cfg.get("reps", 3))
    cores = float(cfg.get("cores", 2))
    batch = int(cfg.get("batch", 4))
    configs: list[Any] = cfg.get("configs", ["auto"])
    bases, weights, schedule = wl.bases(), wl.weights(), wl.schedule()
    reference = wl.reference(bases)
    probe, probe_w = _floor_probe(wl, bases, int(cfg.get("floor_rows", 16)))
    source_kb = (sum(b.nbytes for b in bases) + reference.nbytes + probe.nbytes) // 1024
    reset_peak_rss()
    records: dict[str, list[dict[str, Any]]] = {str(c): [] for c in configs}
    worker_rss: dict[int, int] = {}
    worst_error = 0.0
    round_no = 0
    with Cluster.local(
        1, cores=cores, executor=cfg.get("executor", "runtime"), keep_alive_s=600.0
    ) as cluster:
        states = {str(c): AutoscalerState() for c in configs}
        contexts: dict[str, Any] = {}
        for rep in range(-1, reps):  # rep -1 is the warm-up
            # rotate the order each repetition: no configuration always runs first
            shift = max(rep, 0) % len(configs)
            for config in configs[shift:] + configs[:shift]:
                key = str(config)
                if config == "auto":
                    ctx = contexts.get(key)
                    if ctx is None:  # nothing measured yet: as many leaves as cores
                        shape = TreeShape.of(max(1, min(int(cores), wl.clients)))
                    else:
                        shape, states[key] = decide(ctx, states[key])
                else:
                    shape = TreeShape.of(int(config))
                cpu_before = tree_cpu_s()
                stats, t0, ready, result, lag, ingest_cores = _round(
                    cluster, round_no, shape, wl, bases, weights, schedule, batch,
                    str(cfg.get("acc_dtype", "F32")),
                )
                # every process of ours: ingest (the gateway's stand-in), dispatcher,
                # node threads, aggregator workers
                cpu_s = tree_cpu_s() - cpu_before
                round_no += 1
                worst_error = max(worst_error, max_rel_error(result.array, reference))
                result.release()
                if config == "auto":
                    contexts[key] = stats.autoscaler_context(
                        expected_updates=wl.clients, cores=max(1.0, cores - ingest_cores),
                        now=time.monotonic(),
                    )
                for pid, kb in stats.peak_rss_kb().items():
                    if pid != os.getpid():  # node threads report this very process
                        worker_rss[pid] = max(worker_rss.get(pid, 0), kb)
                if rep < 0:
                    continue
                floor_s = _time_floor(probe, probe_w) * wl.clients / max(1, len(probe))
                records[key].append(
                    {
                        "shape": shape.to_dict(),
                        # last update wholly in shared memory -> model ready; any wait for
                        # room in the node's memory budget is reported as backpressure_s
                        "completion_s": stats.completion_s,
                        # ... and from when the last client started sending
                        "completion_from_due_s": ready - max(stats.arrivals),
                        "backpressure_s": stats.backpressure_s,
                        "total_s": ready - t0,
                        "ingest_lag_s": lag,  # due → last update landed in shm
                        "ingest_cores": ingest_cores,
                        "billed_s": stats.billed_s,
                        "cpu_s": cpu_s,
                        "busy_s": stats.busy_s,
                        "floor_s": floor_s,  # w @ S for this many updates, measured now
                        "invocations": stats.invocations,
                        "cold_starts": stats.cold_starts,
                        "batches": {a.name: a.batches for a in stats.aggregators},
                        "cross_node_bytes": stats.cross_node_bytes,
                        "ingested_bytes": stats.ingested_bytes,
                    }
                )
                log(
                    f"  strato[{key}] rep {rep}: leaves={shape.leaves} "
                    f"completion={stats.completion_s:.4f}s billed={stats.billed_s:.3f}s "
                    f"busy={stats.busy_s:.3f}s"
                )
    own_kb = peak_rss_kb()
    return {
        "records": records,
        "max_rel_error": worst_error,
        "peak_rss_kb": {
            "node_process": own_kb,
            "node_process_minus_source": own_kb - source_kb,
            "aggregator_workers": sum(worker_rss.values()),
            "aggregator_worker_count": len(worker_rss),
            "total_minus_source": own_kb - source_kb + sum(worker_rss.values()),
        },
        "source_kb": source_kb,
        "rss_now_kb": status_kb("VmRSS"),
    }


def run_placement(cfg: dict[str, Any]) -> dict[str, Any]:
    """Four nodes in this process; the same tree placed best-fit and round-robin."""
    from strato.control import build_tree, cross_node_bytes, place_best_fit, place_round_robin

    wl = Workload(**cfg["workload"])
    nodes = int(cfg.get("nodes", 4))
    shape = TreeShape.of(int(cfg.get("leaves", 8)), int(cfg.get("fan_in", 4)))
    leaf_demand = float(cfg.get("leaf_demand", 0.5))
    bases, weights = wl.bases(), wl.weights()
    reference = wl.reference(bases)
    landing = {f"n{i}": len(range(i, wl.clients, nodes)) for i in range(nodes)}
    out: dict[str, Any] = {"nodes": nodes, "shape": shape.to_dict(), "landing": landing}
    with Cluster.local(nodes, cores=float(cfg.get("node_cores", 2)),
                       executor=cfg.get("executor", "threads")) as cluster:
        tree = build_tree(shape, landing, leaf_demand=leaf_demand)
        for round_no, policy in enumerate(["best-fit", "round-robin"]):
            plan = cluster.plan(shape, landing, policy=policy, leaf_demand=leaf_demand)
            handle = cluster.begin_round(round_no, plan, nbytes=wl.params * 4)
            for i in range(wl.clients):
                handle.ingest(f"n{i % nodes}", bases[i % len(bases)], client=str(i),
                              weight=float(weights[i]))
            result = handle.result(timeout=600)
            error = max_rel_error(result.array, reference)
            result.release()
            stats = handle.stats()
            placement = place_best_fit(tree, cluster.capacities) if policy == "best-fit" \
                else place_round_robin(tree, cluster.capacities)
            predicted = cross_node_bytes(tree, placement, wl.params * 4, wl.params * 4)
            out[policy] = {
                "placement": plan.placement.as_dict(),
                "measured_cross_node_bytes": stats.cross_node_bytes,
                "predicted_cross_node_bytes": predicted,
                "max_rel_error": error,
            }
            log(f"  placement {policy}: {stats.cross_node_bytes} bytes across nodes "
                f"(predicted {predicted})")
    best = out["best-fit"]["measured_cross_node_bytes"]
    out["ratio"] = out["round-robin"]["measured_cross_node_bytes"] / best if best else float("inf")
    return out
