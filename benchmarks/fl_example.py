"""The example job, end to end: ``strato run examples/mnist`` on each partition.

    python benchmarks/fl_example.py --data-dir ../shared/data/mnist
    python benchmarks/fl_example.py --data-dir ../shared/data/mnist --partitions iid \
        --strategies fedavg cs "cs --eta 4" cs-combined \
        --json benchmarks/results/fl_example/strategies.json

Runs the README's main job (100 clients, 10 per round, 20 rounds, FedAvg, the
example's CNN and ``[train]`` settings) once per partition (``iid`` and ``shards`` by
default) and per strategy (``--strategies``: a strategy name, optionally followed by
its ``strato run`` options, e.g. ``"cs --eta 4"``; FedAvg by default) as a user would,
one after the other, and records per run: accuracy after
rounds 5 / 10 / 15 / 20, final loss, wall time of the command, its CPU time (user +
sys of the command and every process it started), bytes each way, function-seconds,
cold starts and the aggregation latency per round. Prints a table and writes
``benchmarks/results/fl_example/runs.json`` (``docs/benchmarks.md`` renders it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _aggregation_common import write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP = ROOT / "examples" / "mnist"
RESULTS = HERE / "results" / "fl_example"


def run_one(partition: str, data_dir: str | None, out: Path,
            rounds: int | None = None, strategy: str = "fedavg") -> dict[str, Any]:
    name, *options = shlex.split(strategy)
    cmd = [sys.executable, "-m", "strato", "run", str(APP), "--partition", partition,
           "--out", str(out), "--strategy", name, *options]
    if rounds:
        cmd += ["--rounds", str(rounds)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_round = {int(r["round"]): r for r in rows}
    return {
        "partition": partition,
        "strategy": strategy,
        "accuracy_at": {str(r): by_round[r]["accuracy"] for r in (5, 10, 15, 20) if r in by_round},
        "final_accuracy": summary["final_accuracy"],
        "final_loss": summary["final_loss"],
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "bytes_up": summary["bytes_up"],
        "bytes_down": summary["bytes_down"],
        "function_seconds": summary["function_seconds"],
        "cold_starts": summary["cold_starts"],
        "aggregation_latency_s": [r["aggregation_latency_s"] for r in rows],
        "bytes_up_per_round": [r["bytes_up"] for r in rows],
        "bytes_down_per_round": [r["bytes_down"] for r in rows],
        "config": {"strategy": summary["config"]["strategy"],
                   **summary["config"]["strategy_options"]},
        "first_line": proc.stdout.splitlines()[0] if proc.stdout else "",
    }


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("STRATO_DATA_DIR") or None,
                    help="MNIST IDX directory (default $STRATO_DATA_DIR, else the digits)")
    ap.add_argument("--partitions", nargs="+", default=["iid", "shards"],
                    choices=["iid", "dirichlet", "shards"])
    ap.add_argument("--strategies", nargs="+", default=["fedavg"],
                    help='each: a strategy, optionally with its options ("cs --eta 4")')
    ap.add_argument("--rounds", type=int, default=None, help="default: the example's (20)")
    ap.add_argument("--json", type=Path, default=RESULTS / "runs.json")
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="strato-fl-example-") as tmp:
        for part in args.partitions:
            for k, strategy in enumerate(args.strategies):
                print(f"strato run examples/mnist --partition {part} ({strategy}) ...",
                      flush=True)
                runs.append(run_one(part, args.data_dir, Path(tmp) / f"{part}-{k}",
                                    args.rounds, strategy))
                r = runs[-1]
                print(f"  accuracy {r['final_accuracy']:.4f}, {r['wall_s']:.1f} s wall, "
                      f"{r['cpu_s']:.1f} s CPU", flush=True)
    record = {
        "runs": runs, "data": args.data_dir or "scikit-learn digits (no MNIST directory given)",
        "command": shlex.join(["python", "benchmarks/fl_example.py", *raw]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"nproc": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())},
    }
    print("| partition | strategy | accuracy after round 5 / 10 / 15 / 20 | MB up / down "
          "| wall (s) | CPU (s) |")
    print("|---|---|---|---:|---:|---:|")
    for r in runs:
        accs = " / ".join(f"{a:.4f}" for a in r["accuracy_at"].values())
        print(f"| {r['partition']} | {r['strategy']} | {accs} | {r['bytes_up'] / 1e6:.2f} / "
              f"{r['bytes_down'] / 1e6:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} |")
    write_results(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
