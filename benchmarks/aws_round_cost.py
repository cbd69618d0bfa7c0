"""What one FL round costs on AWS, measured: an FL run on Strato's local AWS, priced.

    python benchmarks/aws_round_cost.py [--rounds 3] [--clients 3] [--out runs/aws-cost]

Runs ``examples/mnist`` (MNIST from $STRATO_DATA_DIR, else scikit-learn's digits) with
the aws backend against a local AWS (moto + Strato's front, which counts every
request and every Lambda invocation), then prints the run's billable quantities per
round and their price at AWS list prices (``strato.backends.aws.usage``). The table
in docs/aws.md comes from this script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

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


if __name__ == "__main__":
    main()
