"""Communication benchmark: FedAvg, top-k, Complement Sparsification and a combined mode.

MNIST, 100 clients, 10 per round, a small CNN; every method sees the same initial
model, the same client schedule and the same per-client training seeds. Bytes are
the lengths of the actual encoded payloads, both ways (a download blob counts once
per client that fetches it).

    python benchmarks/sparsity.py --quick --json quick.json     # dirichlet(0.5), 30 rounds
    python benchmarks/sparsity.py --rounds 40 --out results/     # full table, both partitions
    python benchmarks/sparsity.py --smoke --json smoke.json      # 2 rounds, synthetic data

Per-round accuracy is measured on the first --eval-subset test images; the final
round on the whole test set. Results go to OUT/sparsity.json and a plot of accuracy
against cumulative total bytes to OUT/sparsity.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sparsity_data import (
    Dataset,
    TrainConfig,
    Trainer,
    dirichlet_partition,
    load_mnist,
    shards_partition,
    synthetic,
)
from _sparsity_methods import _seed, make_method

QUICK_METHODS = ["fedavg", "cs50", "combined"]
ALL_METHODS = ["fedavg", "topk", "cs50", "cs70", "cs90", "combined"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="MNIST IDX directory (else STRATO_DATA_DIR)")
    ap.add_argument("--quick", action="store_true",
                    help="dirichlet(0.5), 30 rounds, fedavg/cs50/combined")
    ap.add_argument("--smoke", action="store_true", help="2 rounds, 4 clients, synthetic data")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--partition", choices=["dirichlet", "shards", "both"], default=None)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="names (comma-joined or not) or name:key=value,... specs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                    help="local optimizer, fresh per client and round")
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    ap.add_argument("--epochs", type=int, default=5, help="local epochs (capped by --local-steps)")
    ap.add_argument("--init", choices=["torch", "he"], default="torch",
                    help="initial model: torch's default, or He-uniform kernels and zero biases")
    ap.add_argument("--model", choices=["paper", "fast"], default="fast",
                    help="fast: 5x5 stride-2 first convolution (10x fewer multiply-adds)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--local-steps", type=int, default=200,
                    help="most optimizer steps per client per round")
    ap.add_argument("--eval-subset", type=int, default=2000,
                    help="test images for per-round accuracy")
    ap.add_argument("--out", default="benchmarks/results/sparsity", help="output directory")
    ap.add_argument("--json", default=None, help="write the summary keys to this file")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--jobs", type=int, default=None,
                    help="methods run at once, each in its own worker process with 1 torch "
                    "thread (default: one per method, at most 3 per core)")
    ap.add_argument("--eta", type=float, default=4.0,
                    help="aggregation rate of the faithful CS methods (a method spec may override "
                    "it; 1.5, the CLI's default, stalls CS in this setup: docs/sparsity.md); "
                    "the combined mode keeps its 1.5 unless its spec sets eta")
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds = args.rounds or 2
        args.clients, args.per_round, args.local_steps = 4, 2, 2
        args.partition = args.partition or "dirichlet"
        args.methods = args.methods or ALL_METHODS
    elif args.quick:
        args.rounds = args.rounds or 30
        args.partition = args.partition or "dirichlet"
        args.methods = args.methods or QUICK_METHODS
    args.rounds = args.rounds or 30
    args.partition = args.partition or "both"
    # "a,b c:k=1,j=2": plain names may be comma-joined; a spec with options stands alone.
    methods = args.methods or [",".join(ALL_METHODS)]
    args.methods = [m for item in methods
                    for m in ([item] if ":" in item else item.split(",")) if m]
    return args


def run_method(spec: str, trainer: Trainer, parts: list[np.ndarray], schedule: list[list[int]],
               args: argparse.Namespace) -> dict[str, Any]:
    method = make_method(spec, trainer.initial(args.seed), args.seed, args.eta)
    up = down = 0
    rows = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    rejected = 0
    for rnd, selected in enumerate(schedule, start=1):
        blob = method.download(rnd)
        uploads = []
        for client in selected:
            down += len(blob)
            got = method.receive(blob)
            trained = trainer.train(got.params, parts[client], _seed(args.seed, rnd, client))
            if not np.isfinite(trained.flat()).all():
                # Training diverged: the FL aggregator refuses such an update (fl/aggregator.py)
                # and so does this simulation; the client sends nothing.
                rejected += 1
                continue
            payload = method.upload(client, rnd, got, trained)
            up += len(payload)
            uploads.append((payload, len(parts[client])))
        if uploads:  # else the model stays as it was, as in a round closed without updates
            method.aggregate(rnd, uploads)
        last = rnd == len(schedule)
        limit = None if last else args.eval_subset
        acc = trainer.accuracy(method.model(), limit)
        rows.append({"round": rnd, "accuracy": acc, "bytes_up": up, "bytes_down": down,
                     "rejected_updates": rejected,
                     "wall_s": round(time.perf_counter() - t0, 2),
                     "cpu_s": round(time.process_time() - cpu0, 2)})
        server = getattr(method, "server", None)
        if server is not None and last:  # CS: the model before pruning (never sent; insight)
            rows[-1]["accuracy_dense"] = trainer.accuracy(server.dense, limit)
        print(f"  {spec:<28} round {rnd:>3}  acc {acc:.4f}  up {up / 1e6:8.2f} MB"
              f"  down {down / 1e6:8.2f} MB  ({rows[-1]['wall_s']:.0f} s)", flush=True)
    return {"method": spec, "rounds": rows, "final_accuracy": rows[-1]["accuracy"],
            "bytes_up": up, "bytes_down": down, "bytes_total": up + down,
            "cpu_s": rows[-1]["cpu_s"], "rejected_updates": rejected}


def summary_keys(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The acceptance keys, from one partition's results (final round of each)."""
    out: dict[str, Any] = {}
    fed = results.get("fedavg")
    if fed is None:
        return out
    out["fedavg_accuracy"] = fed["final_accuracy"]
    for key, name in (("cs50", "cs50"), ("best", "combined")):
        r = results.get(name)
        if r is not None:
            out[f"{key}_accuracy"] = r["final_accuracy"]
            out[f"{key}_bytes_ratio"] = fed["bytes_total"] / r["bytes_total"]
    return out


