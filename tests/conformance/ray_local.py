"""The ``ray`` backend factory of the conformance suites: one local Ray per session.

The first ``ray`` test starts a local Ray (``ray.init``, 2 CPUs, no dashboard); every
test gets its own root (so its own state host, and its own actors), and the session's
end shuts Ray down. When Ray is not installed the ``ray`` tests are skipped with the
reason (CI installs the ``ray`` extra, so there they run).
"""

from __future__ import annotations

import atexit
from pathlib import Path

import pytest

from strato.services import Services, connect


def services(tmp: Path) -> Services:
    ray = pytest.importorskip("ray", reason="the ray backend needs ray: pip install 'strato[ray]'")
    import strato.backends.ray  # noqa: F401 - registers the backend
    from strato.backends.ray._cluster import ensure_ray

    if not ray.is_initialized():
        ensure_ray({})
        atexit.register(ray.shutdown)
    address = ray.get_runtime_context().gcs_address  # other processes join this Ray
    return connect({"backend": "ray", "root": str(tmp / "services"), "address": address})
