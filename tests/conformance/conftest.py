"""One conformance suite per primitive, run against every backend factory.

A factory takes a fresh temporary directory and returns a ``Services`` bundle; its
``config`` must let another process (``strato.services.connect(config)``) open the
very same backend, which the cross-process tests rely on. Later backends add an
entry to ``BACKENDS`` (and skip themselves only when their emulator cannot start).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from strato.services import Services, embedded

BACKENDS: dict[str, Callable[[Path], Services]] = {
    "embedded": lambda tmp: embedded(tmp / "services"),
    "aws": lambda tmp: __import__("aws_moto").services(tmp),  # moto, see aws_moto.py
    "ray": lambda tmp: __import__("ray_local").services(tmp),  # a local Ray, see ray_local.py
}
# The table, bus and blob suites also run on Ray through the state host, as a worker
# node's process reaches them (on the host's machine the table and blobs are in place).
PARTS_BACKENDS = {**BACKENDS,
                  "ray-via-host": lambda tmp: __import__("ray_local").services(tmp, in_place=False)}


def _opened(name: str, tmp_path: Path) -> Iterator[Services]:
    """Backend ``name``'s services for one test, closed after it."""
    svc = PARTS_BACKENDS[name](tmp_path)
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture(params=sorted(BACKENDS))
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    yield from _opened(request.param, tmp_path)


@pytest.fixture(params=sorted(PARTS_BACKENDS))
def part_services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    """``services``, and Ray's parts through the state host."""
    yield from _opened(request.param, tmp_path)


# Backends whose runtime workers are processes this client starts and can see (live
# worker counts, keep-alive it controls, nested invocations it dispatches). On Lambda
# the service owns the execution environments, so those properties are not observable.
LOCAL_WORKER_BACKENDS = ("embedded", "ray")  # ray: a local Ray, its actors on this machine


@pytest.fixture(params=LOCAL_WORKER_BACKENDS)
def local_services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    yield from _opened(request.param, tmp_path)
