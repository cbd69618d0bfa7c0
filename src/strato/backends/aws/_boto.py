"""boto3, its configuration, and the clients every AWS primitive shares.

boto3 ships no type information, so it is imported through ``importlib`` here and its
clients are ``Any``: mypy stays strict and clean whether or not boto3 stubs are
installed, and the typed surface is the primitives' own methods. A missing boto3 is
a ``ConfigError`` that says which extra to install, not an ``ImportError`` traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from strato.errors import ConfigError

__all__ = ["AwsConfig", "ClientError", "Clients", "clients_for", "error_code"]

try:
    _boto3: Any = importlib.import_module("boto3")
    _botocore_config: Any = importlib.import_module("botocore.config")
    _botocore_exceptions: Any = importlib.import_module("botocore.exceptions")
except ImportError:  # pragma: no cover - depends on the installed extras
    raise ConfigError(
        "the AWS backend needs boto3: install it with pip install 'strato[aws]'"
    ) from None

ClientError: type[Exception] = _botocore_exceptions.ClientError

MIB = 1024 * 1024


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` ('' for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def error_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return str(exc)
    return str(response.get("Error", {}).get("Message", "")) or str(exc)


def http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return 0
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _optional_str(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"aws backend: {key!r} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class AwsConfig:
    """The AWS part of a Services config (plain JSON, so it travels to Lambda too).

    ``prefix`` starts the name of every resource this backend creates, so several runs
    (or test cases) share one account or emulator without seeing each other.
    """

    region: str
    prefix: str
    endpoint_url: str | None = None
    bucket: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    lambda_role_arn: str | None = None
    states_role_arn: str | None = None
    lambda_code: dict[str, str] | None = None
    lambda_runtime: str = "python3.12"
    lambda_layers: tuple[str, ...] = ()
    multipart_threshold: int = 16 * MIB
    part_size: int = 8 * MIB
    services: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_services(cls, config: Mapping[str, Any]) -> AwsConfig:
        region = (
            _optional_str(config, "region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        prefix = config.get("prefix", "strato-")
        if not isinstance(prefix, str) or len(prefix) > 24:
            raise ConfigError(
                f"aws backend: 'prefix' must be a string of ≤ 24 chars, got {prefix!r}"
            )
        credentials = config.get("credentials") or {}
        if not isinstance(credentials, Mapping):
            raise ConfigError("aws backend: 'credentials' must be an object")
        code = config.get("lambda_code")
        if code is not None and not (
            isinstance(code, Mapping)
            and ({"S3Bucket", "S3Key"} <= set(code) or set(code) == {"ImageUri"})
        ):
            raise ConfigError(
                "aws backend: 'lambda_code' must be {'S3Bucket': ..., 'S3Key': ...} "
                "or {'ImageUri': ...}"
            )
        part_size = int(config.get("part_size", 8 * MIB))
        if part_size < 5 * MIB:
            raise ConfigError("aws backend: 'part_size' must be at least 5 MiB (S3's minimum)")
        return cls(
            region=region,
            prefix=prefix,
            endpoint_url=_optional_str(config, "endpoint_url"),
            bucket=_optional_str(config, "bucket"),
            access_key_id=_optional_str(credentials, "access_key_id"),
            secret_access_key=_optional_str(credentials, "secret_access_key"),
            lambda_role_arn=_optional_str(config, "lambda_role_arn"),
            states_role_arn=_optional_str(config, "states_role_arn"),
            lambda_code=None if code is None else {k: str(v) for k, v in code.items()},
            lambda_runtime=str(config.get("lambda_runtime", "python3.12")),
            lambda_layers=tuple(str(x) for x in config.get("lambda_layers", ())),
            multipart_threshold=int(config.get("multipart_threshold", 16 * MIB)),
            part_size=part_size,
            services=dict(config),
        )


class Clients:
    """One boto3 session and one client per service (botocore clients are thread-safe;
    sessions are not, hence the lock around client creation)."""

    def __init__(self, config: AwsConfig) -> None:
        self.config = config
        self._session = _boto3.session.Session(
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            region_name=config.region,
        )
        self._clients: dict[tuple[str, float, int], Any] = {}
        self._lock = threading.Lock()
        self._account: str | None = None

    def client(self, service: str, *, read_timeout: float = 65.0, max_attempts: int = 5) -> Any:
        """A client for ``service``; the read timeout outlasts SQS's 20 s long poll."""
        key = (service, read_timeout, max_attempts)
        with self._lock:
            if key not in self._clients:
                config = _botocore_config.Config(
                    region_name=self.config.region,
                    connect_timeout=10,
                    read_timeout=read_timeout,
                    retries={"mode": "standard", "max_attempts": max_attempts},
                    max_pool_connections=32,
                    # Strato checks sha256 itself; skip botocore's extra CRC32 pass.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                self._clients[key] = self._session.client(
                    service, endpoint_url=self.config.endpoint_url, config=config
                )
            return self._clients[key]

    @property
    def partition(self) -> str:
        if self.config.region.startswith("cn-"):
            return "aws-cn"
        if self.config.region.startswith("us-gov-"):
            return "aws-us-gov"
        return "aws"

    def account_id(self) -> str:
        if self._account is None:
            self._account = str(self.client("sts").get_caller_identity()["Account"])
        return self._account

    def arn(self, service: str, resource: str, *, region: bool = True) -> str:
        where = self.config.region if region else ""
        return f"arn:{self.partition}:{service}:{where}:{self.account_id()}:{resource}"


_SHARED: OrderedDict[str, Clients] = OrderedDict()
_SHARED_MAX = 32  # configs in use at once; a test session makes one per test
_SHARED_LOCK = threading.Lock()


def clients_for(config: Mapping[str, Any]) -> Clients:
    """The ``Clients`` of a Services config, shared by the parts of every bundle with the
    same config in this process (one connection pool, one account lookup)."""
    key = json.dumps(config, sort_keys=True, default=str)
    with _SHARED_LOCK:
        if key in _SHARED:
            _SHARED.move_to_end(key)
        else:
            _SHARED[key] = Clients(AwsConfig.from_services(config))
            while len(_SHARED) > _SHARED_MAX:
                _SHARED.popitem(last=False)  # parts that hold its clients keep working
        return _SHARED[key]
