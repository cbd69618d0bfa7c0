"""The AWS parts of the ``strato`` command (imported without boto3; it loads on use).

- ``strato deploy aws [--dry-run] [--endpoint-url URL] [--region R] [--prefix P] ...``
- ``strato run APP_DIR --backend aws [--endpoint-url URL] [--region R] [--prefix P]
  [--remote-clients N]``
- ``strato client APP_DIR --backend aws [--endpoint-url URL] [--region R] [--prefix P]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from strato.errors import StratoError

if TYPE_CHECKING:
    from strato.fl.run import RunOptions

__all__ = ["add_run_arguments", "apply_run_backend", "main_client", "main_deploy", "wants_aws"]

_DEFAULT_PREFIX = "strato-"


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url", help="an AWS-compatible endpoint (e.g. the local AWS of "
        "`python -m strato.backends.aws.local`); default: AWS itself"
    )  # fmt: skip
    parser.add_argument("--region", help="default: AWS_REGION / AWS_DEFAULT_REGION / us-east-1")
    parser.add_argument(
        "--prefix",
        default=None,
        help=f"starts every resource name of the deployment (default: {_DEFAULT_PREFIX})",
    )


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """``strato run``'s backend options."""
    run.add_argument(
        "--backend", choices=["embedded", "aws"], default="embedded",
        help="where the services run (default: embedded, on this machine)",
    )  # fmt: skip
    _where(run)
    run.add_argument(
        "--remote-clients", type=int, metavar="N",
        help="aws: clients join with `strato client --backend aws`; round 1 starts once N "
        "have registered, and each round selects among the registered clients",
    )  # fmt: skip


def apply_run_backend(opts: RunOptions, args: argparse.Namespace) -> None:
    """Point ``opts`` at the backend the arguments name."""
    backend = getattr(args, "backend", "embedded")
    aws_only = {
        "--endpoint-url": args.endpoint_url,
        "--region": args.region,
        "--prefix": args.prefix,
        "--remote-clients": args.remote_clients,
    }
    if backend != "aws":
        given = [flag for flag, value in aws_only.items() if value is not None]
        if given:
            raise StratoError(f"{', '.join(given)} only apply with --backend aws")
        return
    if args.resume:
        return  # run.json names the backend the run was started on
    from strato.backends.aws.deploy import services_config
    from strato.backends.aws.fl import wait_for_clients

    opts.services = services_config(
        args.prefix or _DEFAULT_PREFIX,
        root=opts.out / "services",
        region=args.region,
        endpoint_url=args.endpoint_url,
    )
    if args.remote_clients is not None:
        if args.remote_clients < 1:
            raise StratoError(f"--remote-clients must be at least 1, got {args.remote_clients}")
        opts.simulate = False
        opts.attach = wait_for_clients(args.remote_clients, quiet=opts.quiet)


def wants_aws(argv: list[str]) -> bool:
    """Whether a ``strato client`` command line asks for the aws backend."""
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1] == "aws"
        if arg.startswith("--backend="):
            return arg.partition("=")[2] == "aws"
    return False


def main_client(argv: list[str]) -> int:
    from strato.backends.aws.client import AwsClientOptions, run_aws_client
    from strato.backends.aws.deploy import services_config

    p = argparse.ArgumentParser(
        prog="strato client",
        description="Join a run on AWS directly (started with `strato run APP_DIR --backend "
        "aws --remote-clients N`): register, then train on each round's notice.",
    )
    p.add_argument("app_dir", help="directory holding app.py")
    p.add_argument("--backend", choices=["aws"], required=True)
    _where(p)
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
    config = services_config(
        args.prefix or _DEFAULT_PREFIX,
        root=args.root,
        region=args.region,
        endpoint_url=args.endpoint_url,
    )
    run_aws_client(
        AwsClientOptions(
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


def main_deploy(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="strato deploy",
        description="Deploy the federated learning infrastructure (one CloudFormation "
        "template): print it, apply it, or tear it down. See docs/aws.md.",
    )
    p.add_argument("target", choices=["aws"], help="where to deploy")
    p.add_argument("--dry-run", action="store_true", help="print the template and stop")
    p.add_argument("--delete", action="store_true", help="tear the deployment down")
    _where(p)
    p.add_argument("--app", help="an app directory: its strato.toml sets deadline and concurrency")
    p.add_argument("--code", help="s3://BUCKET/KEY of the functions' zip package")
    p.add_argument("--image-uri", help="or the functions' container image (ECR)")
    p.add_argument(
        "--method", choices=["auto", "cloudformation", "apis"], default="auto",
        help="auto: CloudFormation on AWS, the service APIs with --endpoint-url",
    )  # fmt: skip
    args = p.parse_args(argv)
    from strato.backends.aws.deploy import DeployOptions, deploy, destroy, template_for

    opts = DeployOptions(
        prefix=args.prefix or _DEFAULT_PREFIX,
        region=args.region,
        endpoint_url=args.endpoint_url,
        method=args.method,
        code=args.code,
        image_uri=args.image_uri,
        app_dir=Path(args.app) if args.app else None,
    )
    if args.dry_run and args.delete:
        raise StratoError("--dry-run and --delete do not go together")
    if args.dry_run:
        json.dump(template_for(opts), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.delete:
        print(json.dumps(destroy(opts), indent=2))
        return 0
    print(json.dumps(deploy(opts), indent=2))
    return 0
