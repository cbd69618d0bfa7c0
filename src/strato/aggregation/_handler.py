"""The aggregator function: one handler for leaves, middles and the root.

Runs as a Runtime function (``strato.aggregation._handler:aggregate``) in a warm worker
process, or called directly on a warm thread of the node (``ThreadExecutor``).
Everything it works on lives in the node's shared memory and is named in the event;
the function keeps no state of its own, so any warm worker can serve any
aggregator and a retried invocation needs nothing restored:

    {"acc": ShmRef, "acc_dtype": "F64", "dtype": "F32", "fresh": true,
     "inputs": [{"shm", "offset", "nbytes", "dtype", "coef"}, ...],  # updates, partials
     "scale": null | 1/W,          # the root's last call...
     "out": null | ShmRef,         # ...writes the model here (else scales acc in place)
     "report": false,              # add peak RSS to the reply
     "check": false,               # leaves: leave out inputs with NaN/Inf, name them
     "dist_ref": null | ref}       # leaves: each input's squared distance to this F32
                                   # vector (the round's model), in the reply's "dist"

Each input is mapped where it lies and read in place by the kernel: a shared-memory
segment (``ctx.attach``: the worker keeps one mapping per segment, so a warm worker
maps nothing new) or a file, such as a blob the update was written to
(``{"path", "offset", "nbytes"}``, mapped read-only by ``_inputs.attach_input``), or,
for an aggregator on a thread, a buffer of its own process (``{"local", "nbytes"}``).

A leaf validates its updates in the pass that adds them (``check``): an update holding
NaN or ±Inf is left out, the reply names it (``"bad": [input indices]``), and when the
call also applies the root's final scale (1 / total weight, counted with the bad
updates by the dispatcher) the scale is corrected to the clean updates' total.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from strato.aggregation._kernels import DTYPES, accumulate, warm_up
from strato.errors import LayoutError

__all__ = ["WARM_UP_ENV", "aggregate", "peak_rss_kb"]

WARM_UP_ENV = "STRATO_LIFL_WARM_UP"
if os.environ.get(WARM_UP_ENV) == "1":  # a Runtime worker: load the kernels during init
    warm_up()


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM), in KiB."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _vector(ctx: Any, ref: Mapping[str, Any], dtype: str) -> Any:
    kind = DTYPES.get(dtype)
    if kind is None:
        raise LayoutError(f"LIFL aggregates F32 or F64 buffers, not {dtype!r}")
    if "path" in ref or "local" in ref:
        from strato.aggregation._inputs import attach_input

        return np.frombuffer(attach_input(ref), dtype=kind)
    return np.frombuffer(ctx.attach(ref), dtype=kind)


def aggregate(event: Mapping[str, Any], ctx: Any) -> dict[str, Any]:
    acc_dtype = str(event.get("acc_dtype", "F32"))
    acc = _vector(ctx, event["acc"], acc_dtype)
    inputs = []
    for ref in event.get("inputs", ()):
        x = _vector(ctx, ref, str(ref.get("dtype", acc_dtype)))
        if x.shape != acc.shape:
            raise LayoutError(f"an input of {x.size} values cannot add into {acc.size}")
        inputs.append((x, float(ref["coef"])))
    out = event.get("out")
    scale = event.get("scale")
    started = time.perf_counter()
    out_vector = None if out is None else _vector(ctx, out, str(event.get("dtype", "F32")))
    dist_ref = event.get("dist_ref")
    ref = None if dist_ref is None else _vector(ctx, dist_ref, "F32")
    dist = None if ref is None else np.zeros(len(inputs), dtype=np.float64)
    bad = accumulate(
        acc,
        inputs,
        fresh=bool(event.get("fresh")),
        scale=None if scale is None else float(scale),
        out=out_vector,
        check=bool(event.get("check")),
        ref=ref,
        dist=dist,
    )
    if bad and scale is not None:
        # The scale was 1 / the batch's total weight with the bad updates (coef = weight).
        total = 1.0 / float(scale)
        clean = total - sum(inputs[i][1] for i in bad)
        target = out_vector if out_vector is not None else acc
        target *= target.dtype.type(total / clean if clean > 0 else 0.0)
    busy = time.perf_counter() - started
    reply: dict[str, Any] = {"n": len(inputs), "busy_s": busy, "pid": os.getpid()}
    if bad:
        reply["bad"] = bad
    if dist is not None:
        reply["dist"] = [None if i in bad else float(d) for i, d in enumerate(dist)]
    if event.get("report"):
        reply["hwm_kb"] = peak_rss_kb()
    return reply
