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
}


@pytest.fixture(params=sorted(BACKENDS))
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Services]:
    svc = BACKENDS[request.param](tmp_path)
    try:
        yield svc
    finally:
        svc.close()
