"""Scale-out benchmark: the aggregation engine on a 3-node Ray cluster beside the embedded
backend, on the same updates, in one run.

    python benchmarks/ray_scale.py --quick     # 100 clients × 10M float32, 3 rounds per run
    python benchmarks/ray_scale.py             # 9 rounds per run

Three runs of ``strato run`` (``strato.fl.run.run_job``; the embedded one in a child
process, the two Ray ones in another, on one local cluster) on the app of
``benchmarks/round_path.py`` (``_round_path_app``: every client uploads a pre-generated,
distinct float32 update of P parameters instead of training; all 100 clients in every
round, quorum all, float64 sums):

1. **embedded**: one machine, the default backend;
2. **ray, best fit**: ``--backend ray`` on ``strato.backends.ray.local.LocalCluster``
   (3 nodes × 1 CPU, each with its own raylet and object store). Simulated clients
   spread over the nodes and each update stays on the node its client ran on; the leaf
   there adds it in place and sends one partial to the root on the head;
3. **ray, round robin**: the same, with ``[aggregation] placement = "round-robin"``:
   each node's updates go to a leaf dealt to another node, which reads them across.

Round 1 of each run is a warm-up (cold starts); medians are over the rounds after it
(eight: with four, the overhead ratio of two runs of the same code spread from 1.5 to
2.8, since where each round's last updates land decides much of its time).
``completion_s``: the run's own ``aggregation_latency_s`` per round (last accepted
update's upload → the new model written). Cross-node bytes of the aggregation path
are what the state host counted for the ``aggregate`` and ``leaf`` functions on nodes
other than the head, plus node-local updates they read on another node (models sent
to clients are reported apart). The prediction is the root's own, per round:
``control.placement.leaf_per_node_cross_bytes`` on the round's landing counts and the
leaves' placement. Writes ``benchmarks/results/ray/scale-quick.json`` or
``scale.json`` (``--json PATH`` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _aggregation_common import emit, log, median, run_script_child, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ray"
M = 1_000_000
RUNS = ("embedded", "ray-best-fit", "ray-round-robin")
TARGETS = {  # key: (comparison, bound)
    "ray_overhead_ratio": ("<=", 2.0),
    "cross_node_prediction_error": ("<=", 0.10),
    "best_fit_vs_round_robin_cross_node_ratio": (">=", 2.0),
}
AGGREGATION = ("aggregate", "leaf", "send_up")


# ---- one run, in a child process ----------------------------------------------------------


def child(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """``embedded``: one run; ``ray``: the best-fit run, then the round-robin one, on one
    local cluster (each on fresh services; round 1 of each is the warm-up)."""
    from _round_path_app import write_app
    from strato.fl.config import load_job_config

    root = Path(cfg["dir"])
    app = write_app(root / "app", params=int(cfg["params"]), clients=int(cfg["clients"]),
                    rounds=int(cfg["rounds"]), concurrency=int(cfg["concurrency"]))
    os.environ.pop("STRATO_DATA_DIR", None)  # the digits: the data does not matter here
    config = load_job_config(app / "strato.toml")
    if kind == "embedded":
        return {"embedded": one_run("embedded", app, root / "run", config, None)}
    from strato.backends.ray.local import LocalCluster

    def both(address: str) -> dict[str, Any]:
        services = {"backend": "ray", "address": address}
        return {f"ray-{policy}": one_run(f"ray-{policy}", app, root / policy,
                                         config.override(placement=policy), services)
                for policy in ("best-fit", "round-robin")}

    if cfg.get("address"):  # a cluster that is running already
        return both(str(cfg["address"]))
    with LocalCluster(nodes=int(cfg["nodes"]), cpus=1) as cluster:
        return both(cluster.address)


def one_run(kind: str, app: Path, out: Path, config: Any,
            services: dict[str, Any] | None) -> dict[str, Any]:
    from strato.fl.run import RunOptions, run_job

    started = time.time()
    try:
        summary = run_job(RunOptions(app_dir=app, out=out, config=config, quiet=True,
                                     services=services))
        wall = time.time() - started
    finally:  # 100 × 40 MB a round: the next run needs the disk
        shutil.rmtree(out, ignore_errors=True)
    rows = [{"round": r["round"], "completion_s": r["aggregation_latency_s"],
             "round_s": r["round_s"], "accepted": r["accepted"], "rejected": r["rejected"],
             "nodes": r.get("nodes"), "close_parts_s": r.get("close_parts_s", {})}
            for r in summary["per_round"]]
    return {"kind": kind, "wall_s": wall, "rounds": rows,
            "placement": summary.get("placement"),
            "summary": {k: summary[k] for k in ("rounds", "updates_accepted", "updates_rejected",
                                                "function_seconds", "cold_starts")}}


# ---- the figures --------------------------------------------------------------------------


def parts(rounds: list[dict[str, Any]]) -> dict[str, float | None]:
    """Medians over ``rounds`` of each part of the close (``close_parts_s`` of the
    run's records) and of the rest of the completion."""
    out: dict[str, float | None] = {}
    for key in ("partials_s", "result_s", "model_write_s"):
        values = [float(r["close_parts_s"].get(key, 0.0)) for r in rounds
                  if r.get("close_parts_s")]
        out[key] = median(values) if values else None
    rest = [r["completion_s"] - sum(float(v) for v in r["close_parts_s"].values())
            for r in rounds if r.get("close_parts_s")]
    out["rest_s"] = median(rest) if rest else None
    return out


def aggregation_cross_bytes(run: dict[str, Any]) -> int:
    crossed = (run.get("placement") or {}).get("cross_node_bytes_by_function", {})
    return int(sum(crossed.get(fn, 0) for fn in AGGREGATION))


def predicted_cross_bytes(run: dict[str, Any]) -> int:
    return int(sum((r.get("nodes") or {}).get("predicted_cross_node_bytes", 0)
                   for r in run["rounds"]))


def ten_nodes(params: int, clients: int) -> dict[str, Any]:
    """What the cost model predicts per round on 10 nodes, clients spread evenly: the
    leaves' early partials, and at most one more partial for each of the round's last
    updates (``EARLY_SEND_LEFT``), sent when that lands on a worker node."""
    from strato.control.placement import leaf_per_node_cross_bytes
    from strato.fl.aggregator import EARLY_SEND_LEFT

    nbytes = 4 * params
    nodes = [f"n{i}" for i in range(10)]
    landing = {n: clients // 10 for n in nodes}
    dealt = {n: nodes[(i + 1) % 10] for i, n in enumerate(nodes)}
    best = leaf_per_node_cross_bytes(landing, {}, "n0", nbytes, nbytes)
    robin = leaf_per_node_cross_bytes(landing, dealt, "n0", nbytes, nbytes)
    to_head = leaf_per_node_cross_bytes(landing, dict.fromkeys(nodes, "n0"), "n0", nbytes,
                                        nbytes)
    return {"nodes": 10, "clients": clients, "update_bytes": nbytes,
            "best_fit_bytes_per_round": best, "round_robin_bytes_per_round": robin,
            "every_update_to_the_head_bytes_per_round": to_head,
            "late_partial_bytes_per_round_at_most": EARLY_SEND_LEFT * nbytes,
            "round_robin_vs_best_fit": robin / best if best else None}


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--child"]:
        emit(child(raw[1], json.loads(raw[2])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds per run instead of 9")
    ap.add_argument("--rounds", type=int, help="rounds per run (default: 9, --quick 3)")
    ap.add_argument("--smoke", action="store_true",
                    help="the test suite's: 10k parameters, 3 clients, 2 rounds")
    ap.add_argument("--address", help="run the Ray part on this running cluster (HOST:PORT) "
                    "instead of a local one of 3 nodes × 1 CPU")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(raw)
    if args.smoke:
        cfg: dict[str, Any] = {"params": 10_000, "clients": 3, "rounds": 2}
    else:
        cfg = {"params": 10 * M, "clients": 100, "rounds": 3 if args.quick else 9}
    if args.rounds:
        cfg["rounds"] = args.rounds
    cfg |= {"nodes": 3, "concurrency": 3, "address": args.address}
    path = args.json or RESULTS / ("scale-quick.json" if args.quick or args.smoke
                                   else "scale.json")
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="strato-ray-scale-") as tmp:
        for kind in ("embedded", "ray"):
            log(f"{kind}: {cfg['clients']} clients × {cfg['params']:,} float32, "
                f"{cfg['rounds']} rounds ...")
            try:
                got = run_script_child(str(Path(__file__)), kind,
                                       {**cfg, "dir": str(Path(tmp) / kind)})
            except RuntimeError as exc:
                raise SystemExit(f"the {kind} run failed: {exc}") from None
            runs |= {k: v for k, v in got.items() if k != "child_wall_s"}
        for kind in RUNS:
            done = runs[kind]
            log(f"{kind}: {done['wall_s']:.1f} s, completion per round "
                + ", ".join(f"{r['completion_s']:.3f}" for r in done["rounds"]))

    def completion(kind: str) -> float:
        return median([r["completion_s"] for r in runs[kind]["rounds"][1:]])

    best, robin = runs["ray-best-fit"], runs["ray-round-robin"]
    measured, predicted = aggregation_cross_bytes(best), predicted_cross_bytes(best)
    robin_measured = aggregation_cross_bytes(robin)
    record: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/ray_scale.py", *raw]),
        "config": cfg,
        "completion_s_embedded": completion("embedded"),
        "completion_s_ray": completion("ray-best-fit"),
        "completion_s_ray_round_robin": completion("ray-round-robin"),
        "cross_node_bytes_measured": measured,
        "cross_node_bytes_predicted": predicted,
        "cross_node_bytes_measured_round_robin": robin_measured,
        "cross_node_bytes_predicted_round_robin": predicted_cross_bytes(robin),
        "cross_node_bytes_all_functions": (best.get("placement") or {}).get("cross_node_bytes"),
        "prediction_10_nodes": ten_nodes(int(cfg["params"]), int(cfg["clients"])),
        "runs": runs,
    }
    record["ray_overhead_ratio"] = record["completion_s_ray"] / record["completion_s_embedded"]
    # where each run's completion went (medians of rounds 2+, from the runs' own records):
    # the leaves' partials reaching the root, the root's result, the model's write, and
    # the rest (the trigger, the last update's admission, its trip to its leaf and its
    # add; the close's bookkeeping after the model's write)
    record["completion_parts_s"] = {kind: parts(runs[kind]["rounds"][1:]) for kind in RUNS}
    record["cross_node_prediction_error"] = (abs(measured - predicted) / predicted
                                             if predicted else None)
    record["best_fit_vs_round_robin_cross_node_ratio"] = (robin_measured / measured
                                                          if measured else None)
    record["targets"] = {}
    for key, (op, bound) in TARGETS.items():
        value = record[key]
        met = value is not None and (value <= bound if op == "<=" else value >= bound)
        record["targets"][key] = {"value": value, "target": f"{op} {bound}", "met": met}
    print("| run | completion s (median, rounds 2+) | aggregation bytes across nodes "
          "| predicted |")
    print("|---|---:|---:|---:|")
    for kind in RUNS:
        r = runs[kind]
        cross = aggregation_cross_bytes(r) if kind != "embedded" else 0
        print(f"| {kind} | {completion(kind):.3f} | {cross / 1e6:.1f} MB "
              f"| {predicted_cross_bytes(r) / 1e6:.1f} MB |")
    print("\n| run | partials to the root s | root's result s | model write s | rest s |")
    print("|---|---:|---:|---:|---:|")
    for kind in RUNS:
        p = record["completion_parts_s"][kind]
        print(f"| {kind} | " + " | ".join(
            "—" if p.get(k) is None else f"{p[k]:.3f}"
            for k in ("partials_s", "result_s", "model_write_s", "rest_s")) + " |")
    print("\n| key | value | target | met |\n|---|---:|---|---|")
    for key, t in record["targets"].items():
        value = "—" if t["value"] is None else f"{t['value']:.3f}"
        print(f"| {key} | {value} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
    write_results(path, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
