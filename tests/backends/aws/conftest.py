"""Fixtures for the AWS backend's own tests: a session-wide local AWS (moto + front).

``local_aws`` starts moto's server and Strato's local front on free 127.0.0.1 ports
once per session (the same ones the conformance suites use) and stops them at exit;
``aws`` is a Services bundle on it with a prefix of its own. Both skip, with the
reason, when boto3/moto are not installed or moto cannot start.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strato.services import Services, connect


@pytest.fixture(scope="session")
def local_aws() -> Any:
    pytest.importorskip("boto3", reason="the aws backend needs boto3: pip install 'strato[aws]'")
    pytest.importorskip("moto", reason="the local AWS needs moto: pip install 'strato[aws]'")
    from strato.backends.aws.local import shared
    from strato.errors import ConfigError

    try:
        return shared()
    except (ConfigError, OSError) as exc:
        pytest.skip(f"the local AWS (moto server) could not start: {exc}")


@pytest.fixture
def aws_config(local_aws: Any, tmp_path: Path) -> dict[str, Any]:
    config: dict[str, Any] = local_aws.config(tmp_path / "services", f"u{uuid.uuid4().hex[:10]}-")
    return config


@pytest.fixture
def aws(aws_config: dict[str, Any]) -> Iterator[Services]:
    services = connect(aws_config)
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def boto(aws_config: dict[str, Any]) -> Any:
    """boto3 clients on the same endpoint, to look behind the backend's back."""
    from strato.backends.aws._boto import clients_for

    return clients_for(aws_config)
