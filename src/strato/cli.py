"""The ``strato`` command. Every user mistake is one line on stderr and exit code 2.

This is where a backend is picked: the command knows the backends (``BACKENDS``) and
imports a backend's package to parse its options or to run on it (``--backend aws``,
or a resumed run that was started on it); importing it registers the backend with
``strato.services``. The layers below never name a backend.
The process-wide settings that come from the environment are read here too
(``STRATO_KERNELS``), so that the libraries below read none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strato.errors import StratoError

if TYPE_CHECKING:
    from strato.fl.flower import FlowerApp
    from strato.fl.run import RunOptions
    from strato.services import AppResources

__all__ = ["main"]

BACKENDS = ("embedded", "aws", "ray")


def _import_backend(name: str) -> None:
    """Register the backend ``name`` with ``strato.services`` (its package does, on import)."""
    if name not in BACKENDS:
        raise StratoError(f"unknown backend {name!r} ({', '.join(BACKENDS)})")
    if name != "embedded":
        import importlib

        importlib.import_module(f"strato.backends.{name}")  # registers it


def _configure_kernels() -> None:
    """``STRATO_KERNELS=numpy`` forces the numpy fallback of the aggregation kernels."""
    if os.environ.get("STRATO_KERNELS", "").strip().lower() == "numpy":
        from strato.strategy import _kernels  # the one switch of the kernels' backend

        _kernels.set_backend("numpy")


def _run(args: argparse.Namespace) -> int:
    from strato.fl.flower import flower_app, flower_resume_refusal
    from strato.fl.run import run_job

    if args.resume:
        flower_resume_refusal(Path(args.resume))
    elif args.app_dir and not (Path(args.app_dir) / "app.py").is_file():
        flower = flower_app(args.app_dir)
        if flower is not None:
            return _run_flower(args, flower)
        from strato.fl.app import load_app

        load_app(args.app_dir)  # says why it is not an app, before the run begins
    if args.run_config is not None:
        raise StratoError("--run-config applies to Flower apps (a pyproject.toml with "
                          "[tool.flwr.app.components]); a Strato app reads strato.toml")
    opts = _run_options(args)
    _apply_backend(opts, args)
    run_job(opts)
    return 0


def _run_flower(args: argparse.Namespace, app: FlowerApp) -> int:
    """``strato run DIR`` of a Flower app: its ServerApp here, its ClientApp in functions."""
    from strato.backends.aws import cli as aws_cli
    from strato.fl.flower import FlowerRun, check_flower_flags, parse_run_config, run_flower

    given = {f"--{k.replace('_', '-')}": getattr(args, k) for k in vars(args)}
    check_flower_flags(given, aws_cli.given_flags(args))
    if args.backend == "aws":
        raise StratoError("a Flower app runs on the embedded and ray backends "
                          "(--backend aws runs Strato apps)")
    run_config = parse_run_config(args.run_config, app.config)
    if args.rounds is not None:
        if "num-server-rounds" not in run_config:
            raise StratoError("--rounds sets the app's num-server-rounds, which its config "
                              "does not have: use --run-config")
        run_config["num-server-rounds"] = args.rounds
    services = None
    if args.backend == "ray":
        _import_backend("ray")
        services = {"backend": "ray", "address": args.address}
    run_flower(FlowerRun(
        app, Path(args.out or f"runs/{app.directory.name}"), run_config,
        nodes=args.clients or app.nodes or 10,
        data_dir=args.data_dir or os.environ.get("STRATO_DATA_DIR") or None,
        services=services))
    return 0


def _apply_backend(opts: RunOptions, args: argparse.Namespace) -> None:
    """Point ``opts`` at the backend the arguments name (``strato run --backend``)."""
    from strato.backends.aws import cli as aws_cli

    given = aws_cli.given_flags(args)
    if args.remote_clients is not None:
        given.append("--remote-clients")
    address = getattr(args, "address", None)
    if address is not None and args.backend != "ray":
        raise StratoError("--address only applies with --backend ray")
    if args.backend == "ray":
        if given:
            raise StratoError(f"{', '.join(given)} only apply with --backend aws")
        if not args.resume:
            _import_backend("ray")
            opts.services = {"backend": "ray", "address": address}
        return
    if args.backend != "aws":
        if given:
            raise StratoError(f"{', '.join(given)} only apply with --backend aws")
        return
    if args.resume:
        return  # run.json names the backend the run was started on
    opts.services = aws_cli.services_config_of(args, opts.out / "services")
    if args.remote_clients is not None:
        if args.remote_clients < 1:
            raise StratoError(f"--remote-clients must be at least 1, got {args.remote_clients}")
        from strato.fl.direct import wait_for_clients

        opts.simulate = False
        opts.attach = wait_for_clients(
            args.remote_clients, quiet=opts.quiet, how=aws_cli.join_command(opts.services)
        )


def _run_options(args: argparse.Namespace) -> RunOptions:
    """The RunOptions of `strato run` and `strato serve` (same job arguments)."""
    from strato.data import dataset_name
    from strato.fl.config import dataset_settings, load_job_config
    from strato.fl.run import RunOptions

    app_dir = Path(args.app_dir) if args.app_dir else None
    if args.resume:
        out = Path(args.resume)
        run_file = out / "run.json"
        recorded = json.loads(run_file.read_text())
        app_dir = app_dir or Path(recorded["app_dir"])
        _import_backend((recorded.get("services") or {}).get("backend", "embedded"))
    if app_dir is None:
        raise StratoError("give an APP_DIR (or --resume OUT)")
    # The job's shape may depend on the data it will have ([dataset.NAME] in strato.toml).
    dataset = dataset_name(args.data_dir)
    cfg = load_job_config(app_dir / "strato.toml", dataset)
    shaped = dataset_settings(app_dir / "strato.toml", dataset)
    cfg = cfg.override(
        rounds=args.rounds,
        clients=args.clients,
        clients_per_round=args.clients_per_round,
        keep_rounds=args.keep_rounds,
        max_update_norm=args.max_update_norm,
        mode=args.mode,
        strategy=args.strategy,
        strategy_options=_strategy_options(args, cfg.strategy, cfg.strategy_options),
        partition=args.partition,
        seed=args.seed,
    )
    from strato.fl.strategies import check_strategy

    check_strategy(cfg.strategy, cfg.strategy_options, cfg.max_update_norm, cfg.mode)
    out = Path(args.resume or args.out or f"runs/{app_dir.resolve().name}")
    note = None
    if shaped and not args.resume:
        settings = ", ".join(f"{k} {v}" for k, v in shaped.items() if k != "train")
        settings += "".join(f", {k} {v}" for k, v in dict(shaped.get("train", {})).items())
        note = (f"job shaped for the {dataset} by [dataset.{dataset}] in "
                f"{app_dir / 'strato.toml'}: {settings.lstrip(', ')}")
    return RunOptions(
        app_dir=app_dir, out=out, config=cfg, data_dir=args.data_dir, resume=bool(args.resume),
        shape_note=note,
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
    from strato.fl.serve import (
        ServeOptions,
        gateway_attach,
        limit_malloc_arenas,
        listen,
        load_tokens,
    )

    limit_malloc_arenas()  # the gateway's threads: bounded memory on a long-lived server
    if args.app_dir and not args.resume and not (Path(args.app_dir) / "app.py").is_file():
        from strato.fl.flower import flower_app

        if flower_app(args.app_dir) is not None:
            raise StratoError(f"{args.app_dir} is a Flower app: `strato run` runs it "
                              "(strato serve's remote clients run Strato apps)")

    clients_file = Path(args.clients_file) if args.clients_file else None
    if clients_file is not None and (args.token or args.tokens_file):
        raise StratoError(
            "give either --clients-file (a credential per client) or a shared --token, not both"
        )
    tokens = load_tokens(args.token, args.tokens_file, required=clients_file is None)
    if clients_file is not None:
        from strato.fl.credentials import ClientsFile

        ClientsFile(clients_file)  # a missing or broken file fails before the run starts
    if (args.tls_cert is None) != (args.tls_key is None):
        raise StratoError("HTTPS needs both --tls-cert and --tls-key")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    opts = _run_options(args)
    min_clients = opts.config.clients_per_round if args.min_clients is None else args.min_clients
    if min_clients < 1:
        raise StratoError(f"--min-clients must be at least 1, got {min_clients}")
    mb = args.max_upload_mb
    if mb is not None and not mb > 0:
        raise StratoError(f"--max-upload-mb must be positive, got {mb}")
    sock = listen(args.host, args.port)  # before the run is set up: a busy port fails first
    try:
        # The run's files (its tables hold the clients' credential hashes) are its owner's.
        opts.out.mkdir(parents=True, exist_ok=True)
        opts.out.chmod(0o700)
        opts.simulate = False
        opts.attach = gateway_attach(
            ServeOptions(
                tokens=tokens,
                sock=sock,
                clients_file=clients_file,
                tls=tls,
                min_clients=min_clients,
                max_upload_bytes=None if mb is None else int(mb * 2**20),
                body_timeout_s=args.body_timeout,
            )
        )
        run_job(opts)
    finally:
        sock.close()
    return 0


def _wants_backend(argv: list[str]) -> str | None:
    """The ``--backend`` a ``strato client`` command line asks for (None: HTTP)."""
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--backend="):
            return arg.partition("=")[2]
    return None


def _client_direct(argv: list[str]) -> int:
    """``strato client APP_DIR --backend aws``: join a run through its services."""
    from strato.backends.aws import cli as aws_cli

    p = argparse.ArgumentParser(
        prog="strato client",
        description="Join a run on AWS directly (started with `strato run APP_DIR --backend "
        "aws --remote-clients N`): register, then train on each round's notice.",
    )
    p.add_argument("app_dir", help="directory holding app.py")
    p.add_argument("--backend", choices=["aws"], required=True)
    aws_cli.add_where_arguments(p)
    p.add_argument("--client-id", help="this client's name (default: a random one)")
    p.add_argument(
        "--data-dir", help="MNIST IDX directory (default: $STRATO_DATA_DIR, else digits)"
    )
    p.add_argument("--rounds-max", type=int, help="leave after training this many rounds")
    p.add_argument("--partition-index", type=int, help="train on this partition")
    p.add_argument("--wait-s", type=float, default=10.0, help="seconds of one long poll")
    p.add_argument("--root", default=".strato/client", help="local scratch directory")
    args = p.parse_args(argv)
    if args.rounds_max is not None and args.rounds_max < 1:
        raise StratoError(f"--rounds-max must be at least 1, got {args.rounds_max}")
    config = aws_cli.services_config_of(args, args.root)
    from strato.fl.direct import DirectClientOptions, run_direct_client

    run_direct_client(
        DirectClientOptions(
            app_dir=args.app_dir,
            services=config,
            client_id=args.client_id,
            data_dir=args.data_dir,
            rounds_max=args.rounds_max,
            partition_index=args.partition_index,
            wait_s=args.wait_s,
        )
    )
    return 0


def _fl_resources(app_dir: Path | None) -> AppResources:
    """What an FL deployment holds; an app's strato.toml sets deadline and concurrency."""
    from strato.fl.config import JobConfig, load_job_config
    from strato.fl.run import app_resources

    cfg = load_job_config(app_dir / "strato.toml") if app_dir else JobConfig()
    return app_resources(cfg)


