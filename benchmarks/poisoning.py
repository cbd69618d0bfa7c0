#!/usr/bin/env python
"""Poisoned updates: 20 % of the clients send their update sign-flipped and ×10.

    python benchmarks/poisoning.py --data-dir ../shared/data/mnist \
        --json benchmarks/results/poisoning/poisoning.json

Runs ``strato run`` as a user would on the README's job (the MNIST example: 100
clients, 10 a round, 20 rounds, IID, its model and ``[train]`` settings; on the digits
its ``[dataset.digits]`` shape of 10 clients), once clean and then with every fifth
client attacking (20 % of the clients; a round's draw of 10 holds 2 on average),
under each defence:

- ``fedavg``: no defence (the weighted mean takes the attackers in);
- ``fedmedian``: the coordinate-wise median;
- ``trimmedmean``: the fraction ``beta`` trimmed from each end, chosen on a validation
  split (``--tune-beta``, below); ``0.2``, the attackers' share, when not tuned;
- ``krum``: multi-Krum with ``f = 2`` (the attackers a round holds on average),
  keeping ``m = 6``;
- ``fedavg+bound``: FedAvg with ``[aggregation] max_update_norm = 1``: an update farther
  from the round's model than the round's median distance is scaled back to it (the
  median as the clipping norm, as adaptive clipping does; Andrew et al., 2021).

The other options are fixed before any run (the attackers' share is what the defences
are told). The trimmed mean's ``beta`` is chosen on a **validation split**, never on the
test set: with ``--data-dir``, about 10,000 of MNIST's 60,000 training images (1/6 of each
class, a fixed draw) are held out and written, with the other 50,000, as an MNIST
directory of their own; each candidate ``beta`` runs the attacked job on it
(``--seeds`` seeds) and is scored by its final accuracy on the held-out images; the
best (the smaller on a tie) then runs on the real data and is scored on the test set
once, beside the other configurations. Without ``--data-dir`` (the digits) ``beta``
stays 0.2. An attacker trains honestly, then sends
``g − 10·(x − g)`` for its trained model ``x`` and the round's model ``g`` (the app
does it, from ``[train] attackers``). Each configuration runs with ``--seeds`` seeds;
the keys are the mean final test accuracy per configuration, its drop against the
clean run (``drop_points``), and ``within_3_points`` per defence. Rounds close at a
30 s deadline: a machine too slow for that closes honest rounds early and changes
the figures, which the JSON says (``clean_rounds_closed_by_deadline``) and the script
warns of: run it alone on the machine. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _aggregation_common import write_results

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "mnist"
ATTACKERS = tuple(f"{i:04d}" for i in range(0, 100, 5))  # every fifth client: 20 %
SCALE = 10.0

# name -> (strategy, options as strato.toml lines, attacked)
CONFIGS: dict[str, tuple[str, str, bool]] = {
    "clean": ("fedavg", "", False),
    "fedavg": ("fedavg", "", True),
    "fedmedian": ("fedmedian", "", True),
    "trimmedmean": ("trimmedmean", "", True),  # beta: tuned, see make_app
    "krum": ("krum", "f = 2\nm = 6\n", True),
    "fedavg+bound": ("fedavg", "", True),
}
BOUND = 1.0
BETA_UNTUNED = 0.2
VALIDATION_PER_CLASS = 1 / 6  # of each class's training images: 10,001 of MNIST's 60,000

ATTACK = f'''

# --- the poisoning benchmark's attackers (benchmarks/poisoning.py) ---
_honest_train = train


@app.train
def _train_or_attack(net, data, ctx):
    attackers = str(ctx.config.get("attackers", "")).split(",")
    start = [p.detach().clone() for p in net.parameters()]
    metrics = _honest_train(net, data, ctx)
    if ctx.client in attackers:  # sign-flipped, scaled: g - {SCALE}·(x - g)
        with torch.no_grad():
            for p, g in zip(net.parameters(), start):
                p.copy_(g - {SCALE} * (p - g))
    return metrics
'''


def make_app(where: Path, name: str, seed: int, beta: float = BETA_UNTUNED) -> Path:
    strategy, options, attacked = CONFIGS[name]
    if strategy == "trimmedmean":
        options = f"beta = {beta}\n"
    app = where / f"app-{name}-{beta:g}-{seed}"
    app.mkdir(parents=True, exist_ok=True)
    example = (APP / "app.py").read_text()
    (app / "app.py").write_text(example + (ATTACK if attacked else ""))
    toml = (APP / "strato.toml").read_text()
    toml = toml.replace('[strategy]\nname = "fedavg"\n',
                        f'[aggregation]\nmax_update_norm = {BOUND if "bound" in name else 0.0}'
                        f'\n\n[strategy]\nname = "{strategy}"\n{options}')  # fmt: skip
    toml = toml.replace("seed = 0\n", f"seed = {seed}\n", 1)
    # A poisoned model makes its clients' updates NaN, refused: such a round closes at
    # its deadline. 30 s is ten times an honest round here (the README's 120 s would
    # make the collapsed runs take 40 minutes, with no other effect).
    toml = toml.replace("round_deadline_s = 120", "round_deadline_s = 30", 1)
    if attacked:
        toml = toml.replace("[train]\n", f"[train]\nattackers = \"{','.join(ATTACKERS)}\"\n")
    if ("max_update_norm" not in toml or f"seed = {seed}" not in toml
            or "round_deadline_s = 30" not in toml):
        raise SystemExit(f"{APP / 'strato.toml'} changed: this benchmark cannot shape it")
    (app / "strato.toml").write_text(toml)
    return app


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST IDX file (unsigned bytes), gzipped: magic, big-endian dims, data."""
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(head + np.ascontiguousarray(array, np.uint8).tobytes(), 1))


