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


def services(tmp: Path, *, in_place: bool = True) -> Services:
    """A local Ray's services. On the state host's machine (this one) the table and the
    blob store read the host's files in place; ``in_place=False`` has them go through
    the host instead, as a process on a worker node does."""
    ray = pytest.importorskip("ray", reason="the ray backend needs ray: pip install 'strato[ray]'")
    import strato.backends.ray  # noqa: F401 - registers the backend
    from strato.backends.ray._cluster import ensure_ray

    if not ray.is_initialized():
        ensure_ray({})
        atexit.register(ray.shutdown)
    address = ray.get_runtime_context().gcs_address  # other processes join this Ray
    config = {"backend": "ray", "root": str(tmp / "services"), "address": address}
    if in_place:
        return connect(config)
    from strato.backends.ray._cluster import state_client

    client = state_client(config)  # the root's client, which the parts opened below share
    try:
        client._host_node = "a-node-that-is-not-this-one"  # (what it asks once, cached)
        svc = connect(config)
        for part in ("table", "bus", "blobs"):
            getattr(svc, part)  # opened now, while the client says so
        return svc
    finally:
        client.release()
