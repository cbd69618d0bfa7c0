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

from _aggregation_common import provenance
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

QUICK_METHODS = ["fedavg", "fedavg_q4", "cs50", "combined"]
ALL_METHODS = ["fedavg", "fedavg_q8", "fedavg_q4", "topk", "cs50", "cs70", "cs90", "combined"]
TUNING = Path(__file__).resolve().parent / "results" / "sparsity" / "tuning.json"
# Settings chosen on the validation split (--tune) and what they fall back to when no
# tuning file exists (a fresh --tune starts from these).
TUNABLE_DEFAULTS: dict[str, Any] = {"lr": 0.003, "batch_size": 32, "local_steps": 200,
                                    "eta": 4.0, "combined": "combined"}


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
    ap.add_argument("--lr", type=float, default=None, help="default: the tuning file's")
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    ap.add_argument("--epochs", type=int, default=5, help="local epochs (capped by --local-steps)")
    ap.add_argument("--init", choices=["torch", "he"], default="torch",
                    help="initial model: torch's default, or He-uniform kernels and zero biases")
    ap.add_argument("--model", choices=["paper", "fast"], default="fast",
                    help="fast: 5x5 stride-2 first convolution (10x fewer multiply-adds)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the tuning file's")
    ap.add_argument("--local-steps", type=int, default=None,
                    help="most optimizer steps per client per round (default: the tuning "
                    "file's)")
    ap.add_argument("--eval-subset", type=int, default=2000,
                    help="test images for per-round accuracy")
    ap.add_argument("--out", default="benchmarks/results/sparsity", help="output directory")
    ap.add_argument("--json", default=None, help="write the summary keys to this file")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--jobs", type=int, default=None,
                    help="methods run at once, each in its own worker process with 1 torch "
                    "thread (default: one per method, at most 3 per core)")
    ap.add_argument("--eta", type=float, default=None,
                    help="aggregation rate of the faithful CS methods (a method spec may override "
                    "it; default: the tuning file's); the combined mode takes the tuning "
                    "file's spec (its own eta and kept rate)")
    ap.add_argument("--tuning", type=Path, default=TUNING,
                    help="settings chosen on the validation split (written by --tune)")
    ap.add_argument("--tune", action="store_true",
                    help="choose lr, batch size, step cap, eta and the combined mode's eta and "
                    "kept rate on the validation split (quick shape); writes --tuning")
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--validation-only", action="store_true", help=argparse.SUPPRESS)
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
    args.tuned = tuned_settings(args)
    return args


def tuned_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the unset tunables from the tuning file (else the fallbacks); returns where
    each value came from."""
    chosen: dict[str, Any] = dict(TUNABLE_DEFAULTS)
    source = "fallback defaults (no tuning file)"
    if args.tuning is not None and args.tuning.is_file() and not args.tune:
        chosen.update(json.loads(args.tuning.read_text())["chosen"])
        root = Path(__file__).resolve().parent.parent
        path = args.tuning.resolve()
        source = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    origin = {}
    for key in ("lr", "batch_size", "local_steps", "eta"):
        if getattr(args, key) is None:
            setattr(args, key, chosen[key])
            origin[key] = source
        else:
            origin[key] = "command line"
    args.specs = {"combined": chosen["combined"]}
    origin["combined"] = source
    return {"values": {**{k: getattr(args, k) for k in ("lr", "batch_size", "local_steps",
                                                        "eta")}, **args.specs},
            "from": origin}


def run_method(spec: str, trainer: Trainer, parts: list[np.ndarray], schedule: list[list[int]],
               args: argparse.Namespace) -> dict[str, Any]:
    """One method through every round. Each round's accuracy is that of the model the
    clients decode from the next download, on the validation split; the last round's
    model is also scored on the test set (``test_accuracy``), once, unless ``--tune``."""
    method = make_method(args.specs.get(spec, spec), trainer.initial(args.seed), args.seed,
                         args.eta)
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
        decoded = method.client_model(rnd)
        acc = trainer.accuracy(decoded, limit, "validation")
        rows.append({"round": rnd, "val_accuracy": acc, "bytes_up": up, "bytes_down": down,
                     "rejected_updates": rejected,
                     "wall_s": round(time.perf_counter() - t0, 2),
                     "cpu_s": round(time.process_time() - cpu0, 2)})
        server = getattr(method, "server", None)
        if last:
            rows[-1]["val_accuracy_server_record"] = trainer.accuracy(method.model(), None)
            if server is not None:  # CS: the model before pruning (never sent; insight)
                rows[-1]["val_accuracy_dense"] = trainer.accuracy(server.dense, None)
            if not (args.tune or args.validation_only):
                rows[-1]["test_accuracy"] = trainer.accuracy(decoded, None, "test")
        print(f"  {spec:<28} round {rnd:>3}  val acc {acc:.4f}  up {up / 1e6:8.2f} MB"
              f"  down {down / 1e6:8.2f} MB  ({rows[-1]['wall_s']:.0f} s)", flush=True)
    final = rows[-1]
    return {"method": spec, "spec": args.specs.get(spec, spec), "rounds": rows,
            "final_val_accuracy": final["val_accuracy"],
            "final_accuracy": final.get("test_accuracy"),
            "bytes_up": up, "bytes_down": down, "bytes_total": up + down,
            "cpu_s": final["cpu_s"], "rejected_updates": rejected}


def summary_keys(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The acceptance keys, from one partition's results: final test accuracy of the
    model the clients decode, and FedAvg's bytes over the method's."""
    out: dict[str, Any] = {"tuned_on": "validation", "scored_on": "test (once, final model)"}
    fed = results.get("fedavg")
    if fed is None:
        return out
    out["fedavg_accuracy"] = fed["final_accuracy"]
    for key, name in (("cs50", "cs50"), ("best", "combined"),
                      ("fedavg_q8_zstd", "fedavg_q8"), ("fedavg_q4_zstd", "fedavg_q4")):
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
            ys = [row["val_accuracy"] for row in r["rounds"]]
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("cumulative bytes, up + down")
        ax.set_ylabel("validation accuracy (model the clients decode)")
        ax.set_title(part)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def partition_for(part: str, data: Dataset, args: argparse.Namespace) -> tuple[str, list[Any]]:
    """The clients' rows of the training set (the validation rows are never a client's)."""
    rows = data.train_idx
    assert rows is not None
    if part == "dirichlet":
        label = f"dirichlet({args.alpha})"
        parts = dirichlet_partition(data.y_train[rows], args.clients, args.alpha, args.seed)
    else:
        label, parts = "shards", shards_partition(data.y_train[rows], args.clients, args.seed)
    return label, [rows[p] for p in parts]


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


