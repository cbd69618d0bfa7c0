"""The example app on a 3-node Ray cluster beside the embedded backend, same seed.

    python benchmarks/ray_accuracy.py [--rounds 20] [--data-dir DIR] [--json PATH]

Runs ``examples/mnist`` (unchanged) twice: on the embedded backend, then with
``--backend ray`` on a local 3-node cluster (``strato.backends.ray.local``, 1 CPU per
node). Prints a table and writes ``benchmarks/results/ray/accuracy.json``: each run's
final accuracy, wall time, function-seconds, and the Ray run's placement (invocations
per node, bytes that crossed nodes). Keys: ``accuracy_embedded``, ``accuracy_ray``,
``accuracy_gap_points`` (the acceptance bound is 0.5), ``wall_s_embedded``,
``wall_s_ray``, ``cross_node_bytes``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _aggregation_common import log, write_results

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "mnist"


def one_run(out: Path, rounds: int, data_dir: str | None, address: str | None) -> dict[str, Any]:
    from strato.fl.config import load_job_config
    from strato.fl.run import RunOptions, run_job

    config = load_job_config(EXAMPLE / "strato.toml").override(rounds=rounds)
    services = None if address is None else {"backend": "ray", "address": address}
    started = time.time()
    summary = run_job(RunOptions(app_dir=EXAMPLE, out=out, config=config, quiet=True,
                                 data_dir=data_dir, services=services))
    return {"final_accuracy": summary["final_accuracy"], "wall_s": time.time() - started,
            "function_seconds": summary["function_seconds"],
            "updates_accepted": summary["updates_accepted"],
            "placement": summary.get("placement")}


def _commit() -> str | None:
    """The commit measured (with ``+changes`` when the work tree differs from it)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return None if not head else head + ("+changes" if git("status", "--porcelain") else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--data-dir", default=os.environ.get("STRATO_DATA_DIR"),
                    help="MNIST IDX files (default: $STRATO_DATA_DIR; else the digits)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "ray" / "accuracy.json")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be ≥ 1")
    import strato.backends.ray  # noqa: F401 - registers the backend
    from strato.backends.ray.local import LocalCluster

    with tempfile.TemporaryDirectory(prefix="strato-ray-accuracy-") as tmp:
        log(f"embedded: {args.rounds} rounds")
        embedded = one_run(Path(tmp) / "embedded", args.rounds, args.data_dir, None)
        log(f"  accuracy {embedded['final_accuracy']:.4f} in {embedded['wall_s']:.1f} s")
        log("ray: a local 3-node cluster, 1 CPU per node")
        with LocalCluster(nodes=3, cpus=1) as cluster:
            on_ray = one_run(Path(tmp) / "ray", args.rounds, args.data_dir, cluster.address)
        log(f"  accuracy {on_ray['final_accuracy']:.4f} in {on_ray['wall_s']:.1f} s")
    gap = abs(on_ray["final_accuracy"] - embedded["final_accuracy"]) * 100
    record = {
        "accuracy_embedded": embedded["final_accuracy"],
        "accuracy_ray": on_ray["final_accuracy"],
        "accuracy_gap_points": gap,
        "wall_s_embedded": embedded["wall_s"],
        "wall_s_ray": on_ray["wall_s"],
        "cross_node_bytes": (on_ray["placement"] or {}).get("cross_node_bytes"),
        "targets": {"accuracy_gap_points": {"bound": 0.5, "met": gap <= 0.5}},
        "data": "MNIST" if args.data_dir else "scikit-learn digits",
        "rounds": args.rounds,
        "runs": {"embedded": embedded, "ray": on_ray},
        "commit": _commit(),
        "command": "python benchmarks/ray_accuracy.py" + " ".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
    }
    print("| backend | accuracy | wall s | function-s |\n|---|---:|---:|---:|")
    for name, r in (("embedded", embedded), ("ray, 3 nodes", on_ray)):
        print(f"| {name} | {r['final_accuracy']:.4f} | {r['wall_s']:.1f} "
              f"| {r['function_seconds']:.1f} |")
    print(f"accuracy gap {gap:.2f} points (≤ 0.5: {'met' if gap <= 0.5 else 'MISSED'}); "
          f"{record['cross_node_bytes']:,} bytes crossed nodes")
    write_results(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