def _deploy(argv: list[str]) -> int:
    from strato.backends.aws import cli as aws_cli

    return aws_cli.main_deploy(argv, _fl_resources)


def _client(args: argparse.Namespace) -> int:
    from strato.fl.remote import ClientOptions, run_client

    if args.rounds_max is not None and args.rounds_max < 1:
        raise StratoError(f"--rounds-max must be at least 1, got {args.rounds_max}")
    return run_client(
        ClientOptions(
            server=args.server,
            token=_client_token(args),
            ca_file=args.ca_file,
            threads=args.threads,
            app_dir=args.app_dir,
            data_dir=args.data_dir,
            client_id=args.client_id,
            rounds_max=args.rounds_max,
            partition_index=args.partition_index,
        )
    )


def _client_token(args: argparse.Namespace) -> str:
    """The client's token: --token-file, $STRATO_TOKEN or --token (which `ps` shows)."""
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise StratoError(f"cannot read {args.token_file}: {exc.strerror}") from None
    else:
        token = args.token or os.environ.get("STRATO_TOKEN", "").strip()
    if not token:
        raise StratoError(
            "give this client's token: --token-file FILE, $STRATO_TOKEN or --token T"
        )
    return token


def _token(args: argparse.Namespace) -> int:
    from strato.fl import credentials

    path = Path(args.clients_file)
    if args.action != "list" and not args.name:
        raise StratoError(f"strato token {args.action} needs the client's NAME")
    if args.action == "issue":
        token = credentials.issue_token(path, args.name)
        print(token)
        print(f"issued a credential for client {args.name!r} in {path} (only its hash is "
              "kept; this is the one time the token is shown)", file=sys.stderr)
    elif args.action == "revoke":
        credentials.revoke_token(path, args.name)
        print(f"revoked client {args.name!r}: a server using {path} refuses it at its next "
              "request", file=sys.stderr)
    else:
        for name in credentials.ClientsFile(path).names():
            print(name)
    return 0