def validation_dir(data_dir: str, where: Path) -> Path:
    """An MNIST directory whose "test" files hold images carved out of the training set
    (1/6 of each class, fixed draw) and whose "train" files hold the rest: a run on it
    never sees the real test set."""
    sys.path.insert(0, str(ROOT / "src"))
    from strato.data.mnist import MNIST_FILES, read_mnist

    images, labels, _, _ = read_mnist(data_dir)
    rng = np.random.default_rng(20261204)
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held[members[: round(len(members) * VALIDATION_PER_CLASS)]] = True
    out = where / "validation-mnist"
    out.mkdir(parents=True, exist_ok=True)
    for key, array in (("train_images", images[~held]), ("train_labels", labels[~held]),
                       ("test_images", images[held]), ("test_labels", labels[held])):
        _write_idx(out / f"{MNIST_FILES[key]}.gz", array)
    return out


def tune_beta(candidates: list[float], tmp: Path, data_dir: str, seeds: int,
              rounds: int | None) -> dict[str, Any]:
    """Each candidate beta on the validation split; the best mean final accuracy wins
    (the smaller beta on a tie)."""
    val = validation_dir(data_dir, tmp)
    scores: dict[str, list[float]] = {}
    for beta in candidates:
        for seed in range(seeds):
            app = make_app(tmp, "trimmedmean", seed, beta)
            run = run_one(app, tmp / f"val-{beta:g}-{seed}", str(val), rounds)
            scores.setdefault(f"{beta:g}", []).append(run["final_accuracy"])
            print(f"validation: trimmedmean beta {beta:g} seed {seed} "
                  f"final accuracy {run['final_accuracy']:.4f} ({run['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    means = {b: statistics.fmean(v) for b, v in scores.items()}
    chosen = max(candidates, key=lambda b: (round(means[f"{b:g}"], 6), -b))
    return {
        "split": "validation split: 10,001 of MNIST's training images (1/6 of each class, "
                 "fixed draw), never trained on in these runs; the test set unused",
        "validation_final_accuracy": {b: round(m, 4) for b, m in means.items()},
        "validation_final_accuracy_per_seed": scores,
        "chosen_beta": chosen,
    }


def run_one(app: Path, out: Path, data_dir: str | None, rounds: int | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "strato", "run", str(app), "--out", str(out)]
    if rounds:
        cmd += ["--rounds", str(rounds)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=7200,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-2000:]}")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    clipped = 0
    if (out / "services").is_dir():
        sys.path.insert(0, str(ROOT / "src"))
        from strato.fl import state
        from strato.services import embedded

        with embedded(out / "services") as svc:
            for item in svc.table.query(state.ROUNDS):
                clipped += len(item.value.get("norm_bound", {}).get("clipped", {}))
    return {
        "final_accuracy": float(summary["final_accuracy"]),
        "accuracy_per_round": [float(r["accuracy"]) for r in summary["per_round"]],
        "wall_s": round(time.monotonic() - started, 1),
        "updates_clipped": clipped,
        # rounds that closed at the 30 s deadline: expected once a poisoned model makes
        # every update NaN; in the clean run, a sign the machine was too slow
        "deadline_closes": sum(r.get("closed_by") == "deadline" for r in summary["per_round"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="MNIST (gzipped IDX); without it, the digits")
    p.add_argument("--rounds", type=int, help="fewer rounds than the job's 20 (a quick look)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma-separated: " + ", ".join(CONFIGS))  # fmt: skip
    p.add_argument("--tune-beta", default="0.2,0.3,0.4", metavar="B1,B2,...",
                   help="trimmed mean betas tried on the validation split (with --data-dir); "
                        "'' keeps 0.2")  # fmt: skip
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    try:
        betas = [float(b) for b in args.tune_beta.split(",") if b.strip()]
    except ValueError:
        p.error(f"--tune-beta takes numbers separated by commas, got {args.tune_beta!r}")
    if any(not 0.0 <= b < 0.5 for b in betas):
        p.error("--tune-beta: each beta must be at least 0 and below 0.5")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or (args.rounds is not None and args.rounds < 1) or args.seeds < 1:
        p.error(f"unknown config(s): {', '.join(unknown)}" if unknown
                else "--rounds and --seeds must be at least 1")  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    tuning: dict[str, Any] = {"chosen_beta": BETA_UNTUNED, "split": "none: not tuned"}
    data_dir = args.data_dir or os.environ.get("STRATO_DATA_DIR")
    with tempfile.TemporaryDirectory(prefix="strato-poisoning-") as tmp:
        if "trimmedmean" in names and betas and data_dir:
            tuning = tune_beta(betas, Path(tmp), data_dir, args.seeds, args.rounds)
        for seed in range(args.seeds):
            for name in names:
                app = make_app(Path(tmp), name, seed, tuning["chosen_beta"])
                out = Path(tmp) / f"out-{name}-{seed}"
                run = run_one(app, out, args.data_dir, args.rounds)
                runs[name].append(run)
                print(f"seed {seed} {name:<13} final accuracy {run['final_accuracy']:.4f} "
                      f"({run['wall_s']:.0f} s, {run['updates_clipped']} clipped)",
                      file=sys.stderr, flush=True)  # fmt: skip
    result = summarise(runs, args, argv)
    if "trimmedmean" in names:
        result["trimmedmean_beta"] = tuning
    print(table(result))
    if args.json:
        write_results(Path(args.json), result)
    return 0


def summarise(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace,
              argv: list[str] | None) -> dict[str, Any]:
    acc = {n: statistics.fmean(r["final_accuracy"] for r in rs) for n, rs in runs.items()}
    clean = acc.get("clean")
    per: dict[str, Any] = {}
    for name, rs in runs.items():
        row: dict[str, Any] = {
            "final_accuracy": round(acc[name], 4),
            "final_accuracy_per_seed": [r["final_accuracy"] for r in rs],
            "updates_clipped": sum(r["updates_clipped"] for r in rs),
            "deadline_closes": sum(r.get("deadline_closes", 0) for r in rs),
            "wall_s": round(statistics.fmean(r["wall_s"] for r in rs), 1),
            "runs": rs,
        }
        if clean is not None and name != "clean":
            row["drop_points"] = round(100 * (clean - acc[name]), 2)
            row["within_3_points"] = row["drop_points"] <= 3.0
        per[name] = row
    slow = per.get("clean", {}).get("deadline_closes", 0)
    if slow:
        print(f"warning: the clean run closed {slow} round(s) at the deadline: the machine "
              "was too slow for this benchmark's 30 s rounds; run it on a quiet machine",
              file=sys.stderr)  # fmt: skip
    return {
        "clean_rounds_closed_by_deadline": slow,
        "command": "python benchmarks/poisoning.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "data": "mnist" if args.data_dir or os.environ.get("STRATO_DATA_DIR") else "digits",
        "rounds": args.rounds or 20,
        "seeds": args.seeds,
        "attackers": "every fifth client (20 %)",
        "attack": f"sign-flipped, x{SCALE:g}: g - {SCALE:g}(x - g)",
        "max_update_norm": BOUND,
        "per_config": per,
    }


def table(result: dict[str, Any]) -> str:
    lines = ["| configuration | final accuracy | drop (points) | within 3 points | clipped |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, row in result["per_config"].items():
        drop = row.get("drop_points", "")
        within = {True: "yes", False: "**no**"}.get(row.get("within_3_points"), "")
        lines.append(f"| {name} | {row['final_accuracy']:.4f} | {drop} | {within} | "
                     f"{row['updates_clipped']} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
