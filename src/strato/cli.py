"""The ``strato`` command. Every user mistake is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from strato.errors import StratoError

__all__ = ["main"]


def _run(args: argparse.Namespace) -> int:
    from strato.fl.config import load_job_config
    from strato.fl.run import RunOptions, run_job

    app_dir = Path(args.app_dir) if args.app_dir else None
    if args.resume:
        out = Path(args.resume)
        import json

        run_file = out / "run.json"
        if not run_file.exists():
            raise StratoError(f"{out} holds no run to resume (no run.json)")
        app_dir = app_dir or Path(json.loads(run_file.read_text())["app_dir"])
    if app_dir is None:
        raise StratoError("give an APP_DIR (or --resume OUT)")
    cfg = load_job_config(app_dir / "strato.toml").override(
        rounds=args.rounds,
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        strategy=args.strategy,
        partition=args.partition,
        seed=args.seed,
    )
    if args.strategy is not None:
        from strato.fl.strategies import check_strategy

        check_strategy(cfg.strategy, cfg.strategy_options)
    out = Path(args.resume or args.out or f"runs/{app_dir.name}")
    opts = RunOptions(
        app_dir=app_dir, out=out, config=cfg, data_dir=args.data_dir, resume=bool(args.resume)
    )
    run_job(opts)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="strato",
        description="Serverless federated learning and serverless distributed inference.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated learning app")
    run.add_argument("app_dir", nargs="?", help="directory holding app.py (and strato.toml)")
    run.add_argument("--rounds", type=int)
    run.add_argument("--clients", type=int)
    run.add_argument("--clients-per-round", type=int)
    run.add_argument("--strategy")
    run.add_argument("--partition", choices=["iid", "dirichlet", "shards"])
    run.add_argument("--seed", type=int)
    run.add_argument(
        "--data-dir",
        help="MNIST IDX directory (default: $STRATO_DATA_DIR, else scikit-learn's digits)",
    )
    run.add_argument("--out", help="run directory (default: runs/APP_NAME)")
    run.add_argument("--resume", metavar="OUT", help="continue the run in OUT after a stop")
    run.set_defaults(func=_run)
    sub.add_parser("infer", help="serverless distributed inference of a sparse DNN", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: dict[str, Callable[[list[str]], int]] = {}
    try:
        from strato.inference.cli import main_infer

        extra["infer"] = main_infer
    except ImportError:
        pass
    if argv and argv[0] in extra:
        return _guard(lambda: extra[argv[0]](argv[1:]))
    parser = _parser()
    args = parser.parse_args(argv)
    return _guard(lambda: int(args.func(args)))


def _guard(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except StratoError as exc:
        print(f"strato: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "strato: interrupted; every worker and shared-memory segment was released",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
