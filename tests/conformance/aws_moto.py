"""The ``aws`` backend factory of the conformance suites: AWS services on a local moto.

One local AWS (``strato.backends.aws.local``: moto's server plus Strato's local
front, which runs Lambda code) serves the whole test session; every test gets its own
resource-name prefix on it, so tests never see each other's topics or tables. When
boto3/moto are not installed or moto cannot start, the ``aws`` tests are skipped with
the reason (CI installs the ``aws`` extra, so there they run).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from strato.services import Services, connect


def services(tmp: Path) -> Services:
    pytest.importorskip("boto3", reason="the aws backend needs boto3: pip install 'strato[aws]'")
    from strato.backends.aws.local import shared
    from strato.errors import ConfigError

    try:
        local = shared()
    except (ConfigError, OSError) as exc:
        pytest.skip(f"aws backend: the local AWS (moto server) could not start: {exc}")
    return connect(local.config(tmp / "services", f"t{uuid.uuid4().hex[:10]}-"))
