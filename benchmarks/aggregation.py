"""Aggregation benchmark: strato (LIFL) against Flower, an always-on server, naive
serverless functions, and the memory-bandwidth floor — side by side, one run.

    python benchmarks/aggregation.py --quick --json quick.json   # 100 clients × 10M, ~1 min
    python benchmarks/aggregation.py --json full.json --md table.md   # the whole matrix
    python benchmarks/aggregation.py --tiny --json tiny.json     # seconds; what the test runs

Each system runs in a fresh child process (its own memory, its own peak RSS) on the
same workload: synthetic float32 updates generated once outside the timed regions,
integer weights, arrival times from a log-normal training-time distribution.
Reported per system: completion latency (last update available → global model
ready), total round time, cost, peak RSS; medians of the repetitions (every system,
Flower included, gets the same number). Cost: for strato every CPU-second of every
process it runs (the ingest thread standing in for the gateway, the dispatcher, the
aggregators); billed function-seconds (cold starts' init included) for naive
functions; reserved core-seconds (wall × cores) for the always-on servers. Every
system's model is checked against the float64 weighted mean.

The always-on baselines: ``eager-server`` (the best design: adds each update as it
lands, with our kernel) and ``serverful`` (adds everything after the last update,
one ``w @ S``). Both pay their own ingest (a local TCP socket), as strato pays its own
(a copy into shared memory).

Top-level JSON keys (from the 100 × 10M configuration, or the main one of --tiny):
speedup_vs_eager_server, cost_ratio_vs_eager_server (the eager server's reserved
core-seconds over a round plus ``--idle-s`` of waiting for the clients ÷ all our
CPU-seconds in the round), speedup_vs_flower, flower_repetitions, speedup_vs_serverful,
fraction_of_floor, cost_ratio_vs_serverful, peak_rss_ratio_1000_vs_10, autoscaler_gap
(worst load level; per level under "autoscaler_sweep"), placement_cross_node_ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _aggregation_common import (
    Workload,
    cpu_count,
    log,
    median,
    mem_available,
    provenance,
    run_script_child,
)

HERE = Path(__file__).resolve().parent
M = 1_000_000
SYSTEMS = ["strato", "flower", "eager-server", "serverful", "naive-serverless"]  # + floor
CHILD_PIDS: list[int] = []  # whose shared-memory segments must all be gone at the end


def leftovers() -> list[str]:
    """Shared memory this run's children left behind (others' segments are not ours)."""
    ours = (*(f"strato-{pid}-" for pid in CHILD_PIDS), "strato-bench-")
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(ours))


# ---- children -----------------------------------------------------------------------


def child_main(kind: str, cfg: dict[str, Any]) -> None:
    from _aggregation_common import emit

    if kind == "strato":
        from _aggregation_strato import run
    elif kind == "placement":
        from _aggregation_strato import run_placement as run
    elif kind == "flower":
        from _aggregation_baselines import run_flower as run
    elif kind == "serverful":
        from _aggregation_baselines import run_serverful as run
    elif kind == "naive-serverless":
        from _aggregation_baselines import run_naive as run
    else:
        raise SystemExit(f"unknown child {kind!r}")
    emit(run(cfg))


def run_child(kind: str, cfg: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    env = dict(os.environ)
    if kind in ("strato", "placement", "naive-serverless"):
        # Aggregators get one BLAS thread each (they are the parallelism); the load
        # generator and the dispatcher do not use BLAS.
        env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    return run_script_child(str(Path(__file__)), kind, cfg, timeout, env=env, pids=CHILD_PIDS)


# ---- one configuration --------------------------------------------------------------


def flower_available() -> bool:
    try:
        import flwr  # noqa: F401  # only probing that it is installed
    except ImportError:
        return False
    return True


def resolve_executor(name: str, wl: Workload) -> str:
    """``auto`` as a node would resolve it for this model; ``alt``: the other one."""
    from strato.aggregation.node import THREADS_BELOW_BYTES

    auto = "threads" if wl.params * 4 < THREADS_BELOW_BYTES else "runtime"
    if name == "auto":
        return auto
    if name == "alt":
        return "runtime" if auto == "threads" else "threads"
    return name


def measure(wl: Workload, args: argparse.Namespace, systems: list[str]) -> dict[str, Any]:
    base = {"workload": wl.to_dict(), "cores": args.cores, "reps": args.reps}
    out: dict[str, Any] = {"workload": wl.to_dict()}
    payload = wl.clients * wl.params * 4
    for system in systems:
        log(f"{system} — {wl.clients} clients × {wl.params:,} params")
        # Baselines that hold every update at once: do not push a shared machine into swap.
        need = 0 if system == "strato" else int(1.2 * payload)
        if need > 0.7 * mem_available():
            out[system] = {"unavailable": f"needs ~{need / 2**30:.1f} GiB, "
                                          f"{mem_available() / 2**30:.1f} GiB available"}
            log(f"  skipped: {out[system]['unavailable']}")
            continue
        if system == "strato":
            for variant in args.variants:
                executor, acc = variant.split(":")
                executor = resolve_executor(executor, wl)
                key = "strato" if variant == args.variants[0] else f"strato ({executor}, {acc})"
                cfg = {**base, "executor": executor, "acc_dtype": acc, "batch": args.batch}
                out[key] = run_child("strato", cfg)
                out[key]["variant"] = f"{executor}:{acc}"
        elif system == "flower":
            if not flower_available():
                out["flower"] = {"unavailable": "flwr is not installed"}
                continue
            # as many measured repetitions as every other system
            out["flower"] = run_child("flower", {**base, "legacy": not args.quick})
            out["flower"]["repetitions"] = args.reps
        elif system == "naive-serverless":
            # a fresh process per update: at 1000 clients one repetition is minutes
            reps = 1 if wl.clients >= 1000 else args.naive_reps
            out[system] = run_child(system, {**base, "reps": reps})
        elif system == "eager-server":
            acc = args.variants[0].split(":")[1]  # strato's accumulator precision
            out[system] = run_child("serverful", {**base, "eager": True, "acc_dtype": acc})
        else:
            out[system] = run_child(system, base)
            if system == "serverful":
                out["floor"] = out[system].pop("floor")
    for system in systems:  # a skipped row still shows in the table
        if "unavailable" in out.get(system, {}):
            out.setdefault("skipped", {})[system] = out.pop(system)["unavailable"]
    return out


def summarize(cfg: dict[str, Any]) -> dict[str, Any]:
    """Medians per system, in one comparable shape."""
    rows: dict[str, Any] = {}
    for name, res in cfg.items():
        if name in ("workload", "skipped") or not isinstance(res, dict) or "unavailable" in res:
            continue
        if name.startswith("strato"):
            recs = res["records"]["auto"]
            rows[name] = {
                "completion_s": median([r["completion_s"] for r in recs]),
                "total_s": median([r["total_s"] for r in recs]),
                "cost_s": median([r["cpu_s"] for r in recs]),
                "cost_kind": "CPU-s, every process",
                "billed_s": median([r["billed_s"] for r in recs]),
                "compute_s": median([r["busy_s"] for r in recs]),
                "fraction_of_floor": median([r["floor_s"] / r["busy_s"] for r in recs]),
                "peak_rss_mb": res["peak_rss_kb"]["total_minus_source"] / 1024,
                "max_rel_error": res["max_rel_error"],
                "shapes": sorted({r["shape"]["leaves"] for r in recs}),
            }
        elif name == "flower":
            variant = res["variants"]["inplace"]
            span = Workload(**cfg["workload"]).schedule()[-1]
            lat = median(variant["latency_s"])
            rows[name] = {
                "completion_s": lat,
                "total_s": span + lat,
                "cost_s": (span + lat) * cpu_count(),
                "cost_kind": "reserved core-s",
                "peak_rss_mb": res["peak_rss_kb"] / 1024,
                "max_rel_error": variant["max_rel_error"],
                "repetitions": len(variant["latency_s"]),
            }
            legacy = res["variants"].get("decode_all_then_aggregate")
            if legacy:
                rows[name]["completion_legacy_s"] = median(legacy["latency_s"])
        elif name in ("serverful", "eager-server", "naive-serverless"):
            recs = res["records"]
            # the always-on servers reserve their cores; naive functions are billed
            cost_key, cost_kind = (("billed_s", "billed function-s (init included)")
                                   if name == "naive-serverless"
                                   else ("reserved_core_s", "reserved core-s"))
            rows[name] = {
                "completion_s": median([r["completion_s"] for r in recs]),
                "total_s": median([r["total_s"] for r in recs]),
                "cost_s": median([r[cost_key] for r in recs]),
                "cost_kind": cost_kind,
                "peak_rss_mb": res["peak_rss_kb"] / 1024,
                "max_rel_error": res["max_rel_error"],
            }
        elif name == "floor":
            keys = sorted((k for k in res if k.startswith("threads_")),
                          key=lambda k: int(k.split("_")[1]))
            rows[name] = {
                "completion_s": median(res[keys[-1]]),
                "one_thread_s": median(res["threads_1"]),
                "max_rel_error": res["max_rel_error"],
            }
    return rows


# ---- the extra measurements ---------------------------------------------------------


def sweep(args: argparse.Namespace, wl: Workload, medians: list[float]) -> list[dict[str, Any]]:
    """At each load level: the autoscaler against every fixed flat tree, interleaved
    (the order rotates each repetition). Each configuration's latency is the median of
    its repetitions; the best repetition of each is kept alongside."""
    levels = []
    for m in medians:
        level = Workload(**{**wl.to_dict(), "median_s": m})
        fixed = list(range(1, args.max_fixed_leaves + 1))
        executor, acc = args.variants[0].split(":")
        cfg = {"workload": level.to_dict(), "cores": args.cores, "reps": args.sweep_reps,
               "executor": resolve_executor(executor, level), "acc_dtype": acc,
               "batch": args.batch, "configs": ["auto", *fixed], "floor_rows": 0}
        log(f"sweep — median training time {m}s: autoscaler vs fixed {fixed}")
        res = run_child("strato", cfg)
        reps = {k: [r["completion_s"] for r in v] for k, v in res["records"].items()}
        best = {k: min(v) for k, v in reps.items()}
        mid = {k: median(v) for k, v in reps.items()}
        best_key = min((k for k in best if k != "auto"), key=lambda k: best[k])
        mid_key = min((k for k in mid if k != "auto"), key=lambda k: mid[k])
        levels.append({
            "median_training_s": m,
            "completion_s": reps,
            "autoscaler_leaves": [r["shape"]["leaves"] for r in res["records"]["auto"]],
            "best_fixed_leaves": int(mid_key),
            "gap": mid["auto"] / mid[mid_key] - 1.0,
            "gap_best_of_n": best["auto"] / best[best_key] - 1.0,
            "billed_s": {k: median([r["billed_s"] for r in v])
                         for k, v in res["records"].items()},
        })
        log(f"  gap {levels[-1]['gap']:+.3f} (auto {mid['auto']:.4f}s, best fixed "
            f"{mid_key} leaves {mid[mid_key]:.4f}s; best of n {levels[-1]['gap_best_of_n']:+.3f})")
    return levels


def table(configs: list[dict[str, Any]]) -> str:
    lines = [
        "| clients | params | system | completion (s) | total (s) | cost (s) | cost kind "
        "| peak RSS (MB) | max rel. error |",
        "|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for cfg in configs:
        wl = cfg["workload"]
        for name, why in cfg.get("skipped", {}).items():
            lines.append(f"| {wl['clients']} | {wl['params']:,} | {name} | not run: {why} "
                         "| | | | | |")
        for name, row in cfg["summary"].items():
            if name == "floor":
                lines.append(
                    f"| {wl['clients']} | {wl['params']:,} | floor (w@S, 1 / all threads) "
                    f"| {row['one_thread_s']:.4f} / {row['completion_s']:.4f} | | | | "
                    f"| {row['max_rel_error']:.1e} |"
                )
                continue
            lines.append(
                f"| {wl['clients']} | {wl['params']:,} | {name} | {row['completion_s']:.4f} "
                f"| {row['total_s']:.3f} | {row['cost_s']:.3f} | {row['cost_kind']} "
                f"| {row['peak_rss_mb']:.0f} | {row['max_rel_error']:.1e} |"
            )
    return "\n".join(lines)


def headline(main: dict[str, Any], idle_s: float, cores: int) -> dict[str, float | None]:
    rows = main["summary"]
    strato = rows["strato"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    eager = rows.get("eager-server", {})
    # the eager server's reservation over a round and the idle time around it
    eager_reserved = (None if not eager else
                      (eager["total_s"] + idle_s) * float(eager.get("cores", cores)))
    return {
        "speedup_vs_eager_server": ratio(eager.get("completion_s"), strato["completion_s"]),
        "cost_ratio_vs_eager_server": ratio(eager_reserved, strato["cost_s"]),
        "idle_s": idle_s,
        "speedup_vs_flower": ratio(rows.get("flower", {}).get("completion_s"),
                                   strato["completion_s"]),
        "flower_repetitions": rows.get("flower", {}).get("repetitions"),
        "speedup_vs_serverful": ratio(rows["serverful"]["completion_s"], strato["completion_s"]),
        # floor (w @ S, 1 thread) timed in strato's process right after each round,
        # over strato's kernel time that round (both core-seconds); median per round
        "fraction_of_floor": strato["fraction_of_floor"],
        # the same against the full-size floor measured in its own process
        "fraction_of_floor_separate": ratio(rows["floor"]["one_thread_s"], strato["compute_s"]),
        "cost_ratio_vs_serverful": ratio(rows["serverful"]["cost_s"], strato["cost_s"]),
    }


def plan_runs(args: argparse.Namespace) -> dict[str, Any]:
    spread = {"median_s": args.median_s, "sigma": args.sigma}
    if args.tiny:
        main = Workload(100_000, 12, **spread)
        return {"matrix": [main], "main": main, "rss": (Workload(50_000, 4, **spread),
                Workload(50_000, 40, **spread)), "sweep": Workload(100_000, 12, **spread),
                "placement": Workload(50_000, 24)}
    main = Workload(10 * M, 100, **spread)
    rss = (Workload(M, 10, **spread), Workload(M, 1000, **spread))
    if args.quick:
        matrix = [main]
    else:
        matrix = [Workload(p, n, **spread) for p in (M, 10 * M, 25 * M) for n in (10, 100)]
        matrix.insert(2, Workload(M, 1000, **spread))
    return {"matrix": matrix, "main": main, "rss": rss,
            "sweep": Workload(10 * M, args.sweep_clients, **spread),
            "placement": Workload(M, 100)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only 100 clients × 10M (and extras)")
    ap.add_argument("--tiny", action="store_true", help="a few seconds: for the test suite")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    ap.add_argument("--reps", type=int, default=None, help="default 3 (2 with --quick)")
    ap.add_argument("--naive-reps", type=int, default=None)
    ap.add_argument("--variants", default=None,
                    help="strato EXECUTOR:ACCUMULATOR list (executor: auto, alt = the one "
                         "auto does not pick, threads, runtime); the first is 'strato'")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cores", type=int, default=cpu_count(),
                    help="cores of the machine: the autoscaler's, and the server's reservation")
    ap.add_argument("--median-s", type=float, default=None, help="median training time")
    ap.add_argument("--sigma", type=float, default=0.35)
    ap.add_argument("--idle-s", type=float, default=60.0,
                    help="time between rounds an always-on server waits for its clients "
                         "(their local training): part of its cost per round")
    ap.add_argument("--sweep-medians", default=None, help="comma list of median training times")
    ap.add_argument("--sweep-clients", type=int, default=None, help="default 100 (40 --quick)")
    ap.add_argument("--sweep-reps", type=int, default=None)
    ap.add_argument("--max-fixed-leaves", type=int, default=None)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variants is None:  # --tiny: one process per child, the quickest to start
        args.variants = "auto:F32" if args.tiny else "auto:F32,alt:F32,auto:F64"
    args.variants = [v for v in args.variants.split(",") if v]
    if args.median_s is None:  # --quick: a short round (its cost ratio is the smaller)
        args.median_s = 0.3 if args.tiny else (0.5 if args.quick else 2.0)
    if args.reps is None:
        args.reps = 2 if (args.quick or args.tiny) else 3
    if args.sweep_clients is None:
        args.sweep_clients = 40 if args.quick else 100
    if args.naive_reps is None:
        args.naive_reps = 1 if (args.quick or args.tiny) else 2
    if args.sweep_reps is None:
        args.sweep_reps = 2 if args.tiny else (5 if args.quick else 7)
    if args.max_fixed_leaves is None:
        args.max_fixed_leaves = args.cores if (args.tiny or args.quick) else args.cores + 1
    if args.sweep_medians is None:
        # from a trickle of arrivals to a burst that one leaf cannot keep up with
        args.sweep_medians = "0.3" if args.tiny else (
            "0.25,0.05" if args.quick else "2.0,1.0,0.5,0.25,0.1,0.05")
    if args.quick or args.tiny:
        args.variants = args.variants[:1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return 0
    started = time.monotonic()
    runs = plan_runs(args)
    configs = []
    # --quick leaves out naive-serverless: no headline key needs it, and its 100 fresh
    # processes per round take longer than the rest of the quick run together.
    systems = [s for s in SYSTEMS if not (args.quick and s == "naive-serverless")]
    for wl in runs["matrix"]:
        res = measure(wl, args, systems)
        if args.quick:
            res.setdefault("skipped", {})["naive-serverless"] = "left out of --quick"
        res["summary"] = summarize(res)
        configs.append(res)
    main_cfg = next(c for c in configs if Workload(**c["workload"]) == runs["main"])
    out: dict[str, Any] = headline(main_cfg, args.idle_s, args.cores)

    small, large = runs["rss"]
    rss: dict[int, Any] = {}
    for wl in (small, large):
        found = next((c for c in configs if Workload(**c["workload"]) == wl), None)
        if found is None:
            log(f"strato peak RSS — {wl.clients} clients × {wl.params:,} params")
            executor, acc = args.variants[0].split(":")
            cfg = {"workload": wl.to_dict(), "cores": args.cores, "reps": args.reps,
                   "executor": resolve_executor(executor, wl), "acc_dtype": acc,
                   "batch": args.batch,
                   "floor_rows": 0}
            found = {"strato": run_child("strato", cfg)}
        rss[wl.clients] = found["strato"]["peak_rss_kb"]
    out["peak_rss_ratio_1000_vs_10"] = (
        rss[large.clients]["total_minus_source"] / rss[small.clients]["total_minus_source"]
    )
    medians = [float(x) for x in args.sweep_medians.split(",")]
    levels = sweep(args, runs["sweep"], medians)
    out["autoscaler_gap"] = max(level["gap"] for level in levels)
    log("placement — 4 nodes, best fit vs round robin")
    placement = run_child("placement", {"workload": runs["placement"].to_dict(), "nodes": 4})
    out["placement_cross_node_ratio"] = placement["ratio"]

    left = leftovers()
    out.update({
        "configurations": configs,
        "peak_rss_kb": {str(k): v for k, v in rss.items()},
        "autoscaler_sweep": levels,
        "placement": placement,
        "dev_shm_leftovers": left,
        "cores": args.cores,
        "variants": args.variants,
        "command": " ".join(["python", "benchmarks/aggregation.py", *(argv or sys.argv[1:])]),
        "wall_s": time.monotonic() - started,
        **provenance(),
    })
    text = table(configs)
    print(text)
    for key in ("speedup_vs_eager_server", "cost_ratio_vs_eager_server", "speedup_vs_flower",
                "flower_repetitions", "speedup_vs_serverful", "fraction_of_floor",
                "fraction_of_floor_separate", "cost_ratio_vs_serverful",
                "peak_rss_ratio_1000_vs_10", "autoscaler_gap", "placement_cross_node_ratio"):
        value = out[key]
        print(f"{key}: {'n/a' if value is None else f'{value:.3f}'}")
    print(f"/dev/shm leftovers: {left or 'none'}; wall {out['wall_s']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    if args.md:
        args.md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
