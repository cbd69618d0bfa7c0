"""The aws backend's parts of the ``strato`` command (imported without boto3; it loads
on use). ``strato.cli`` owns the commands and imports this module for the backend's
options (importing the package also registers the backend with ``strato.services``):

- ``strato deploy aws [--dry-run] [--endpoint-url URL] [--region R] [--prefix P] ...``
  (``main_deploy``; the application's resources come from the caller);
- ``strato run APP_DIR --backend aws [--endpoint-url URL] [--region R] [--prefix P]``
  and ``strato client APP_DIR --backend aws ...``: ``add_where_arguments`` adds the
  options that say where the deployment is, ``services_config_of`` turns them into
  the Services config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from strato.errors import StratoError
from strato.services import AppResources

__all__ = [
    "DEFAULT_PREFIX",
    "add_where_arguments",
    "given_flags",
    "join_command",
    "main_deploy",
    "services_config_of",
]

DEFAULT_PREFIX = "strato-"
_FLAGS = {"--endpoint-url": "endpoint_url", "--region": "region", "--prefix": "prefix"}


def add_where_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say where a deployment is: endpoint, region, prefix."""
    parser.add_argument(
        "--endpoint-url", help="an AWS-compatible endpoint (e.g. the local AWS of "
        "`python -m strato.backends.aws.local`); default: AWS itself"
    )  # fmt: skip
    parser.add_argument("--region", help="default: AWS_REGION / AWS_DEFAULT_REGION / us-east-1")
    parser.add_argument(
        "--prefix",
        default=None,
        help=f"starts every resource name of the deployment (default: {DEFAULT_PREFIX})",
    )


def given_flags(args: argparse.Namespace) -> list[str]:
    """The options of ``add_where_arguments`` that the command line gave."""
    return [flag for flag, dest in _FLAGS.items() if getattr(args, dest, None) is not None]


def services_config_of(args: argparse.Namespace, root: str | os.PathLike[str]) -> dict[str, Any]:
    """The Services config of the deployment the options name (files under ``root``)."""
    from strato.backends.aws.deploy import services_config

    return services_config(
        args.prefix or DEFAULT_PREFIX,
        root=root,
        region=args.region,
        endpoint_url=args.endpoint_url,
    )


def join_command(config: dict[str, Any]) -> str:
    """The command line that joins a client to the run on ``config``'s deployment."""
    where = f"--prefix {config.get('prefix', DEFAULT_PREFIX)}"
    if config.get("endpoint_url"):
        where += f" --endpoint-url {config['endpoint_url']}"
    if config.get("region"):
        where += f" --region {config['region']}"
    return f"strato client APP_DIR --backend aws {where}"


def main_deploy(argv: list[str], resources_for: Callable[[Path | None], AppResources]) -> int:
    """``strato deploy aws``; ``resources_for(app_dir)``: what the application runs."""
    p = argparse.ArgumentParser(
        prog="strato deploy",
        description="Deploy the federated learning infrastructure (one CloudFormation "
        "template): print it, apply it, or tear it down. See docs/aws.md.",
    )
    p.add_argument("target", choices=["aws"], help="where to deploy")
    p.add_argument("--dry-run", action="store_true", help="print the template and stop")
    p.add_argument("--delete", action="store_true", help="tear the deployment down")
    add_where_arguments(p)
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
        prefix=args.prefix or DEFAULT_PREFIX,
        region=args.region,
        endpoint_url=args.endpoint_url,
        method=args.method,
        code=args.code,
        image_uri=args.image_uri,
    )
    if args.dry_run and args.delete:
        raise StratoError("--dry-run and --delete do not go together")
    resources = resources_for(Path(args.app) if args.app else None)
    if args.dry_run:
        json.dump(template_for(opts, resources), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.delete:
        print(json.dumps(destroy(opts, resources), indent=2))
        return 0
    print(json.dumps(deploy(opts, resources), indent=2))
    return 0