def plot(all_results: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(6.5 * len(all_results), 4.5),
                             squeeze=False)
    for ax, (part, results) in zip(axes[0], all_results.items(), strict=True):
        for name, r in results.items():
            xs = [row["bytes_up"] + row["bytes_down"] for row in r["rounds"]]
            ys = [row["accuracy"] for row in r["rounds"]]
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("cumulative bytes, up + down")
        ax.set_ylabel("test accuracy")
        ax.set_title(part)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def partition_for(part: str, data: Dataset, args: argparse.Namespace) -> tuple[str, list[Any]]:
    if part == "dirichlet":
        return (f"dirichlet({args.alpha})",
                dirichlet_partition(data.y_train, args.clients, args.alpha, args.seed))
    return "shards", shards_partition(data.y_train, args.clients, args.seed)


def setup(args: argparse.Namespace) -> tuple[Dataset, Trainer, list[list[int]]]:
    torch.set_num_threads(max(1, args.threads))
    data: Dataset = synthetic(seed=args.seed) if args.smoke else load_mnist(args.data_dir)
    trainer = Trainer(data, TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        optimizer=args.optimizer, init=args.init, max_steps=args.local_steps,
        fast_model=args.model == "fast"))
    rng = np.random.default_rng(args.seed)
    schedule = [sorted(rng.choice(args.clients, args.per_round, replace=False).tolist())
                for _ in range(args.rounds)]
    return data, trainer, schedule