def _new(args: argparse.Namespace) -> int:
    from strato.fl.scaffold import COMMANDS, new_app

    where = new_app(args.name, Path(args.dir), flower=args.flower)
    files = ("pyproject.toml, the Flower app's package" if args.flower
             else "app.py, strato.toml")
    print(f"wrote {where}: {files}, test_app.py, requirements.txt, README.md")
    print(f"run it (and its tests) from {where} with:")
    print("\n".join(COMMANDS))
    return 0


def _number(text: str) -> int | float:
    """A number option: an int when integral (bits 4, not 4.0); checked by the strategy."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _job_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("app_dir", nargs="?", help="the app: a directory holding app.py (and "
                     "strato.toml), or a Flower app (pyproject.toml, for strato run)")
    cmd.add_argument("--rounds", type=int)
    cmd.add_argument("--clients", type=int)
    cmd.add_argument("--clients-per-round", type=int)
    cmd.add_argument(
        "--mode", choices=("sync", "async"),
        help="sync: rounds with a barrier (default); async: buffered aggregation without "
        "one, [async] in strato.toml sets its concurrency, buffer and staleness (docs/async.md)",
    )  # fmt: skip
    cmd.add_argument(
        "--keep-rounds", type=int, metavar="K",
        help="keep only the last K rounds' updates (blobs, records, stream) and models; "
        "older rounds live on in their metrics (default: keep all)",
    )  # fmt: skip
    cmd.add_argument(
        "--max-update-norm", type=float, metavar="K",
        help="a norm bound against poisoned updates: an update farther from the round's "
        "model than K times the round's median distance is scaled back to it (fedavg "
        "and the strategies built on it; default: none)",
    )  # fmt: skip
    cmd.add_argument("--strategy", help="fedavg (default), fedadam, ..., cs "
                     "(Complement Sparsification), or cs-combined (CS with 4-bit "
                     "quantization, zstd and kept-weight updates: docs/sparsity.md)")
    cmd.add_argument("--sparsity", type=float,
                     help="cs: fraction of every kernel the server prunes, in [0, 1) (default 0.5)")
    cmd.add_argument("--eta", type=float,
                     help="cs: aggregation rate of the complements (default 4); "
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
                     "cs-combined: 0.5)")
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
    run.add_argument(
        "--backend", choices=BACKENDS, default="embedded",
        help="where the services run (default: embedded, on this machine)",
    )  # fmt: skip
    from strato.backends.aws import cli as aws_cli

    aws_cli.add_where_arguments(run)  # --endpoint-url, --region, --prefix
    run.add_argument(
        "--address", metavar="ADDR",
        help="ray: the cluster to join (HOST:PORT of its head, or 'auto'); default: start "
        "a local Ray on this machine",
    )  # fmt: skip
    run.add_argument(
        "--run-config", metavar="'KEY=VALUE ...'",
        help="a Flower app: values over its [tool.flwr.app.config], as `flwr run` takes them",
    )  # fmt: skip
    run.add_argument(
        "--remote-clients", type=int, metavar="N",
        help="aws: clients join with `strato client --backend aws`; round 1 starts once N "
        "have registered, and each round selects among the registered clients",
    )  # fmt: skip
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
    serve.add_argument(
        "--clients-file", help="the clients' credentials (strato token issue NAME "
        "--clients-file FILE): each client joins as itself"
    )  # fmt: skip
    serve.add_argument(
        "--token", action="append", help="a shared enrolment token (repeatable): each "
        "client that registers with it gets a credential of its own"
    )  # fmt: skip
    serve.add_argument("--tokens-file", help="shared enrolment tokens, one per line")
    serve.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--tls-key", help="the certificate's private key (PEM)")
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
    client.add_argument(
        "--token-file", help="a file holding this client's token (or set $STRATO_TOKEN)"
    )
    client.add_argument("--token", help="this client's token (visible to `ps`: prefer a file)")
    client.add_argument("--ca-file", help="the CA certificate that signed an https server's")
    client.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for training (default 1, as a simulated client has)",
    )  # fmt: skip
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
    token = sub.add_parser(
        "token", help="issue, revoke or list clients' credentials for strato serve",
        description="A credential per client, kept in a clients file as a salted hash; "
        "`issue` prints the token once (give it to the client: strato client --token-file).",
    )  # fmt: skip
    token.add_argument("action", choices=["issue", "revoke", "list"])
    token.add_argument("name", nargs="?", help="the client's name (issue, revoke)")
    token.add_argument("--clients-file", required=True, help="the clients file")
    token.set_defaults(func=_token)
    new = sub.add_parser("new", help="write a new app directory to start from")
    new.add_argument("name", help="the app's name (and its directory's)")
    new.add_argument("--dir", default=".", help="where to write it (default: here)")
    new.add_argument("--flower", action="store_true",
                     help="a Flower app (Message API) that `strato run` and `flwr run` accept")
    new.set_defaults(func=_new)
    return p


COMMAND_FILE = "command.json"  # in OUT: the command that started it, before anything else


def _record_command(args: argparse.Namespace, argv: list[str]) -> Callable[[], None]:
    """`strato run`/`serve`: note the command in OUT before anything else happens, so a
    run stopped in its first moments (before run.json) can be started again from OUT
    by ``--resume``. Returns what takes the note back (and OUT, if this made it) when
    the command is refused before its run begins: a mistake leaves nothing behind.
    Best effort: a directory that cannot be written fails later, with its own message."""
    if args.resume or not args.app_dir:
        return lambda: None
    out = Path(args.out or f"runs/{Path(args.app_dir).resolve().name}")
    if (out / "run.json").exists():
        return lambda: None  # run_job refuses it, with the way to resume
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{COMMAND_FILE}.tmp"
        tmp.write_text(json.dumps({"argv": argv, "cwd": os.getcwd()}))
        os.replace(tmp, out / COMMAND_FILE)
    except OSError:
        pass

    def take_back() -> None:
        if (out / "run.json").exists():
            return  # the run began: the note is part of it
        with contextlib.suppress(OSError):
            (out / COMMAND_FILE).unlink()
        for directory in made:  # deepest first; only what this made, and only if empty
            with contextlib.suppress(OSError):
                directory.rmdir()

    return take_back


def _recorded_command(out: Path) -> argparse.Namespace:
    """The arguments of the command that started OUT, for a run stopped before it wrote
    run.json: nothing of it is durable yet, so it starts again as first asked."""
    try:
        recorded = json.loads((out / COMMAND_FILE).read_text())
        args = _parser().parse_args(recorded["argv"])
    except (OSError, ValueError, KeyError, SystemExit):
        raise StratoError(
            f"{out} holds no run to resume: nothing of it was started (stopped in its "
            "first moment?); start it again with the command that first started it"
        ) from None
    cwd = Path(recorded.get("cwd", "."))
    for name in ("app_dir", "data_dir", "out"):  # as they were meant where it started
        value = getattr(args, name, None)
        if value and not Path(value).is_absolute():
            setattr(args, name, str(cwd / value))
    args.out = str(out)
    return args


def _as_started(args: argparse.Namespace) -> argparse.Namespace:
    """``--resume OUT`` of a run stopped before it wrote run.json: the command that
    started it, to start again (nothing of it is durable yet, nothing is lost)."""
    if not args.resume or (Path(args.resume) / "run.json").exists():
        return args
    started = _recorded_command(Path(args.resume))
    print(f"resuming {args.resume}: it was stopped before it began; starting it again",
          flush=True)  # fmt: skip
    return started


def _start(args: argparse.Namespace) -> int:
    args = _as_started(args)
    return int(args.func(args))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["run"], ["serve"]):
        args = _parser().parse_args(argv)
        take_back = _record_command(args, argv)  # first: before the slow imports
        _configure_kernels()
        code = _guard(lambda: _start(args))
        if code == 2:  # refused (a bad setting): before the run began, nothing stays
            take_back()
        return code
    _configure_kernels()
    extra: dict[str, Callable[[list[str]], int]] = {"deploy": _deploy}
    try:
        from strato.inference.cli import main_infer

        extra["infer"] = lambda rest: main_infer(rest, import_backend=_import_backend)
    except ImportError:
        pass
    if argv[:1] == ["client"] and _wants_backend(argv[1:]) is not None:
        return _guard(lambda: _client_direct(argv[1:]))
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