Task = tuple[str, str, tuple[str, ...]]  # (partition, method, extra command-line args)


def run_task(argv: list[str], part: str, spec: str) -> dict[str, Any]:
    """One task: ``spec`` on partition ``part``, with the settings ``argv`` gives."""
    args = parse_args(argv)
    if ":" in spec:  # a tuning candidate's own spec
        args.specs[spec] = spec
    data, trainer, schedule = setup(args)
    _, parts = partition_for(part, data, args)
    return run_method(spec, trainer, parts, schedule, args)


def run_in_workers(tasks: list[Task], argv: list[str], jobs: int,
                   tmp: Path) -> dict[Task, dict[str, Any]]:
    """Run each task in its own process, ``jobs`` at a time (1 thread each); with
    ``jobs`` 1, one after another in this process (no interpreter to start per task)."""
    if jobs == 1:
        return {(part, spec, extra): run_task([*argv, *extra], part, spec)
                for part, spec, extra in tasks}
    pending = list(enumerate(tasks))
    running: list[tuple[subprocess.Popen[bytes], int]] = []
    results: dict[Task, dict[str, Any]] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, (part, spec, extra) = pending.pop(0)
                cmd = [sys.executable, str(Path(__file__).resolve()), *argv, *extra,
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
    return {t: results[t] for t in tasks}  # in task order: ties go to the earlier task


def _best(runs: dict[Task, dict[str, Any]]) -> Task:
    """The candidate with the highest final validation accuracy (full validation set)."""
    return max(runs, key=lambda t: runs[t]["final_val_accuracy"])


def tune(args: argparse.Namespace, argv: list[str]) -> int:
    """Coordinate search on the validation split, in three stages: FedAvg's learning
    rate; then its batch size and step cap; then, with those, faithful CS's eta and the
    combined mode's eta and kept rate. The test set is never read."""
    part = "dirichlet"
    base = [*(a for a in argv if a != "--tune"), "--validation-only"]  # never the test set
    jobs = args.jobs or 3 * (os.cpu_count() or 1)
    log: list[dict[str, Any]] = []
    started = time.perf_counter()

    def stage(name: str, tasks: list[Task]) -> dict[Task, dict[str, Any]]:
        print(f"tuning stage {name}: {len(tasks)} candidates", flush=True)
        with tempfile.TemporaryDirectory(prefix="strato-tune-") as tmp:
            runs = run_in_workers(tasks, base, min(jobs, len(tasks)), Path(tmp))
        for (_, _, extra), r in runs.items():
            log.append({"stage": name, "method": r["spec"], "args": list(extra),
                        "val_accuracy": r["final_val_accuracy"], "bytes_total": r["bytes_total"],
                        "cpu_s": r["cpu_s"]})
            print(f"  {r['spec']:<30} {' '.join(extra):<40} val {r['final_val_accuracy']:.4f}",
                  flush=True)
        return runs

    def flags(lr: float, batch: int, steps: int) -> tuple[str, ...]:
        return ("--lr", str(lr), "--batch-size", str(batch), "--local-steps", str(steps))

    lr_runs = stage("lr", [(part, "fedavg", flags(lr, 32, 200)) for lr in (0.001, 0.003, 0.01)])
    lr = float(_best(lr_runs)[2][1])
    shape_tasks = [(part, "fedavg", flags(lr, b, n)) for b, n in ((64, 200), (32, 100))]
    shape_runs = {**lr_runs, **stage("batch and step cap", shape_tasks)}
    _, _, won = _best({t: r for t, r in shape_runs.items() if t[2][1] == str(lr)})
    batch, steps = int(won[3]), int(won[5])
    local = flags(lr, batch, steps)
    cs_tasks = [(part, "cs50", (*local, "--eta", str(eta))) for eta in (1.5, 2.5, 4.0, 6.0)]
    combined_tasks = [(part, f"combined:eta={eta},kept={kept}", local)
                      for eta in (1.5, 4.0) for kept in (0.5, 1.0)]
    cs_runs = stage("CS eta; combined eta and kept rate", cs_tasks + combined_tasks)
    eta = float(_best({t: r for t, r in cs_runs.items() if t[1] == "cs50"})[2][-1])
    combined = _best({t: r for t, r in cs_runs.items() if t[1].startswith("combined")})[1]
    chosen = {"lr": lr, "batch_size": batch, "local_steps": steps, "eta": eta,
              "combined": combined}
    record = {"command": " ".join(["python", "benchmarks/sparsity.py", *argv]),
              "tuned_on": "validation", "criterion": "final validation accuracy of the model "
              "the clients decode (6,000 images held out of the training set)",
              "partition": f"dirichlet({args.alpha})", "rounds": args.rounds,
              "wall_s": round(time.perf_counter() - started, 1),
              "chosen": chosen, "candidates": log, **provenance()}
    args.tuning.parent.mkdir(parents=True, exist_ok=True)
    args.tuning.write_text(json.dumps(record, indent=1))
    print(f"chosen on validation: {json.dumps(chosen)}; wrote {args.tuning}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        part, spec, result = args.worker
        Path(result).write_text(json.dumps(run_task(argv, part, spec)))
        return 0
    if args.tune:
        return tune(args, argv)
    partitions = ["dirichlet", "shards"] if args.partition == "both" else [args.partition]
    tasks: list[Task] = [(part, m, ()) for part in partitions for m in args.methods]
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
                done[(part, m, ())] = run_method(m, trainer, parts, schedule, args)
    all_results = {labels[p]: {m: done[(p, m, ())] for m in args.methods} for p in partitions}
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["python", "benchmarks/sparsity.py", *argv]),
              "data": data.name, "wall_s": round(wall, 1),
              "tuned_on": "validation", "settings": args.tuned,
              "config": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in vars(args).items() if k not in ("worker", "tuned")},
              "results": all_results, **provenance()}
    (out / "sparsity.json").write_text(json.dumps(record, indent=1))
    if not args.no_plot:
        plot(all_results, out / "sparsity.png")
    print(f"\n{'partition':<16} {'method':<28} {'val acc':>8} {'test acc':>8} {'MB up':>9} "
          f"{'MB down':>9} {'MB total':>9} {'vs FedAvg':>9}")
    for label, results in all_results.items():
        fed = results.get("fedavg")
        for name, r in results.items():
            ratio = f"{fed['bytes_total'] / r['bytes_total']:.2f}x" if fed else "-"
            print(f"{label:<16} {name:<28} {r['final_val_accuracy']:>8.4f} "
                  f"{r['final_accuracy']:>8.4f} "
                  f"{r['bytes_up'] / 1e6:>9.2f} {r['bytes_down'] / 1e6:>9.2f} "
                  f"{r['bytes_total'] / 1e6:>9.2f} {ratio:>9}")
    print(f"wall time {wall:.0f} s; results in {out}")
    if args.json:
        first = next(iter(all_results.values()))
        keys = summary_keys(first)
        keys.update(partition=next(iter(all_results)), rounds=args.rounds, wall_s=round(wall, 1),
                    command=record["command"], **provenance())
        Path(args.json).write_text(json.dumps(keys, indent=1))
        print(f"summary: {json.dumps(keys)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
