"""One real ``strato run`` of the round_path benchmark, in its own child process.

This process is the run process: it writes the app, calls
``strato.fl.run.run_job(RunOptions(..., quiet=True))`` (coordinator workflow, bus,
table, runtime workers, stream trigger, aggregator: the whole embedded pipeline),
samples the aggregation path's CPU and peak RSS from /proc meanwhile
(``_round_path_proc``), then reads what the run recorded: per round its metrics
(``aggregation_latency_s``: last accepted update's ``uploaded_at`` → the round
record's ``model_ready_at``, set right after the new model's blob was written) and
every accepted update (blob file, weight, ``uploaded_at``) for the eager server's
replay. Last, it times one single-threaded BLAS ``saxpy`` over one update here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from _aggregation_common import l3_cache_kib, log, median
from _round_path_app import write_app
from _round_path_proc import AGG_FUNCTIONS, AGG_PREFIXES, THREAD_PREFIXES, PathMonitor


def evict_bytes() -> int:
    """Memory written between cold saxpys: 8 × the last-level cache, from 256 MiB to
    2 GiB (2 GiB where the cache's size is unknown; these VMs have reported 16 MiB
    and 480 MiB)."""
    l3 = l3_cache_kib()
    if l3 is None:
        return 2 << 30
    return min(2 << 30, max(256 << 20, 8 * l3 * 1024))


def time_saxpy(params: int, reps: int = 9, *, cold: bool = False) -> dict[str, Any]:
    """One BLAS ``saxpy`` (``acc += a·x``) over one update of ``params`` float32 values,
    1 BLAS thread, warm buffers: median wall and CPU seconds over ``reps`` calls.

    With ``cold``, ``evict_bytes()`` of other memory are written before each call, so
    ``x`` and ``acc`` come from DRAM, as an update written by another process a while
    ago does (context: some of these VMs report a 480 MiB L3, which holds a warm 10M
    update and its accumulator, others 16 MiB, where the warm call reads DRAM too)."""
    from scipy.linalg import blas
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(1)
    x = rng.standard_normal(params, dtype=np.float32)
    acc = np.zeros(params, dtype=np.float32)
    evict = np.ones(evict_bytes() // 8, dtype=np.float64) if cold else None
    walls, cpus = [], []
    with threadpool_limits(limits=1, user_api="blas"):
        for rep in range(-2, reps):  # two warm-up calls
            if evict is not None:
                evict *= 1.0
            c0, w0 = time.thread_time(), time.perf_counter()
            out = blas.saxpy(x, acc, a=0.5)
            w1, c1 = time.perf_counter(), time.thread_time()
            assert out is acc or np.shares_memory(out, acc)  # in place, no copy
            if rep >= 0:
                walls.append(w1 - w0)
                cpus.append(c1 - c0)
    return {"wall_s": median(walls), "cpu_s": median(cpus), "reps": reps,
            "wall_s_all": walls, "cpu_s_all": cpus}


def time_float64_add(params: int, reps: int = 9) -> dict[str, Any]:
    """The floor of adding one float32 update into a float64 accumulator: numba's plain
    ``acc += w·x`` (``strategy._numba_kernels.axpy_one``: no NaN/Inf check, no scratch),
    one thread, warm buffers; median CPU seconds over ``reps`` calls. It moves 200 MB per
    10M update against the ``saxpy``'s 120 MB."""
    from strato.strategy._numba_kernels import axpy_one

    rng = np.random.default_rng(2)
    x = rng.standard_normal(params, dtype=np.float32)
    acc = np.zeros(params, dtype=np.float64)
    cpus = []
    for rep in range(-2, reps):  # two warm-up calls (the first may compile)
        c0 = time.thread_time()
        axpy_one(acc, x, 0.5, 0, params)
        c1 = time.thread_time()
        if rep >= 0:
            cpus.append(c1 - c0)
    return {"cpu_s": median(cpus), "reps": reps, "cpu_s_all": cpus}


