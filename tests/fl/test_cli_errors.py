"""User mistakes give one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fltools import cli_env, strato


def _assert_one_line_error(res, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr


def test_app_without_training_function(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text("from strato.fl import App\napp = App()\n")
    _assert_one_line_error(strato("run", str(app), "--out", str(tmp_path / "o")), "@app.")


def test_missing_app_py(tmp_path: Path) -> None:
    _assert_one_line_error(strato("run", str(tmp_path), "--out", str(tmp_path / "o")), "app.py")


def test_malformed_toml(tiny_app: Path, tmp_path: Path) -> None:
    (tiny_app / "strato.toml").write_text("[job\nrounds = ")
    _assert_one_line_error(
        strato("run", str(tiny_app), "--out", str(tmp_path / "o")), "malformed TOML"
    )


def test_unknown_strategy(tiny_app: Path, tmp_path: Path) -> None:
    res = strato("run", str(tiny_app), "--strategy", "fedmagic", "--out", str(tmp_path / "o"))
    _assert_one_line_error(res, "fedmagic")


def test_data_dir_without_mnist(tiny_app: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    res = strato("run", str(tiny_app), "--data-dir", str(empty), "--out", str(tmp_path / "o"))
    _assert_one_line_error(res, "MNIST")


def test_env_data_dir_without_mnist(tiny_app: Path, tmp_path: Path) -> None:
    res = strato(
        "run",
        str(tiny_app),
        "--out",
        str(tmp_path / "o"),
        env=cli_env(STRATO_DATA_DIR=str(tmp_path)),
    )
    _assert_one_line_error(res, "MNIST")


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--clients-per-round", "99"]])
def test_bad_numbers(tiny_app: Path, tmp_path: Path, args: list[str]) -> None:
    res = strato("run", str(tiny_app), *args, "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_address_without_ray(tiny_app: Path, tmp_path: Path) -> None:
    res = strato("run", str(tiny_app), "--address", "10.0.0.1:6379", "--out", str(tmp_path / "o"))
    _assert_one_line_error(res, "--address only applies with --backend ray")


def test_resume_of_nothing(tmp_path: Path) -> None:
    _assert_one_line_error(strato("run", "--resume", str(tmp_path)), "no run to resume")
