"""The ``strato`` command. Every user mistake is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strato.errors import StratoError

if TYPE_CHECKING:
    from strato.fl.run import RunOptions

__all__ = ["main"]


def _run(args: argparse.Namespace) -> int:
    from strato.backends.aws.cli import apply_run_backend
    from strato.fl.run import run_job

    opts = _run_options(args)
    apply_run_backend(opts, args)  # --backend aws: the run's services on AWS
    run_job(opts)
    return 0


def _run_options(args: argparse.Namespace) -> RunOptions:
    """The RunOptions of `strato run` and `strato serve` (same job arguments)."""
    from strato.fl.config import load_job_config
    from strato.fl.run import RunOptions

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
    cfg = load_job_config(app_dir / "strato.toml")
    cfg = cfg.override(
        rounds=args.rounds,
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        strategy=args.strategy,
        strategy_options=_strategy_options(args, cfg.strategy, cfg.strategy_options),
        partition=args.partition,
        seed=args.seed,
    )
    from strato.fl.strategies import check_strategy

    check_strategy(cfg.strategy, cfg.strategy_options)
    out = Path(args.resume or args.out or f"runs/{app_dir.name}")
    return RunOptions(
        app_dir=app_dir, out=out, config=cfg, data_dir=args.data_dir, resume=bool(args.resume)
    )


def _strategy_options(
    args: argparse.Namespace, toml_strategy: str, toml_options: dict[str, Any]
) -> dict[str, Any] | None:
    """The strategy options after --sparsity/--eta/--bits/--zstd/--kept-rate (None: as
    strato.toml has them).

    The options of strato.toml belong to its strategy: a different --strategy starts
    from none.
    """
    changed = args.strategy is not None and (
        args.strategy.strip().lower() != toml_strategy.strip().lower()
    )
    options = {} if changed else dict(toml_options)
    for name in ("sparsity", "eta", "bits", "zstd", "kept_rate"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    return options if changed or options != toml_options else None


def _serve(args: argparse.Namespace) -> int:
    from strato.fl.run import run_job
    from strato.fl.serve import ServeOptions, gateway_attach, listen, load_tokens

    tokens = load_tokens(args.token, args.tokens_file)
    opts = _run_options(args)
    min_clients = opts.config.clients_per_round if args.min_clients is None else args.min_clients
    if min_clients < 1:
        raise StratoError(f"--min-clients must be at least 1, got {min_clients}")
    mb = args.max_upload_mb
    if mb is not None and not mb > 0:
        raise StratoError(f"--max-upload-mb must be positive, got {mb}")
    sock = listen(args.host, args.port)  # before the run is set up: a busy port fails first
    try:
        opts.simulate = False
        opts.attach = gateway_attach(
            ServeOptions(
                tokens=tokens,
                sock=sock,
                min_clients=min_clients,
                max_upload_bytes=None if mb is None else int(mb * 2**20),
                body_timeout_s=args.body_timeout,
            )
        )
        run_job(opts)
    finally:
        sock.close()
    return 0


def _client(args: argparse.Namespace) -> int:
    from strato.fl.remote import ClientOptions, run_client

    if args.rounds_max is not None and args.rounds_max < 1:
        raise StratoError(f"--rounds-max must be at least 1, got {args.rounds_max}")
    return run_client(
        ClientOptions(
            server=args.server,
            token=args.token,
            app_dir=args.app_dir,
            data_dir=args.data_dir,
            client_id=args.client_id,
            rounds_max=args.rounds_max,
            partition_index=args.partition_index,
        )
    )


def _number(text: str) -> int | float:
    """A number option: an int when integral (bits 4, not 4.0); checked by the strategy."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _job_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("app_dir", nargs="?", help="directory holding app.py (and strato.toml)")
    cmd.add_argument("--rounds", type=int)
    cmd.add_argument("--clients", type=int)
    cmd.add_argument("--clients-per-round", type=int)
    cmd.add_argument("--strategy", help="fedavg (default), fedadam, ..., cs "
                     "(Complement Sparsification), or cs-combined (CS with 4-bit "
                     "quantization, zstd and kept-weight updates: docs/sparsity.md)")
    cmd.add_argument("--sparsity", type=float,
                     help="cs: fraction of every kernel the server prunes, in [0, 1) (default 0.5)")
    cmd.add_argument("--eta", type=float,
                     help="cs: aggregation rate of the complements (default 1.5); "
                     "fedadam/fedyogi/fedadagrad/fedavgm: the server learning rate")
    cmd.add_argument("--bits", type=_number,
                     help="cs: 32 (float32, default), 8 or 4 (per-layer quantized kernels "
                     "both ways; cs-combined: 4)")
    cmd.add_argument("--zstd", type=_number,
                     help="cs: zstd level 1-22 for every payload, 0 = off (default; "
                     "cs-combined: 19); needs pip install 'strato[compress]'")
    cmd.add_argument("--kept-rate", type=_number,
                     help="cs: kept weights move by this rate times their mean change and "
                     "uploads are dense deltas (default: frozen, as in faithful CS; "
                     "cs-combined: 1)")
    cmd.add_argument("--partition", choices=["iid", "dirichlet", "shards"])
    cmd.add_argument("--seed", type=int)
    cmd.add_argument(
        "--data-dir",
        help="MNIST IDX directory (default: $STRATO_DATA_DIR, else scikit-learn's digits)",
    )
    cmd.add_argument("--out", help="run directory (default: runs/APP_NAME)")
    cmd.add_argument("--resume", metavar="OUT", help="continue the run in OUT after a stop")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="strato",
        description="Serverless federated learning and serverless distributed inference.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated learning app")
    _job_arguments(run)
    from strato.backends.aws.cli import add_run_arguments

    add_run_arguments(run)  # --backend, --endpoint-url, --region, --prefix, --remote-clients
    run.set_defaults(func=_run)
    serve = sub.add_parser(
        "serve",
        help="run a federated learning app whose clients join over HTTP (strato client)",
        description="Runs the job like `strato run`, with remote clients: an HTTP gateway "
        "serves them, round 1 starts once --min-clients have registered, and each round "
        "selects among the registered clients. --clients is the number of data partitions.",
    )
    _job_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    serve.add_argument("--token", action="append", help="a client token (repeatable)")
    serve.add_argument("--tokens-file", help="client tokens, one per line")
    serve.add_argument(
        "--min-clients", type=int, help="registrations to wait for (default: clients per round)"
    )
    serve.add_argument(
        "--max-upload-mb", type=float, help="largest update accepted (default: model + 64 KiB)"
    )
    serve.add_argument(
        "--body-timeout", type=float, default=60.0, help="seconds an upload may stall"
    )
    serve.set_defaults(func=_serve)
    client = sub.add_parser("client", help="join a `strato serve` run as a client")
    client.add_argument("app_dir", help="directory holding app.py")
    client.add_argument("--server", required=True, help="the server's URL, http://HOST:PORT")
    client.add_argument("--token", required=True, help="this client's token")
    client.add_argument(
        "--data-dir",
        help="MNIST IDX directory (default: $STRATO_DATA_DIR, else scikit-learn's digits)",
    )
    client.add_argument("--client-id", help="this client's name (default: the server picks)")
    client.add_argument("--rounds-max", type=int, help="leave after training this many rounds")
    client.add_argument(
        "--partition-index", type=int, help="train on this partition (default: the server's)"
    )
    client.add_argument(
        "--backend", choices=["aws"], help="join a run on AWS directly (strato client "
        "APP_DIR --backend aws --help): no --server, no --token"
    )  # fmt: skip
    client.set_defaults(func=_client)
    sub.add_parser("deploy", help="deploy the FL infrastructure (strato deploy aws --help)",
                   add_help=False)  # fmt: skip
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
    from strato.backends.aws import cli as aws_cli

    extra["deploy"] = aws_cli.main_deploy
    if argv[:1] == ["client"] and aws_cli.wants_aws(argv[1:]):
        return _guard(lambda: aws_cli.main_client(argv[1:]))
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
