#!/usr/bin/env python
"""Asynchronous against synchronous FL under stragglers: wall time to a target accuracy.

    python benchmarks/async_fl.py --data-dir ../shared/data/mnist \
        --json benchmarks/results/async/async.json

Runs ``strato run`` as a user would, twice per seed, on the MNIST example's app and
``[train]`` settings: 100 clients whose speeds are drawn from a log-normal
distribution (``[clients] speed = "lognormal:1"``: a client waits ``exp(z)`` times its
training time after training, ``z`` a standard normal drawn per client), with

- **sync**: FedAvg, 10 clients a round, the round closing when all 10 have reported
  (the README's job: it waits for its slowest client);
- **async**: buffered aggregation (``mode = "async"``), 10 clients training at once,
  every 10 updates a new version, polynomial staleness weights ``(1 + s)^-0.5``,
  ``max_staleness`` 10.

Both run the same number of rounds (versions), so both add the same number of updates,
with the same seeds, data and client speeds, and as many simulated clients at once
(``client_concurrency`` 10). The time to target is the wall time from the run's start
to the first model whose test accuracy reaches ``--target``; a run that never
reaches it reports ``null`` (missed). Keys: ``sync_time_to_target_s``,
``async_time_to_target_s``, ``speedup`` (sync ÷ async), ``sync_final_accuracy``,
``async_final_accuracy``, ``updates_refused_stale``; medians over ``--seeds``.
A synchronous run evaluates each model between its rounds (the round loop's step), which
lengthens its wall time; ``speedup_busy`` compares the times spent in rounds only
(``*_time_to_target_busy_s``), the gain from not waiting for stragglers alone.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _aggregation_common import write_results

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "mnist"

JOB = """\
[job]
rounds = {rounds}
clients = {clients}
clients_per_round = {per_round}
seed = {seed}
client_concurrency = {per_round}
mode = "{mode}"

[async]
concurrency = {per_round}
buffer = {per_round}
staleness = "polynomial"
staleness_exponent = 0.5
max_staleness = 10

[clients]
speed = "lognormal:{sigma}"

[round]
quorum = 1.0
round_deadline_s = 600

[strategy]
name = "fedavg"

