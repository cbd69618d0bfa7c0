"""The coordinator of a distributed inference run, written only against the primitives.

1. put each worker's share of the network (``plan.build_plans``) and the inputs in the
   blob store: workers get them by reference, events stay a few hundred bytes;
2. set up bus topics per worker group with filtered per-worker queues (they carry
   the activations on the bus channel, the layer notices on the blob channel) and
   the control topic on which workers report "done";
3. launch the workers flat (the coordinator starts all W) or as a tree (the
   coordinator starts b, each worker starts b more: ``worker.children``);
4. wait for W reports, gather the categories, sum the operation counts, clean up.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from strato.codec.rows import save_arrays
from strato.errors import FunctionError, StratoError
from strato.inference.channels import bus_filter, bus_groups, queue_name, topic_name
from strato.inference.partition import Partition
from strato.inference.plan import build_plans
from strato.inference.worker import control_queue, control_topic
from strato.services import FunctionSpec, Services

__all__ = ["RunOptions", "run_distributed"]

HANDLER = "strato.inference.worker:handler"


@dataclass(frozen=True)
class RunOptions:
    channel: str = "bus"  # "bus" | "blob"
    branching: int = 0  # 0 = flat launch, b > 0 = tree of branching b
    group_size: int = 16  # workers per bus topic
    memory_mb: int = 2048
    timeout_s: float = 1800.0
    function: str = "strato-infer"


def _counts_of(reports: list[dict[str, Any]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for r in reports:
        total.update(r.get("counts", {}))
    return total


def run_distributed(
    services: Services,
    layers: list[sp.csr_matrix],
    biases: list[float],
    inputs: sp.csr_matrix,
    partition: Partition,
    options: RunOptions,
) -> dict[str, Any]:
    """Run inference on ``partition.workers`` Runtime functions; returns the results."""
    nw = partition.workers
    run = uuid.uuid4().hex[:10]
    bus, blobs, runtime = services.bus, services.blobs, services.runtime
    t_setup = time.perf_counter()
    for p, plan in enumerate(build_plans(layers, biases, partition)):
        blobs.put(f"inf/{run}/plan/{p}", plan.to_bytes())
    a0 = sp.csr_matrix(inputs.T, dtype=np.float32)
    blobs.put(
        f"inf/{run}/inputs",
        save_arrays({
            "indptr": a0.indptr.astype(np.int64),
            "indices": a0.indices.astype(np.int32),
            "data": a0.data,
            "shape": np.array(a0.shape, dtype=np.int64),
        }),
    )
    del a0
    bus.create_topic(control_topic(run))
    bus.subscribe(control_topic(run), control_queue(run))
    if nw > 1:  # both channels: activations (bus) or layer notices (blob)
        for gi, group in enumerate(bus_groups(nw, options.group_size)):
            bus.create_topic(topic_name(run, gi))
            for q in group:
                bus.subscribe(topic_name(run, gi), queue_name(run, q), bus_filter(q, group))
    runtime.register(
        FunctionSpec(
            name=options.function,
            handler=HANDLER,
            timeout_s=options.timeout_s,
            max_concurrency=max(nw, 1),
            keep_alive_s=120.0,
            memory_mb=options.memory_mb,
            retries=0,  # a retried worker would replay a layer its peers moved past
        )
    )
    setup_s = time.perf_counter() - t_setup
    before = runtime.stats(options.function)
    event = {
        "run": run,
        "workers": nw,
        "channel": options.channel,
        "group_size": options.group_size,
        "branching": options.branching,
        "function": options.function,
        "timeout_s": options.timeout_s,
    }
    roots = range(nw) if options.branching <= 0 else range(min(options.branching, nw))
    t0 = time.time()
    futures = [runtime.invoke_async(options.function, {**event, "worker": p}) for p in roots]
    try:
        reports, control = _collect(services, run, nw, futures, options.timeout_s)
        categories = np.unique(
            np.concatenate(
                [np.frombuffer(bytes(blobs.get(f"inf/{run}/result/{p}")), np.int64)
                 for p in range(nw)]
            )
        )
        for f in futures:
            f.result(timeout=options.timeout_s)
        after = _settled_stats(services, options.function, before.invocations + nw)
    finally:
        _cleanup(services, run, nw, options)
    counts = _counts_of(reports)
    counts.update(control)
    counts["invocations"] = after.invocations - before.invocations
    counts["cold_starts"] = after.cold_starts - before.cold_starts
    counts["gb_s"] = after.gb_s - before.gb_s
    counts["billed_s"] = after.billed_s - before.billed_s
    counts["setup_puts"] = nw + 1 + nw
    counts["setup_gets"] = 3 * nw
    t_ready = min(r["t_ready"] for r in reports)
    t_end = max(r["t_end"] for r in reports)
    return {
        "run": run,
        "categories": categories,
        "inference_s": t_end - t_ready,
        "total_s": t_end - t0,
        "launch_s": max(r["t_start"] for r in reports) - t0,
        "setup_s": setup_s,
        "compute_s": [r["compute_s"] for r in reports],
        "exchange_s": [r["exchange_s"] for r in reports],
        "counts": dict(counts),
    }


def _collect(
    services: Services, run: str, workers: int, futures: list[Future[Any]], timeout_s: float
) -> tuple[list[dict[str, Any]], Counter[str]]:
    reports: dict[int, dict[str, Any]] = {}
    control: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    while len(reports) < workers:
        for f in futures:  # a root that failed before it could report
            if f.done() and f.exception() is not None:
                raise FunctionError(f"an inference worker failed: {f.exception()}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StratoError(f"inference run {run}: {workers - len(reports)} worker(s) silent")
        got = services.bus.receive(control_queue(run), max_messages=1, wait_s=min(1.0, remaining))
        control["control_receives" if got else "control_empty_receives"] += 1
        for m in got:
            report = m.json()
            assert isinstance(report, dict)
            services.bus.ack(control_queue(run), m.receipt)
            control["control_deletes"] += 1
            if not report.get("ok"):
                raise FunctionError(
                    f"inference worker {report.get('worker')} failed: {report.get('error')}"
                )
            reports[int(report["worker"])] = report
    control["control_publishes"] = workers
    return [reports[p] for p in range(workers)], control


def _settled_stats(services: Services, function: str, invocations: int) -> Any:
    """Runtime stats once every worker's invocation has been accounted (tree-launched
    ones finish a moment after their report)."""
    deadline = time.monotonic() + 30.0
    while True:
        stats = services.runtime.stats(function)
        if stats.invocations >= invocations or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def _cleanup(services: Services, run: str, workers: int, options: RunOptions) -> None:
    for key in services.blobs.list(f"inf/{run}/"):
        services.blobs.delete(key)
    services.bus.delete_queue(control_queue(run))
    if workers > 1:
        for q in range(workers):
            services.bus.delete_queue(queue_name(run, q))
