"""Which Ray a process joins: the one it is told of, or one of its own.

Ray's ``init()`` with no address joins the latest Ray started on this machine (named in
``<tmp>/ray/ray_current_cluster``), whoever started it: another user's job, another
test worker's cluster. Strato with no address must start its own instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the ray backend needs ray: pip install 'strato[ray]'")

from ray._private import services as ray_services  # noqa: E402

from strato import errors  # noqa: E402
from strato.backends.ray import _cluster  # noqa: E402


@pytest.fixture
def init_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    """``ray.init`` calls, each with where Ray itself would connect; another Ray "runs"."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # the other Ray
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls: list[dict[str, Any]] = []

    def init(address: str | None = None, **options: Any) -> None:
        joins = ray_services.canonicalize_bootstrap_address(address)  # Ray's own resolution
        calls.append({"address": address, "joins": joins, **options})
        if joins is not None and "num_cpus" in options:  # what Ray says then
            raise ValueError("When connecting to an existing cluster, num_cpus and num_gpus "
                             "must not be provided.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return calls


def test_no_address_starts_a_ray_of_its_own_beside_another(
        init_calls: list[dict[str, Any]]) -> None:
    _cluster.ensure_ray({})
    [call] = init_calls
    assert call["joins"] is None  # Ray starts a new local instance
    assert call["num_cpus"] >= 1


def test_an_address_is_joined_as_given(init_calls: list[dict[str, Any]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _cluster.ensure_ray({"address": "10.0.0.8:6379"})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.8:6380")  # the variable Ray users set
    _cluster.ensure_ray({})
    assert [c["joins"] for c in init_calls] == ["10.0.0.8:6379", "10.0.0.8:6380"]
    assert all("num_cpus" not in c for c in init_calls)  # a cluster's CPUs are its own


def test_a_ray_that_cannot_be_joined_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def init(address: str | None = None, **options: Any) -> None:
        raise ConnectionError(f"could not connect to {address}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(errors.ConfigError, match=r"cannot join Ray at 10\.0\.0\.9:6379"):
        _cluster.ensure_ray({"address": "10.0.0.9:6379"})