[train]
epochs = 1
batch_size = 10
lr = 0.1
momentum = 0.0
"""


def make_app(where: Path, mode: str, seed: int, args: argparse.Namespace) -> Path:
    app = where / f"app-{mode}-{seed}"
    app.mkdir(parents=True, exist_ok=True)
    (app / "app.py").write_text((APP / "app.py").read_text())
    (app / "strato.toml").write_text(JOB.format(
        rounds=args.rounds, clients=args.clients, per_round=args.per_round, seed=seed,
        mode=mode, sigma=args.sigma))
    return app


def run_one(app: Path, out: Path, data_dir: str | None, target: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "strato", "run", str(app), "--out", str(out)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=7200,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-2000:]}")  # fmt: skip
    started = float(json.loads((out / "run.json").read_text())["started"])
    summary = json.loads((out / "summary.json").read_text())
    curve = [(round(float(r["model_ready_at"]) - started, 3), float(r["accuracy"]))
             for r in summary["per_round"]]  # fmt: skip
    reached = next((t for t, acc in curve if acc >= target), None)
    return {
        "time_to_target_s": reached,
        "time_to_target_busy_s": busy_time_to_target(summary["per_round"], started, target),
        "final_accuracy": float(summary["final_accuracy"]),
        "wall_s": float(summary["wall_s"]),
        "updates_accepted": int(summary["updates_accepted"]),
        "updates_refused_stale": int(summary.get("updates_refused_stale", 0)),
        "staleness_histogram": summary.get("staleness_histogram"),
        "curve": curve,  # (seconds since the run started, test accuracy) per model
    }


def busy_time_to_target(rows: list[dict[str, Any]], started: float,
                        target: float) -> float | None:
    """The time to target without the gaps between a round's model and the next round's
    opening (the round loop's evaluation step, on a synchronous run's critical path;
    async versions follow each other with no gap): set-up until round 1 opened, plus
    each round's own time up to the first that reaches the target."""
    if not rows:
        return None
    first_open = float(rows[0]["model_ready_at"]) - float(rows[0]["round_s"])
    busy = first_open - started
    for row in rows:
        busy += float(row["round_s"])
        if float(row["accuracy"]) >= target:
            return round(busy, 3)
    return None


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if len(got) == len(values) and got else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="MNIST (gzipped IDX); without it, the digits")
    p.add_argument("--rounds", type=int, default=30, help="rounds (sync) and versions (async)")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10,
                   help="sync: clients a round; async: clients at once and the buffer")
    p.add_argument("--sigma", type=float, default=1.0, help="the log-normal speeds' sigma")
    p.add_argument("--target", type=float, default=0.97, help="the test accuracy to reach")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if min(args.rounds, args.clients, args.per_round, args.seeds) < 1 or args.sigma < 0:
        p.error("--rounds, --clients, --per-round and --seeds must be at least 1, "
                "--sigma 0 or more")
    if args.per_round > args.clients:
        p.error("--per-round cannot exceed --clients")
    runs: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory(prefix="strato-async-") as tmp:
        for seed in range(args.seeds):
            for mode in ("sync", "async"):
                started = time.monotonic()
                app = make_app(Path(tmp), mode, seed, args)
                run = run_one(app, Path(tmp) / f"out-{mode}-{seed}", args.data_dir, args.target)
                runs[mode].append(run)
                print(f"seed {seed} {mode:<5}: to {args.target} in "
                      f"{run['time_to_target_s']} s, final accuracy "
                      f"{run['final_accuracy']:.4f} ({time.monotonic() - started:.0f} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
    result = summarise(runs, args, argv)
    print(table(result))
    if args.json:
        write_results(Path(args.json), result)
    return 0


def summarise(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace,
              argv: list[str] | None) -> dict[str, Any]:
    sync_t = _median([r["time_to_target_s"] for r in runs["sync"]])
    async_t = _median([r["time_to_target_s"] for r in runs["async"]])
    sync_acc = statistics.median(r["final_accuracy"] for r in runs["sync"])
    async_acc = statistics.median(r["final_accuracy"] for r in runs["async"])
    speedup = sync_t / async_t if sync_t and async_t else None
    sync_b = _median([r["time_to_target_busy_s"] for r in runs["sync"]])
    async_b = _median([r["time_to_target_busy_s"] for r in runs["async"]])
    return {
        "command": "python benchmarks/async_fl.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "data": "mnist" if args.data_dir or os.environ.get("STRATO_DATA_DIR") else "digits",
        "rounds": args.rounds, "clients": args.clients, "per_round": args.per_round,
        "speed": f"lognormal:{args.sigma:g}", "target": args.target, "seeds": args.seeds,
        "sync_time_to_target_s": sync_t,
        "async_time_to_target_s": async_t,
        "speedup": speedup,
        # the same without the sync loop's gaps between rounds (its evaluation step)
        "sync_time_to_target_busy_s": sync_b,
        "async_time_to_target_busy_s": async_b,
        "speedup_busy": sync_b / async_b if sync_b and async_b else None,
        "sync_final_accuracy": sync_acc,
        "async_final_accuracy": async_acc,
        "updates_refused_stale": sum(r["updates_refused_stale"] for r in runs["async"]),
        "targets": {
            "speedup": {"target": ">= 2", "value": speedup,
                        "met": speedup is not None and speedup >= 2},
            "async_final_accuracy": {
                "target": "within 1 point of sync", "value": async_acc,
                "met": async_acc >= sync_acc - 0.01},
        },
        "runs": runs,
    }


def table(result: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "missed" if v is None else format(v, spec)

    lines = ["| mode | time to target (s) | final accuracy |", "|---|---:|---:|",
             f"| sync | {fmt(result['sync_time_to_target_s'], '.1f')} | "
             f"{result['sync_final_accuracy']:.4f} |",
             f"| async | {fmt(result['async_time_to_target_s'], '.1f')} | "
             f"{result['async_final_accuracy']:.4f} |", "",
             f"speedup {fmt(result['speedup'], '.2f')} (target >= 2); "
             f"updates refused as stale: {result['updates_refused_stale']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
