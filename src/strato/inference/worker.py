"""The inference worker, a Runtime function: ``strato.inference.worker:handler``.

Event (JSON): ``run``, ``worker``, ``workers``, ``channel`` ("bus" | "blob"),
``group_size``, ``function`` (its own name, to start children), ``branching``
(0 = flat launch; b > 0 = the tree in which worker p starts workers
(p+1)·b … (p+1)·b+b−1), ``timeout_s``. Everything large (its share of the network,
the inputs) is fetched by reference from the blob store: ``inf/<run>/plan/<p>`` and
``inf/<run>/inputs``.

Per layer the worker computes its output rows, sends each other worker exactly the
rows it reads next (an empty block where there are none), receives its own, and
moves on. At the end it stores its share of the categories (``inf/<run>/result/<p>``)
and publishes a JSON "done" report (timings and operation counts) on the run's
control topic; a failure is reported there too, so the coordinator never waits blind.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from strato.codec.rows import load_arrays
from strato.inference._wire import assemble_rows, decode_rows, encode_rows
from strato.inference.channels import BlobChannel, BusChannel
from strato.inference.kernel import apply_layer, release_scratch
from strato.inference.plan import WorkerPlan
from strato.services import Context, Services, worker_services

__all__ = ["children", "control_queue", "control_topic", "handler"]


def control_topic(run: str) -> str:
    return f"inf-{run}-ctl"


def control_queue(run: str) -> str:
    return f"inf-{run}-done"


def children(worker: int, workers: int, branching: int) -> list[int]:
    """Workers that ``worker`` starts in a launch tree of branching ``branching``."""
    if branching <= 0:
        return []
    first = (worker + 1) * branching
    return [c for c in range(first, first + branching) if c < workers]


def handler(event: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    t_start = time.time()
    services = worker_services()  # kept across warm invocations, as in Lambda
    run, p = str(event["run"]), int(event["worker"])
    launched = 0
    for c in children(p, int(event["workers"]), int(event.get("branching", 0))):
        ctx.invoke_async(str(event["function"]), {**event, "worker": c})
        launched += 1
    report: dict[str, Any] = {"worker": p, "t_start": t_start, "launched": launched}
    try:
        report.update(_infer(event, services))
        report["ok"] = True
    except Exception as exc:  # reported to the coordinator, then re-raised for the runtime
        report.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        _report(services, run, report)
        raise
    _report(services, run, report)
    return {"worker": p, "ok": True}


def _report(services: Services, run: str, report: dict[str, Any]) -> None:
    report["t_end"] = time.time()
    services.bus.publish(control_topic(run), json.dumps(report))


def _infer(event: Mapping[str, Any], services: Services) -> dict[str, Any]:
    run, p = str(event["run"]), int(event["worker"])
    timeout_s = float(event.get("timeout_s", 600.0))
    plan = WorkerPlan.from_bytes(services.blobs.get(f"inf/{run}/plan/{p}"))
    inputs = load_arrays(services.blobs.get(f"inf/{run}/inputs"))
    images = int(inputs["shape"][1])
    full = sp.csr_matrix(
        (inputs["data"], inputs["indices"], inputs["indptr"]), shape=(plan.neurons, images)
    )
    a = full[plan.arrays["need0"]]
    del full, inputs
    channel: BusChannel | BlobChannel
    if event["channel"] == "bus":
        channel = BusChannel(services.bus, run, p, plan.workers, int(event["group_size"]))
    else:
        channel = BlobChannel(
            services.blobs, services.bus, run, p, plan.workers, int(event["group_size"])
        )
    t_ready = time.time()
    compute_s = exchange_s = 0.0
    others = [q for q in range(plan.workers) if q != p]
    z = a
    pending = [a]  # the next layer's input; popped so it is freed once the kernel read it
    del a
    for li in range(plan.layers):
        t0 = time.perf_counter()
        z = apply_layer(plan.wt(li), pending.pop(), plan.biases[li])
        t1 = time.perf_counter()
        compute_s += t1 - t0
        if li == plan.layers - 1:
            break
        sends = plan.sends(li)
        twins = plan.arrays[f"twin{li}"]
        channel.send(li, {q: encode_rows(z, rows, twins[rows]) for q, rows in sends.items()})
        blocks = channel.receive(li, others, timeout_s)
        froms = plan.receives(li)
        decoded = [decode_rows(blocks.pop(q), froms[q].size, images) for q in others]
        pending.append(
            assemble_rows(z, plan.arrays[f"keep{li}"], decoded, plan.arrays[f"pick{li}"])
        )
        exchange_s += time.perf_counter() - t1
    alive = np.unique(z.indices).astype(np.int64)
    services.blobs.put(f"inf/{run}/result/{p}", alive.tobytes())
    release_scratch()
    return {
        "t_ready": t_ready,
        "compute_s": compute_s,
        "exchange_s": exchange_s,
        "counts": dict(channel.counts),
    }
