"""`strato new NAME`: an app directory that runs, with tests that pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fltools import cli_env, strato


def test_new_writes_an_app_that_runs_and_whose_tests_pass(tmp_path: Path) -> None:
    res = strato("new", "demo", "--dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    app = tmp_path / "demo"
    assert sorted(p.name for p in app.iterdir()) == [
        ".gitignore", "README.md", "app.py", "requirements.txt", "strato.toml", "test_app.py"]
    # the README starts with the two commands, and `strato new` prints them
    readme = (app / "README.md").read_text()
    commands = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(commands) == 2
    assert commands[0].endswith("pip install -q -r requirements.txt && .venv/bin/strato run .")
    assert commands[1].endswith(".venv/bin/python -m pytest")
    assert res.stdout.splitlines()[-2:] == commands
    assert (app / "requirements.txt").read_text().startswith("strato[torch,fl]")
    # its own tests (a training step, a one-round run on the digits) pass
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(app)], capture_output=True, text=True, cwd=app,
                           env=cli_env(), timeout=600, stdin=subprocess.DEVNULL)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "2 passed" in tests.stdout


def test_new_flower_writes_a_flower_app_that_strato_runs_and_whose_tests_pass(
        tmp_path: Path) -> None:
    pytest.importorskip("flwr", reason="Flower apps need flwr: pip install 'strato[flower]'")
    from strato.fl.flower import flower_app

    res = strato("new", "demo-fl", "--flower", "--dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    app = tmp_path / "demo-fl"
    assert sorted(p.name for p in app.iterdir()) == [
        ".gitignore", "README.md", "demo_fl", "pyproject.toml", "requirements.txt",
        "test_app.py"]
    found = flower_app(app)  # what `strato run` and `flwr run` read: the components
    assert found is not None and found.clientapp == "demo_fl.client_app:app"
    assert found.nodes == 5 and found.config["num-server-rounds"] == 10
    readme = (app / "README.md").read_text()
    commands = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert commands[0].endswith("&& .venv/bin/strato run .")
    assert (app / "requirements.txt").read_text().startswith("strato[torch,fl,flower]")
    # its tests: a training step, and a two-round `strato run` of the app
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(app)], capture_output=True, text=True, cwd=app,
                           env=cli_env(), timeout=600, stdin=subprocess.DEVNULL)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "2 passed" in tests.stdout


def test_new_refuses_a_bad_name_or_an_existing_directory(tmp_path: Path) -> None:
    for name in ("../escape", "1app", "a b"):
        res = strato("new", name, "--dir", str(tmp_path))
        assert res.returncode == 2
        assert res.stderr.startswith("strato: error: an app name is a letter")
        assert len(res.stderr.strip().splitlines()) == 1
    (tmp_path / "taken").mkdir()
    res = strato("new", "taken", "--dir", str(tmp_path))
    assert res.returncode == 2 and "already exists" in res.stderr
    assert list((tmp_path / "taken").iterdir()) == []


def test_run_of_dot_writes_to_runs_named_after_the_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from strato import cli

    app = tmp_path / "demo"
    app.mkdir()
    monkeypatch.chdir(app)
    opts = cli._run_options(cli._parser().parse_args(["run", "."]))
    assert opts.out == Path("runs/demo")
