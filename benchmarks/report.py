"""The docs' benchmark tables, rendered from the results committed under benchmarks/results/.

    python benchmarks/report.py           # rewrite every marked table in docs/
    python benchmarks/report.py --check   # exit 1 (and say where) if a table differs

A table in ``docs/*.md`` that comes from results sits between two markers:

    <!-- report: NAME -->
    ...the table, as this script renders it...
    <!-- /report -->

NAME is one of ``RENDERERS``; each reads its JSON files and returns markdown. Nothing
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


def _load(*parts: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(RESULTS.joinpath(*parts).read_text())
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
        ["blob put (GB/s, sha256 + fsync)", f"{blobs['put_gbps']:.2f}",
         f"{blobs['baseline_file_write_fsync_gbps']:.2f}", "file write + fsync"],
        ["blob get, sha256 checked (GB/s)", f"{blobs['get_verified_gbps']:.2f}",
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


def round_path() -> str:
    before = _load("round_path", "before.json")
    full = _load("round_path", "full.json")
    quick = _load("round_path", "quick.json")

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
        ("`peak_rss_ratio_1000_vs_100`", "peak_rss_ratio_1000_vs_100", ratio),
    ]
    lines = [
        f"| key | before | full ({len(full['ran']['measured_rounds'])} measured rounds) "
        f"| quick ({len(quick['ran']['measured_rounds'])} measured round"
        f"{'s' if len(quick['ran']['measured_rounds']) > 1 else ''}) | target (full run) |",
        "|---|---:|---:|---:|---|",
    ]
    for label, key, fmt in keys:
        lines.append(_row([label, fmt(before.get(key)), fmt(full.get(key)), fmt(quick.get(key)),
                           target(key)]))
    lines.append(_row(["`sharded_median_peak_mb` (64 × 25M, `function_memory_mb` 1024)",
                       sharded(before), sharded(full), sharded(quick),
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


RENDERERS: dict[str, Callable[[], str]] = {
    "vs-flower": vs_flower,
    "fl-example": fl_example,
    "sparsity-quick": sparsity_quick,
    "sparsity-full-dirichlet": sparsity_full_dirichlet,
    "sparsity-full-shards": sparsity_full_shards,
    "sparsity-tuning": sparsity_tuning,
    "primitives": primitives,
    "aggregation-quick": aggregation_quick,
    "aggregation-full": aggregation_full,
    "round-path": round_path,
    "inference-compare": inference_compare,
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
