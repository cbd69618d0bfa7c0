"""What one FL round costs on AWS, measured: an FL run on Strato's local AWS, priced.

    python benchmarks/aws_round_cost.py [--rounds 3] [--clients 3] [--out runs/aws-cost] \
        [--json benchmarks/results/aws/round_cost.json]

Runs ``examples/mnist`` (MNIST from $STRATO_DATA_DIR, else scikit-learn's digits) with
the aws backend against a local AWS (moto + Strato's front, which counts every
request and every Lambda invocation), then prints the run's billable quantities per
round and their price at AWS list prices (``strato.backends.aws.usage``). ``--json``
writes them (with the command) for ``benchmarks/report.py``, which renders the table
in docs/aws.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _aggregation_common import provenance
from strato.backends.aws.local import LocalAws
from strato.backends.aws.usage import PRICES
from strato.fl.config import load_job_config
from strato.fl.run import RunOptions, run_job

APP = Path(__file__).resolve().parents[1] / "examples" / "mnist"
UNITS = {
    "lambda_gb_s": "GB-s",
    "lambda_requests": "requests",
    "s3_put_requests": "PUT/LIST",
    "s3_get_requests": "GET/HEAD",
    "sns_requests": "requests",
    "sqs_requests": "requests",
    "dynamodb_write_units": "WRU",
    "dynamodb_read_units": "RRU",
    "dynamodb_stream_reads": "GetRecords",
    "sfn_transitions": "transitions",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3, help="clients (all train each round)")
    parser.add_argument("--out", type=Path, help="keep the run directory here")
    parser.add_argument("--json", type=Path, help="write the per-round figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="strato-aws-cost-"))
    out = args.out or work / "run"
    if out.exists():
        shutil.rmtree(out)
    cfg = load_job_config(APP / "strato.toml").override(
        rounds=args.rounds, clients=args.clients, clients_per_round=args.clients
    )
    cfg = cfg.override(client_concurrency=min(2, args.clients))
    try:
        with LocalAws(work / "local") as local:
            summary = run_job(
                RunOptions(
                    app_dir=APP,
                    out=out,
                    config=cfg,
                    services=local.config(out / "services", "cost-"),
                    quiet=True,
                )
            )
        usage = json.loads((out / "aws-usage.json").read_text())
    finally:
        shutil.rmtree(work / "local", ignore_errors=True)
    rounds = usage["rounds"]
    print(f"{rounds} rounds, {args.clients} clients each, final accuracy "
          f"{summary['final_accuracy']:.3f}, {summary['wall_s']:.0f} s")  # fmt: skip
    print(f"{'item':<22}{'per round':>12}  {'unit':<12}{'$ per round':>14}")
    for key, price in PRICES.items():
        per_round = usage["quantities"].get(key, 0.0) / rounds
        print(f"{key:<22}{per_round:>12.2f}  {UNITS[key]:<12}{per_round * price:>14.8f}")
    print(f"{'total':<22}{'':>12}  {'':<12}{usage['usd']['total'] / rounds:>14.8f}")
    print("requests per round:", {k: round(v / rounds, 2) for k, v in usage["requests"].items()})
    print("functions:", json.dumps(usage["functions"]))
    if args.json:
        doc = {
            "command": " ".join(["python", "benchmarks/aws_round_cost.py", *sys.argv[1:]]),
            "rounds": rounds, "clients": args.clients,
            "final_accuracy": summary["final_accuracy"], "wall_s": summary["wall_s"],
            "data": os.environ.get("STRATO_DATA_DIR") or "scikit-learn digits",
            "prices": PRICES, "units": UNITS,
            "per_round": {k: usage["quantities"].get(k, 0.0) / rounds for k in PRICES},
            "usd_per_round": {k: usage["quantities"].get(k, 0.0) / rounds * p
                              for k, p in PRICES.items()},
            "usd_total_per_round": usage["usd"]["total"] / rounds,
            "requests_per_round": {k: v / rounds for k, v in usage["requests"].items()},
            "functions": usage["functions"],
            **provenance(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