def run_in_workers(tasks: list[tuple[str, str]], argv: list[str], jobs: int,
                   tmp: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Run each (partition, method) in its own process, ``jobs`` at a time (1 thread each)."""
    pending = list(enumerate(tasks))
    running: list[tuple[subprocess.Popen[bytes], int]] = []
    results: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, (part, spec) = pending.pop(0)
                cmd = [sys.executable, str(Path(__file__).resolve()), *argv,
                       "--worker", part, spec, str(tmp / f"task{i}.json")]
                running.append((subprocess.Popen(cmd), i))
            time.sleep(0.2)
            for proc, i in list(running):
                if proc.poll() is None:
                    continue
                running.remove((proc, i))
                if proc.returncode != 0:
                    raise SystemExit(f"worker for {tasks[i]} failed (exit {proc.returncode})")
                results[tasks[i]] = json.loads((tmp / f"task{i}.json").read_text())
    finally:
        for proc, _ in running:  # on error or Ctrl-C, stop the workers this run started
            proc.kill()
            proc.wait()
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        part, spec, result = args.worker
        data, trainer, schedule = setup(args)
        _, parts = partition_for(part, data, args)
        Path(result).write_text(json.dumps(run_method(spec, trainer, parts, schedule, args)))
        return 0
    partitions = ["dirichlet", "shards"] if args.partition == "both" else [args.partition]
    tasks = [(part, m) for part in partitions for m in args.methods]
    if args.jobs is None:
        # More workers than cores on purpose: the methods differ little in cost, so all of
        # them progressing at once ends sooner than whole methods queueing behind others
        # (3 methods on 2 cores: 1.5 methods' time instead of 2).
        args.jobs = min(len(tasks), 3 * (os.cpu_count() or 1))
    data, trainer, schedule = setup(args)
    labels = {part: partition_for(part, data, args)[0] for part in partitions}
    print(f"data: {data.name}; {args.clients} clients, {args.per_round} per round, "
          f"{args.rounds} rounds; methods: {', '.join(args.methods)}; "
          f"{min(args.jobs, len(tasks))} at a time", flush=True)
    t0 = time.perf_counter()
    if args.jobs > 1 and len(tasks) > 1:
        with tempfile.TemporaryDirectory(prefix="strato-sparsity-") as tmp:
            done = run_in_workers(tasks, argv, args.jobs, Path(tmp))
    else:
        done = {}
        for part in partitions:
            _, parts = partition_for(part, data, args)
            for m in args.methods:
                done[(part, m)] = run_method(m, trainer, parts, schedule, args)
    all_results = {labels[p]: {m: done[(p, m)] for m in args.methods} for p in partitions}
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["python", "benchmarks/sparsity.py", *argv]),
              "data": data.name, "wall_s": round(wall, 1),
              "config": {k: v for k, v in vars(args).items() if k != "worker"},
              "results": all_results}
    (out / "sparsity.json").write_text(json.dumps(record, indent=1))
    if not args.no_plot:
        plot(all_results, out / "sparsity.png")
    print(f"\n{'partition':<16} {'method':<28} {'final acc':>9} {'MB up':>9} {'MB down':>9} "
          f"{'MB total':>9} {'vs FedAvg':>9}")
    for label, results in all_results.items():
        fed = results.get("fedavg")
        for name, r in results.items():
            ratio = f"{fed['bytes_total'] / r['bytes_total']:.2f}x" if fed else "-"
            print(f"{label:<16} {name:<28} {r['final_accuracy']:>9.4f} "
                  f"{r['bytes_up'] / 1e6:>9.2f} {r['bytes_down'] / 1e6:>9.2f} "
                  f"{r['bytes_total'] / 1e6:>9.2f} {ratio:>9}")
    print(f"wall time {wall:.0f} s; results in {out}")
    if args.json:
        first = next(iter(all_results.values()))
        keys = summary_keys(first)
        keys.update(partition=next(iter(all_results)), rounds=args.rounds, wall_s=round(wall, 1))
        Path(args.json).write_text(json.dumps(keys, indent=1))
        print(f"summary: {json.dumps(keys)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