def _rounds(out: Path) -> list[dict[str, Any]]:
    """Each round's record, with ``accepted``: its admitted updates (blob, weight,
    uploaded_at) — from the round record's map (the pipeline before the aggregation
    engine), else from the ``accepted`` table (one item per admitted update)."""
    from strato.fl import state
    from strato.services import embedded

    rounds = []
    with embedded(out / "services") as svc:
        for item in svc.table.query(state.ROUNDS):
            rec = dict(item.value)
            if isinstance(rec.get("accepted"), dict):
                accepted = list(rec["accepted"].values())
                rec["accepted_source"] = "the round record's accepted map"
            else:
                rec["accepted_source"] = "the accepted table"
                prefix = state.round_key(int(rec["round"])) + "/"
                accepted = [a.value for a in svc.table.query(state.ACCEPTED, prefix)]
            rec["accepted"] = [{"blob": a["blob"], "weight": float(a["weight"]),
                                "uploaded_at": float(a["uploaded_at"])} for a in accepted]
            rounds.append(rec)
    return rounds


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    from strato.fl.config import load_job_config
    from strato.fl.run import RunOptions, run_job

    root = Path(cfg["dir"])
    params, clients, rounds = int(cfg["params"]), int(cfg["clients"]), int(cfg["rounds"])
    app = write_app(root / "app", params=params, clients=clients, rounds=rounds,
                    concurrency=int(cfg.get("concurrency", 2)),
                    accumulator=str(cfg.get("accumulator", "float64")))
    out = root / "run"
    os.environ.pop("STRATO_DATA_DIR", None)  # scikit-learn's digits: data does not matter here
    opts = RunOptions(app_dir=app, out=out, config=load_job_config(app / "strato.toml"),
                      quiet=True)
    monitor = PathMonitor(float(cfg.get("interval_s", 0.1))).start()
    started = time.time()
    try:
        summary = run_job(opts)
    finally:
        monitor.stop()
    ended = time.time()
    log(f"  run done: {rounds} rounds × {clients} clients × {params:,} in {ended - started:.1f}s")

    blobs = out / "services" / "blobs"
    records = _rounds(out)
    per_round = {int(r["round"]): r for r in summary["per_round"]}
    # Round i's window: its opened_at to the next round's. The last round's ends one
    # second after its model was written: what follows is the run's teardown (workers
    # exit, node memory is freed), once per run, reported apart (``after_last_round``).
    last_ready = float(records[-1].get("model_ready_at") or ended) if records else ended
    last_end = min(ended, last_ready + 1.0)
    opened = [float(r["opened_at"]) for r in records] + [last_end]
    rows = []
    for i, rec in enumerate(records):
        r = int(rec["round"])
        accepted = sorted(rec["accepted"], key=lambda a: a["uploaded_at"])
        (p1, t1), (p0, t0) = monitor.path_cpu_at(opened[i + 1]), monitor.path_cpu_at(opened[i])
        cpu = (p1 - p0) + (t1 - t0)
        metrics = per_round[r]
        rows.append({
            "round": r,
            "completion_s": metrics["aggregation_latency_s"],
            "round_s": metrics["round_s"],
            "accepted": len(accepted),
            "closed_by": metrics["closed_by"],
            "opened_at": rec["opened_at"],
            "closed_at": rec.get("closed_at"),
            "model_ready_at": rec.get("model_ready_at"),
            "first_upload_at": accepted[0]["uploaded_at"] if accepted else None,
            "last_upload_at": accepted[-1]["uploaded_at"] if accepted else None,
            "model_path": str(blobs / rec["model"]) if "model" in rec else None,
            "accepted_from": rec["accepted_source"],
            "tree": metrics.get("tree"),
            # where the close's time went (result, model write), as the round recorded it
            "close_parts_s": rec.get("close_parts_s"),
            "path_cpu_s": cpu,
            "path_cpu_s_processes": p1 - p0,
            "path_cpu_s_threads": t1 - t0,
            "path_cpu_s_per_update": cpu / max(1, len(accepted)),
            # for the eager server's replay: the very files, weights and arrival times
            "updates": [{"path": str(blobs / a["blob"]), "weight": a["weight"],
                         "uploaded_at": a["uploaded_at"]} for a in accepted],
        })
    (p_end, t_end), (p_last, t_last) = monitor.path_cpu_at(ended), monitor.path_cpu_at(last_end)
    after_last = {"processes_s": p_end - p_last, "threads_s": t_end - t_last,
                  "window_s": ended - last_end}
    # the references the timed run is divided by (the peak-RSS runs use none of them)
    timed = bool(cfg.get("references", True))
    saxpy = time_saxpy(params) if timed else None
    saxpy_cold = time_saxpy(params, cold=True) if timed else None
    float64_add = time_float64_add(params) if timed else None
    procs, threads = monitor.path_processes(), monitor.path_threads()
    return {
        "config": {k: v for k, v in cfg.items() if k != "dir"},
        "wall_s": ended - started,
        "rounds": rows,
        "after_last_round": after_last,
        "saxpy": saxpy,
        "saxpy_cold": saxpy_cold,
        "float64_add": float64_add,
        "summary": {k: summary[k] for k in ("rounds", "wall_s", "bytes_up", "bytes_down",
                                            "function_seconds", "invocations", "cold_starts",
                                            "updates_accepted", "updates_rejected")},
        "path": {
            "processes": [e.to_dict() for e in procs],
            "threads": [e.to_dict() for e in threads],
            # VmHWM of each aggregation-path process, summed (one process: its peak)
            "peak_rss_kb": sum(e.hwm_kb for e in procs),
            "peak_rss_kb_max_one": max((e.hwm_kb for e in procs), default=0),
            "functions_counted": list(AGG_FUNCTIONS) + [p + "*" for p in AGG_PREFIXES],
            "thread_prefixes_counted": list(THREAD_PREFIXES),
            "samples": len(monitor.samples),
            "interval_s": monitor.interval_s,
        },
        "cpu_s_by_label": monitor.cpu_by_label(),
    }
