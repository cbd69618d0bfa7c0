"""Fixtures for FL tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from fltools import make_tiny_app


@pytest.fixture
def tiny_app(tmp_path: Path) -> Path:
    return make_tiny_app(tmp_path)
