"""The docs' benchmark tables, rendered from the results committed under benchmarks/results/.

    python benchmarks/report.py           # rewrite every marked table in docs/
    python benchmarks/report.py --check   # exit 1 (and say where) if a table differs

A table in ``docs/*.md`` that comes from results sits between two markers:

    <!-- report: NAME -->
    ...the table, as this script renders it...
    <!-- /report -->

NAME is one of ``RENDERERS``; each reads its JSON files (each must record its
``command``, ``date`` and ``machine``) and returns markdown. Nothing
between the markers is written by hand: change the results (rerun the benchmark,
commit its JSON), then run this script. The test suite runs ``--check``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"
BLOCK = re.compile(r"(<!-- report: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /report -->)",
                   re.DOTALL)


PROVENANCE = ("command", "date", "machine")


def _load(*parts: str) -> dict[str, Any]:
    """A committed results file; one without its command, date or machine cannot be
    traced or rerun, so no table is rendered from it."""
    path = RESULTS.joinpath(*parts)
    data: dict[str, Any] = json.loads(path.read_text())
    missing = [key for key in PROVENANCE if key not in data]
    if missing:
        raise SystemExit(f"{path}: no {', '.join(missing)} "
                         "(every results file records its command, date and machine)")
    return data


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def primitives() -> str:
    d = _load("primitives", "quick.json")
    inv, bus, blobs, h = d["invoke"], d["bus"], d["blobs"], d["shm_handoff"]
    mb = h["size_mb"]
    rows = [
        ["invoke, warm (median µs)", f"{inv['warm_us']:,.0f}",
         f"{inv['baseline_pool_apply_warm_us']:,.0f}", "`multiprocessing.Pool.apply`"],
        ["invoke, cold (median µs)", f"{inv['cold_us']:,.0f}",
         f"{inv['baseline_spawn_process_cold_us']:,.0f}", "spawning a `Process`"],
        ["bus publish → receive (median µs)", f"{bus['publish_to_receive_us']:,.0f}",
         f"{bus['baseline_mp_queue_us']:,.0f}", "`multiprocessing.Queue` round trip"],
        ["blob put (GB/s, checksum + fsync)", f"{blobs['put_gbps']:.2f}",
         f"{blobs['baseline_file_write_fsync_gbps']:.2f}", "file write + fsync"],
        ["blob get, checksum checked (GB/s)", f"{blobs['get_verified_gbps']:.2f}",
         f"{blobs['baseline_file_read_gbps']:.2f}", "file read"],
        [f"{mb} MB hand-off to a function (ms)", f"{h['shm_handoff_ms']:,.0f}",
         f"{h['baseline_pickle_pipe_ms']:,.0f}",
         "pickle over `multiprocessing.Pipe` to a warm receiver"],
        [f"{mb} MB hand-off: bytes the receiver copied", f"{h['shm_bytes_copied']:,}",
         f"{h['baseline_bytes_copied']:,}", "the same"],
        ["control: our handler copying the mapped buffer on purpose",
         f"{h['control_copying_handler_bytes_copied']:,}", "", ""],
    ]
    lines = ["| measure | strato (embedded) | baseline | baseline is |",
             "|---|---:|---:|---|", *(_row(r) for r in rows)]
    return "\n".join(lines)


def _aggregation(name: str) -> str:
    sys.path.insert(0, str(HERE))
    from aggregation import table

    return table(_load("aggregation", name)["configurations"])


def aggregation_quick() -> str:
    return _aggregation("quick.json")


def aggregation_full() -> str:
    return _aggregation("full.json")


# the targets for the aggregation benchmark's keys: (key, label, bound, higher
# is better)
AGGREGATION_TARGETS = [
    ("speedup_vs_eager_server", "`speedup_vs_eager_server` (completion)", 0.8, True),
    ("cost_ratio_vs_eager_server", "`cost_ratio_vs_eager_server` (60 s idle per round)", 5.0,
     True),
    ("speedup_vs_flower", "`speedup_vs_flower` (completion)", 5.0, True),
    ("speedup_vs_serverful", "`speedup_vs_serverful` (the lazy server)", 5.0, True),
    ("fraction_of_floor", "`fraction_of_floor`", 0.5, True),
    ("cost_ratio_vs_serverful", "`cost_ratio_vs_serverful` (no idle time)", 3.0, True),
    ("peak_rss_ratio_1000_vs_10", "`peak_rss_ratio_1000_vs_10` (1M params)", 1.5, False),
    ("autoscaler_gap", "`autoscaler_gap` (worst level)", 0.15, False),
    ("placement_cross_node_ratio", "`placement_cross_node_ratio` (4 nodes)", 2.0, True),
]


def aggregation_quick_runs() -> str:
    runs = [_load("aggregation", "quick.json"), _load("aggregation", "quick-run2.json")]
    lines = ["| key | " + " | ".join(f"run {i + 1} ({r['wall_s']:.0f} s)"
                                   for i, r in enumerate(runs)) + " | target | met |",
             "|---|" + "---:|" * len(runs) + "---|---|"]
    for key, label, bound, higher in AGGREGATION_TARGETS:
        values = [r.get(key) for r in runs]
        met = [v is not None and (v >= bound if higher else v <= bound) for v in values]
        verdict = ("in every run" if all(met) else "**missed** in every run" if not any(met)
                   else f"in {sum(met)} run(s) of {len(runs)}")
        lines.append(_row([label, *("—" if v is None else f"{v:.2f}" for v in values),
                           f"{'≥' if higher else '≤'} {bound:g}", verdict]))
    return "\n".join(lines)

def aggregation_executors() -> str:
    """The full run's strato variants side by side: node threads or Runtime functions,
    float32 or float64 sums, per model size and client count."""
    d = _load("aggregation", "full.json")
    lines = ["| clients | params | variant (executor, sums) | completion (ms) | CPU-s, every "
             "process | billed function-s |", "|---:|---:|---|---:|---:|---:|"]
    for cfg in d["configurations"]:
        wl = cfg["workload"]
        for name, row in cfg["summary"].items():
            if not name.startswith("strato"):
                continue
            variant = cfg[name]["variant"].replace(":", ", ")
            lines.append(_row([str(wl["clients"]), f"{wl['params']:,}", variant,
                               f"{row['completion_s'] * 1e3:.1f}", f"{row['cost_s']:.3f}",
                               f"{row['billed_s']:.3f}"]))
    return "\n".join(lines)

def round_path() -> str:
    before = _load("round_path", "before.json")
    full = _load("round_path", "full.json")
    quick = _load("round_path", "quick.json")
    quick32 = _load("round_path", "quick-float32.json")

    def seconds(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f} s"

    def ratio(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"

    def target(key: str) -> str:
        t = full["targets"].get(key)
        if t is None:
            return ""
        met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        return f"{t['target'].split(' and ')[0].replace('>=', '≥').replace('<=', '≤')}: {met}"

    def sharded(d: dict[str, Any]) -> str:
        v = d.get("sharded_median_peak_mb")
        if v is None:
            return "—"
        s = d.get("sharded_median", {})
        shards = s.get("shards")
        equal = s.get("equals_np_median_on_samples")
        extra = ", ".join(x for x in (f"{shards} shards" if shards else "",
                                      "equal to `np.median`" if equal else "") if x)
        return f"{v:.0f} MiB" + (f", {extra}" if extra else "")

    keys = [
        ("`completion_s` (last accepted update in → model written, median)",
         "completion_s", seconds),
        ("`completion_s_eager_server`", "completion_s_eager_server", seconds),
        ("`completion_ratio_vs_eager_server`", "completion_ratio_vs_eager_server", ratio),
        ("`cpu_per_update_ratio`", "cpu_per_update_ratio", ratio),
        ("`cpu_per_update_ratio_eager_server` (context)", "cpu_per_update_ratio_eager_server",
         ratio),
        ("`float64_add_ratio` (context: an unchecked float64 add of one update alone)",
         "float64_add_ratio", ratio),
        ("`cpu_per_update_ratio_vs_cold_saxpy` (context: the `saxpy` with caches flushed)",
         "cpu_per_update_ratio_vs_cold_saxpy", ratio),
        ("`peak_rss_ratio_1000_vs_100`", "peak_rss_ratio_1000_vs_100", ratio),
    ]
    lines = [
        f"| key | before | full ({len(full['ran']['measured_rounds'])} measured rounds) "
        f"| quick ({len(quick['ran']['measured_rounds'])} measured round"
        f"{'s' if len(quick['ran']['measured_rounds']) > 1 else ''}) "
        "| quick, float32 accumulator | target (full run) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, key, fmt in keys:
        lines.append(_row([label, fmt(before.get(key)), fmt(full.get(key)), fmt(quick.get(key)),
                           fmt(quick32.get(key)), target(key)]))
    lines.append(_row(["`sharded_median_peak_mb` (64 × 25M, `function_memory_mb` 1024)",
                       sharded(before), sharded(full), sharded(quick), "not run",
                       target("sharded_median_peak_mb")]))
    return "\n".join(lines)


def inference_compare() -> str:
    lines = [
        "| network | scipy oracle s | worker kernel, all rows s | GraphBLAS, 1 thread, loop s "
        "| kernel ÷ GraphBLAS | one worker (W = 1, bus) s | W = 2 hypergraph s (MB exchanged) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("generated", "generated (twin rows)"), ("random", "random, no twins")):
        d = _load("inference", f"compare-{name}.json")
        runs = {(r["partition"], r["workers"]): r for r in d["runs"]}
        one, two = runs[("random", 1)], runs[("hypergraph", 2)]
        gb = d["graphblas_s"]
        lines.append(_row([
            label, f"{d['scipy_s']:.1f}", f"{d['kernel_s']:.1f}", f"{gb:.1f}",
            f"{gb / d['kernel_s']:.1f}× faster",
            f"{one['inference_s']:.1f} ({gb / one['inference_s']:.1f}× GraphBLAS)",
            f"{two['inference_s']:.1f} ({two['bytes'] / 1e6:.1f})",
        ]))
    return "\n".join(lines)



def inference_runs_table(doc: dict[str, Any]) -> str:
    """One row per distributed run of ``benchmarks/inference.py``: correctness, rate,
    volume, bytes, messages, measured and predicted cost, peak memory."""
    lines = [
        "| partition | W | channel | = oracle | inference s | edges/s | volume rows "
        "| MB exchanged | messages | cost $ | predicted $ | worst pred. error | peak RSS MB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["runs"]:
        lines.append(_row([
            r["partition"] if r["workers"] > 1 else "—", str(r["workers"]), r["channel"],
            "yes" if r["equal"] else "**NO**", f"{r['inference_s']:.1f}", f"{r['rate']:.3g}",
            f"{r['volume_rows']:,}", f"{r['bytes'] / 1e6:.1f}", f"{r['messages']:,}",
            f"{r['cost_usd']:.5f}", f"{r['predicted_cost_usd']:.5f}",
            f"{100 * r['worst_ratio']:.1f}%", f"{r['peak_rss_total_mb']:,.0f}",
        ]))
    return "\n".join(lines)


def _inference_matrix(neurons: int) -> str:
    d = _load("inference", f"matrix-{neurons}.json")
    head = (f"{d['neurons']}×{d['layers']}, {d['inputs']:,} inputs ({d['categories']:,} "
            f"categories), {d['date'][:10]}: scipy oracle {d['scipy_s']:.1f} s "
            f"({d['scipy_rate']:.3g} edges/s). `{d['command']}`")
    worst = max(d["runs"], key=lambda r: r["worst_ratio"])
    op = max(worst["measured_over_predicted"].items(), key=lambda kv: abs(kv[1] - 1))[0]
    tail = (f"Prediction error over these {len(d['runs'])} runs: at most "
            f"{100 * worst['worst_ratio']:.1f}% for any counted operation ({op}, "
            f"{worst['partition']} W = {worst['workers']} {worst['channel']}); "
            f"{sum(r['equal'] for r in d['runs'])} of {len(d['runs'])} runs equal the oracle.")
    return head + "\n\n" + inference_runs_table(d) + "\n\n" + tail


def inference_matrix_1024() -> str:
    return _inference_matrix(1024)


def inference_matrix_4096() -> str:
    return _inference_matrix(4096)


def inference_launch() -> str:
    d = _load("inference", "matrix-1024.json")
    launch = d["launch"]
    lines = ["| launch of W = 8 | cold (s) | warm (s) |", "|---|---:|---:|"]
    for key, label in (("flat", "flat"), ("tree-b2", "tree, b = 2"), ("tree-b4", "tree, b = 4")):
        lines.append(_row([label, f"{launch[key]['cold_launch_s']:.2f}",
                           f"{launch[key]['warm_launch_s']:.3f}"]))
    return "\n".join(lines)


def inference_volumes() -> str:
    d = _load("inference", "volumes-4096.json")
    vols = d["volumes"]
    (w,) = {int(k.split("/")[1]) for k in vols}
    base = vols[f"random/{w}"]
    lines = [f"N = {d['neurons']}, L = {d['layers']}, W = {w}: `{d['command']}`", "",
             "| partitioner | volume (rows) | ÷ random | partitioning s |", "|---|---:|---:|---:|"]
    for key, v in vols.items():
        method = key.split("/")[0]
        secs = d.get("partition_s", {}).get(key)
        lines.append(_row([method, f"{v:,}", f"{v / base:.3f}",
                           "—" if secs is None else f"{secs:.1f}"]))
    return "\n".join(lines)


AWS_LABELS = {
    "lambda_gb_s": "Lambda compute",
    "lambda_requests": "Lambda requests",
    "s3_put_requests": "S3 PUT/LIST",
    "s3_get_requests": "S3 GET/HEAD",
    "sns_requests": "SNS requests",
    "sqs_requests": "SQS requests",
    "dynamodb_write_units": "DynamoDB write units",
    "dynamodb_read_units": "DynamoDB read units",
    "dynamodb_stream_reads": "DynamoDB stream reads",
    "sfn_transitions": "Step Functions transitions",
}


def aws_round_cost() -> str:
    d = _load("aws", "round_cost.json")
    lines = [f"{d['rounds']} rounds of {d['clients']} clients, data: {d['data']}, final accuracy "
             f"{d['final_accuracy']:.3f}, {d['date'][:10]}: `{d['command']}`", "",
             "| item | per round | unit | $ per round |", "|---|---:|---|---:|"]
    for key, label in AWS_LABELS.items():
        q = d["per_round"].get(key, 0.0)
        lines.append(_row([label, f"{q:,.1f}", d["units"].get(key, ""),
                           f"{d['usd_per_round'].get(key, 0.0):.7f}"]))
    lines.append(_row(["**total**", "", "", f"**{d['usd_total_per_round']:.5f}**"]))
    lines += ["", f"Where the GB-s went (all {d['rounds']} rounds):", "",
              "| function | invocations | cold starts | GB-s |", "|---|---:|---:|---:|"]
    for name, f in d["functions"].items():
        lines.append(_row([f"`{name}`", str(f["invocations"]), str(f["cold_starts"]),
                           f"{f['gb_s']:.1f}"]))
    return "\n".join(lines)


SPARSITY_LABELS = {
    "fedavg": "FedAvg (float32)",
    "fedavg_q8": "FedAvg + 8-bit + zstd",
    "fedavg_q4": "FedAvg + 4-bit + zstd",
    "topk": "top-k 10 % + error feedback",
    "cs50": "CS s=0.5",
    "cs70": "CS s=0.7",
    "cs90": "CS s=0.9",
    "combined": "combined (CS + 4-bit + zstd + kept updates)",
}


def _sparsity_rows(d: dict[str, Any], part: str) -> str:
    """One partition's table: validation accuracy (every choice was made on it) and the
    test accuracy of the final model the clients decode, scored once."""
    res, eta = d["results"][part], d["config"]["eta"]
    base = res["fedavg"]["bytes_total"]
    lines = ["| method | setting | val acc | test acc (once) | MB up | MB down | MB total "
             "| FedAvg ÷ method |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, m in res.items():
        spec = m.get("spec", key)
        setting = (f"η={eta:g}" if key.startswith("cs") else
                   spec.partition(":")[2].replace(",", ", ") if ":" in spec else "")
        lines.append(_row([SPARSITY_LABELS.get(key, key), setting,
                           f"{m['final_val_accuracy']:.4f}", f"{m['final_accuracy']:.4f}",
                           f"{m['bytes_up'] / 1e6:.2f}", f"{m['bytes_down'] / 1e6:.2f}",
                           f"{m['bytes_total'] / 1e6:.2f}", f"{base / m['bytes_total']:.2f}×"]))
    return "\n".join(lines)


def sparsity_quick() -> str:
    d = _load("sparsity", "sparsity.json")
    return _sparsity_rows(d, next(iter(d["results"])))



def sparsity_targets() -> str:
    d = _load("sparsity", "sparsity.json")
    part = next(iter(d["results"]))
    r = d["results"][part]
    fed = r["fedavg"]

    def ratio(m: str) -> float:
        return float(fed["bytes_total"] / r[m]["bytes_total"])

    def gap(m: str) -> float:
        return float(100 * (r[m]["final_accuracy"] - fed["final_accuracy"]))

    def acc(m: str) -> str:
        return (f"{100 * r[m]['final_accuracy']:.2f} % vs {100 * fed['final_accuracy']:.2f} % "
                f"({gap(m):+.2f})")

    rows = [
        ("faithful CS s=0.5: bytes ratio ≥ 1.8", f"{ratio('cs50'):.2f}", ratio("cs50") >= 1.8),
        ("faithful CS s=0.5: accuracy within 2 points of FedAvg", acc("cs50"), gap("cs50") >= -2),
        ("combined: bytes ratio ≥ 8", f"{ratio('combined'):.2f}", ratio("combined") >= 8),
        ("combined: accuracy within 1 point of FedAvg", acc("combined"), gap("combined") >= -1),
        ("`--quick` under 5 minutes", f"{d['wall_s']:.0f} s", d["wall_s"] < 300),
    ]
    lines = [f"| target | measured ({part}, `{d['command']}`, test set once) | |",
             "|---|---|---|"]
    lines += [_row([t, v, "met" if ok else "**missed**"]) for t, v, ok in rows]
    return "\n".join(lines)

def sparsity_full_dirichlet() -> str:
    d = _load("sparsity", "full", "sparsity.json")
    return _sparsity_rows(d, next(k for k in d["results"] if k.startswith("dirichlet")))


def sparsity_full_shards() -> str:
    return _sparsity_rows(_load("sparsity", "full", "sparsity.json"), "shards")


def sparsity_tuning() -> str:
    d = _load("sparsity", "tuning.json")
    chosen = d["chosen"]
    lines = ["| stage | method | local training | validation accuracy | chosen |",
             "|---|---|---|---:|---|"]
    for c in d["candidates"]:
        args = dict(zip(c["args"][::2], c["args"][1::2], strict=True))
        local = (f"lr {args.get('--lr')}, batch {args.get('--batch-size')}, "
                 f"≤{args.get('--local-steps')} steps")
        method = c["method"] + (f", η={args['--eta']}" if "--eta" in args else "")
        picked = ((c["method"] == "cs50" and float(args.get("--eta", -1)) == chosen["eta"])
                  or c["method"] == chosen["combined"]
                  or (c["method"] == "fedavg" and float(args["--lr"]) == chosen["lr"]
                      and int(args["--batch-size"]) == chosen["batch_size"]
                      and int(args["--local-steps"]) == chosen["local_steps"]))
        if c["method"] == "cs50" and picked:  # CS takes the chosen local training too
            picked = float(args["--lr"]) == chosen["lr"]
        lines.append(_row([c["stage"], method, local, f"{c['val_accuracy']:.4f}",
                           "yes" if picked else ""]))
    return "\n".join(lines)


def fl_example() -> str:
    d = _load("fl_example", "runs.json")
    lines = ["| partition | accuracy after round 5 / 10 / 15 / 20 | final loss | wall | "
             "CPU (user + sys) | bytes up / down | function-s | cold starts "
             "| aggregation latency per round |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["runs"]:
        accs = [f"{a:.4f}" for a in r["accuracy_at"].values()]
        accs[-1] = f"**{accs[-1]}**"
        lat = r["aggregation_latency_s"]
        lines.append(_row([
            r["partition"], " / ".join(accs), f"{r['final_loss']:.3f}", f"{r['wall_s']:.1f} s",
            f"{r['cpu_s']:.0f} s", f"{r['bytes_up'] / 1e6:.1f} MB / {r['bytes_down'] / 1e6:.1f} MB",
            f"{r['function_seconds']:.0f}", str(r["cold_starts"]),
            f"{min(lat) * 1e3:.0f}–{max(lat) * 1e3:.0f} ms"]))
    return "\n".join(lines)


def fl_strategies() -> str:
    d = _load("fl_example", "strategies.json")
    base = next(r for r in d["runs"] if r["strategy"] == "fedavg")
    base_total = base["bytes_up"] + base["bytes_down"]
    lines = [f"{d['date'][:10]}, data: {d['data']}: `{d['command']}`", "",
             "| strategy | final accuracy | accuracy after round 10 / 15 | MB up | MB down "
             "| FedAvg ÷ it (bytes, total) | wall |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in d["runs"]:
        accs = [r["accuracy_at"].get(k) for k in ("10", "15")]
        total = r["bytes_up"] + r["bytes_down"]
        lines.append(_row([
            f"`{r['strategy']}`", f"{r['final_accuracy']:.4f}",
            " / ".join("—" if a is None else f"{a:.4f}" for a in accs),
            f"{r['bytes_up'] / 1e6:.2f}", f"{r['bytes_down'] / 1e6:.2f}",
            f"{base_total / total:.2f}×", f"{r['wall_s']:.0f} s"]))
    return "\n".join(lines)


def vs_flower() -> str:
    d = _load("vs_flower", "quick.json")
    lines = ["| system | final accuracy | wall (s) | overhead / round (s) "
             "| beyond training / round (s) | peak memory, all processes (PSS, MB) "
             "| MB up | MB down |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for system, label in (("strato", "Strato (`strato run`)"),
                          ("flower", f"Flower {d['versions']['flwr']} simulation (Ray "
                                     f"{d['versions']['ray']})")):
        lines.append(_row([label, f"{d[f'{system}_final_accuracy']:.4f}",
                           f"{d[f'{system}_wall_s']:.1f}",
                           f"{d[f'{system}_overhead_s_per_round']:.3f}",
                           f"{d[f'{system}_overhead_beyond_training_s_per_round']:.3f}",
                           f"{d[f'{system}_peak_pss_mb']:.0f}",
                           f"{d[f'{system}_bytes_up'] / 1e6:.1f}",
                           f"{d[f'{system}_bytes_down'] / 1e6:.1f}"]))
    lines += ["", "| key | value | target | met |", "|---|---:|---|---|"]
    for key, t in d["targets"].items():
        lines.append(_row([f"`{key}`", f"{t['value']:.4f}", t["target"],
                           "yes" if t["met"] else "NO"]))
    lines.append(_row(["`overhead_beyond_training_ratio` (context)",
                       f"{d['overhead_beyond_training_ratio']:.4f}", "", ""]))
    return "\n".join(lines)


def ray_accuracy() -> str:
    d = _load("ray", "accuracy.json")
    runs = d["runs"]
    lines = [f"| backend ({d['data']}, {d['rounds']} rounds, seed 0) | final accuracy | wall s "
             "| function-s |", "|---|---:|---:|---:|"]
    for name, label in (("embedded", "embedded"), ("ray", "ray, 3 local nodes × 1 CPU")):
        r = runs[name]
        lines.append(_row([label, f"{r['final_accuracy']:.4f}", f"{r['wall_s']:.1f}",
                           f"{r['function_seconds']:.1f}"]))
    gap = d["accuracy_gap_points"]
    met = "met" if d["targets"]["accuracy_gap_points"]["met"] else "**missed**"
    lines.append("")
    lines.append(f"Accuracy gap {gap:.2f} points (≤ 0.5: {met}); "
                 f"{d['cross_node_bytes'] / 1e6:.1f} MB crossed nodes (models down to the "
                 "clients of other nodes, the leaves' partials up to the root).")
    return "\n".join(lines)


def ray_scale() -> str:
    d = _load("ray", "scale.json")
    cfg = d["config"]
    lines = [f"{cfg['clients']} clients × {cfg['params'] / 1e6:g}M float32, {cfg['rounds']} "
             f"rounds per run, {cfg['nodes']} local nodes × 1 CPU; {d['date'][:10]}: "
             f"`{d['command']}`", "",
             "| run | completion s (median of rounds 2+) | aggregation bytes across nodes, "
             "measured | predicted |", "|---|---:|---:|---:|"]
    for label, completion, suffix in (("embedded (one machine)", "embedded", None),
                                      ("ray, leaves by best fit", "ray", ""),
                                      ("ray, leaves dealt round robin", "ray_round_robin",
                                       "_round_robin")):
        cells = ["—", "—"] if suffix is None else [
            f"{d[f'cross_node_bytes_{kind}{suffix}'] / 1e6:,.0f} MB"
            for kind in ("measured", "predicted")]
        lines.append(_row([label, f"{d[f'completion_s_{completion}']:.3f}", *cells]))
    parts = d.get("completion_parts_s")
    if parts:  # where each run's completion went (its own records, medians)
        lines += ["", "| run | partials to the root s | root's result s | model write s "
                  "| rest (last update in, to its leaf, added; bookkeeping) s |",
                  "|---|---:|---:|---:|---:|"]
        for kind, p in parts.items():
            lines.append(_row([kind, *("—" if p.get(k) is None else f"{p[k]:.3f}" for k in (
                "partials_s", "result_s", "model_write_s", "rest_s"))]))
    lines += ["", "| key | value | target | met |", "|---|---:|---|---|"]
    for key, t in d["targets"].items():
        value = "—" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(_row([f"`{key}`", value, t["target"], "yes" if t["met"] else "**NO**"]))
    ten = d["prediction_10_nodes"]
    lines += ["", f"Predicted for 10 nodes ({ten['clients']} clients spread evenly, "
              f"{ten['update_bytes'] / 1e6:g} MB updates), per round: "
              f"{ten['best_fit_bytes_per_round'] / 1e6:,.0f} MB with a leaf on each node, "
              f"{ten['round_robin_bytes_per_round'] / 1e6:,.0f} MB with leaves dealt round "
              f"robin, {ten['every_update_to_the_head_bytes_per_round'] / 1e6:,.0f} MB with "
              "every update sent to the head."]
    late = ten.get("late_partial_bytes_per_round_at_most")
    if late is not None:
        last = round(late / ten["update_bytes"])
        lines[-1] += (f" With leaves, the round's last {last} updates (sent up after the "
                      f"leaves' early partials) add at most {late / 1e6:,.0f} MB more (when "
                      "they land on worker nodes and no update is lost or refused).")
    return "\n".join(lines)


def _faults(name: str) -> str:
    d = _load("faults", name)
    cols = ("trials", "passed", "lost_updates", "double_counted", "diverged",
            "shm_leftovers", "unfinished", "hung", "without_fault", "shm_left_by_stopped_run")
    cols = tuple(c for c in cols if c in d)  # (campaigns before "hung" was counted)
    stopped = ("" if d.get("complete", True) else
               f"; **stopped after {d['trials']} of {d['trials_planned']} trials**")
    serve = d.get("reference_wall_s_serve")
    lines = [f"{d['date'][:10]}: `{d['command']}` (reference run {d['reference_wall_s']} s"
             + (f", `strato serve` reference {serve} s" if serve else "") + f"{stopped})",
             "", "| fault | " + " | ".join(cols) + " |", "|---" + "|---:" * len(cols) + "|"]
    for kind, row in d["per_kind"].items():
        lines.append(_row([kind, *(str(row[c]) for c in cols)]))
    lines.append(_row(["**all**", *(f"**{d[c]}**" for c in cols)]))
    return "\n".join(lines)


def faults_quick() -> str:
    return _faults("quick.json")


def faults_full() -> str:
    return _faults("full.json")


def faults_torn_blob() -> str:
    return _faults("torn-blob.json")


def fuzz() -> str:
    d = _load("fuzz", "fuzz.json")
    lines = [f"{d['date'][:10]}: `{d['command']}`", "",
             "| requests | 5xx | crashes | bad updates stored | honest rounds | "
             "server RSS growth | of it in the second half |", "|---:" * 7 + "|",
             _row([f"{d['requests']:,}", str(d["server_errors_5xx"]), str(d["crashes"]),
                   str(d["bad_updates_stored"]), str(d["honest_rounds_completed"]),
                   f"{d['rss_growth_mb']:.1f} MB", f"{d['rss_growth_second_half_mb']:.1f} MB"]),
             "", "Statuses: " + ", ".join(f"{n:,} × {s}" for s, n in d["statuses"].items())
             + "; not answered: " + ", ".join(f"{n:,} ({k})"
                                              for k, n in d["transport_errors"].items()) + "."]
    return "\n".join(lines)


def soak() -> str:
    d = _load("soak", "soak.json")
    lines = [f"{d['date'][:10]}: `{d['command']}` ({d['rounds']:,} rounds × {d['clients']} "
             f"clients × {d['params']:,} parameters, --keep-rounds {d['keep_rounds']}, "
             f"{d['rounds_per_s']} rounds/s)", "",
             "| key | value | bound |", "|---|---:|---|"]
    bounds = {"rss_slope_mb_per_100_rounds": "≤ 2", "open_fds_growth": "0",
              "open_fds_min_max": "", "open_fds_slope_per_100_rounds": "",
              "open_fds_least_first_last": "",
              "shm_segments_left": "0", "services_dir_mb_per_100_rounds": "bounded",
              "services_dir_mb_final": ""}
    for key, bound in bounds.items():
        if key in d:
            lines.append(_row([f"`{key}`", str(d[key]), bound]))
    return "\n".join(lines)


def poisoning() -> str:
    d = _load("poisoning", "poisoning.json")
    lines = [f"{d['date'][:10]}: `{d['command']}` ({d['data']}, {d['rounds']} rounds, "
             f"{d['seeds']} seeds; attackers: {d['attackers']}; attack: {d['attack']})", "",
             "| configuration | final test accuracy (mean) | per seed | drop (points) | "
             "within 3 points | updates clipped |", "|---|---:|---|---:|---|---:|"]
    for name, row in d["per_config"].items():
        within = {True: "yes", False: "**no**"}.get(row.get("within_3_points"), "")
        lines.append(_row([name, f"{row['final_accuracy']:.4f}",
                           ", ".join(f"{a:.4f}" for a in row["final_accuracy_per_seed"]),
                           str(row.get("drop_points", "")), within,
                           str(row["updates_clipped"])]))
    if d.get("clean_rounds_closed_by_deadline"):
        lines += ["", f"**Not comparable:** the clean run closed "
                  f"{d['clean_rounds_closed_by_deadline']} round(s) at the deadline (a machine "
                  "too slow for the benchmark's 30 s rounds)."]
    tuning = d.get("trimmedmean_beta")
    if tuning and "validation_final_accuracy" in tuning:
        tried = ", ".join(f"{b}: {a:.4f}" for b, a in tuning["validation_final_accuracy"].items())
        lines += ["", f"trimmedmean's `beta` = {tuning['chosen_beta']:g}, chosen on the "
                  f"{tuning['split']}; mean final validation accuracy per beta: {tried}."]
    return "\n".join(lines)


def async_fl() -> str:
    d = _load("async", "async.json")

    def num(v: Any, spec: str) -> str:
        return "missed" if v is None else format(v, spec)

    lines = [f"{d['date'][:10]}: `{d['command']}` ({d['data']}, {d['clients']} clients, "
             f"{d['per_round']} a round / at once, {d['rounds']} models each, speeds "
             f"{d['speed']}, {d['seeds']} seed(s))", "",
             "| mode | time to 0.97 (s) | final test accuracy |", "|---|---:|---:|",
             _row(["sync", num(d["sync_time_to_target_s"], ".1f"),
                   f"{d['sync_final_accuracy']:.4f}"]),
             _row(["async", num(d["async_time_to_target_s"], ".1f"),
                   f"{d['async_final_accuracy']:.4f}"]), "",
             "| key | value | target | met |", "|---|---:|---|---|"]
    for key, t in d["targets"].items():
        lines.append(_row([f"`{key}`", num(t["value"], ".4g"), t["target"],
                           "yes" if t["met"] else "**no**"]))
    if "speedup_busy" in d:  # recorded by the script since this key was added
        lines.append(_row(["`speedup_busy` (rounds' own time: no evaluation gaps)",
                           num(d["speedup_busy"], ".4g"), "", ""]))
    lines.append(_row(["`updates_refused_stale`", str(d["updates_refused_stale"]), "", ""]))
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[], str]] = {
    "async": async_fl,
    "faults-quick": faults_quick,
    "poisoning": poisoning,
    "faults-full": faults_full,
    "faults-torn-blob": faults_torn_blob,
    "fuzz": fuzz,
    "soak": soak,
    "vs-flower": vs_flower,
    "fl-example": fl_example,
    "fl-strategies": fl_strategies,
    "sparsity-quick": sparsity_quick,
    "sparsity-full-dirichlet": sparsity_full_dirichlet,
    "sparsity-full-shards": sparsity_full_shards,
    "sparsity-tuning": sparsity_tuning,
    "sparsity-targets": sparsity_targets,
    "primitives": primitives,
    "aggregation-quick": aggregation_quick,
    "aggregation-full": aggregation_full,
    "aggregation-quick-runs": aggregation_quick_runs,
    "aggregation-executors": aggregation_executors,
    "round-path": round_path,
    "inference-compare": inference_compare,
    "inference-matrix-1024": inference_matrix_1024,
    "inference-matrix-4096": inference_matrix_4096,
    "inference-launch": inference_launch,
    "inference-volumes": inference_volumes,
    "aws-round-cost": aws_round_cost,
    "ray-accuracy": ray_accuracy,
    "ray-scale": ray_scale,
}


def render(text: str, where: str) -> tuple[str, list[str]]:
    """``text`` with every marked block re-rendered, and the names of those that changed."""
    changed: list[str] = []

    def one(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"{where}: unknown report block {name!r} "
                             f"(known: {', '.join(RENDERERS)})")
        body = RENDERERS[name]().rstrip("\n") + "\n"
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(one, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if a table differs from its results")
    ap.add_argument("--docs", type=Path, default=DOCS, help="the docs directory")
    args = ap.parse_args(argv)
    stale: list[str] = []
    found = 0
    for path in sorted(args.docs.glob("*.md")):
        text = path.read_text()
        new, changed = render(text, str(path))
        found += len(BLOCK.findall(text))
        stale += [f"{path.name}: {name}" for name in changed]
        if changed and not args.check:
            path.write_text(new)
    verb = "differ from their results" if args.check else "rewritten"
    print(f"{found} report table(s) in {args.docs}; {len(stale)} {verb}"
          + (": " + ", ".join(stale) if stale else ""))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
