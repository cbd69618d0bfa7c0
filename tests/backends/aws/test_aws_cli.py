"""The aws parts of the command line: mistakes are one line and exit code 2, and the
options land in the run's Services config."""

from __future__ import annotations

from pathlib import Path

import pytest

from fltools import make_tiny_app
from strato.cli import main

pytest.importorskip("boto3", reason="the aws backend needs boto3: pip install 'strato[aws]'")


@pytest.fixture
def tiny_app(tmp_path: Path) -> Path:
    return make_tiny_app(tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "APP", "--endpoint-url", "http://127.0.0.1:1"], "only apply with --backend aws"),
        (["run", "APP", "--prefix", "x-", "--remote-clients", "2"], "only apply with --backend"),
        (["run", "APP", "--backend", "aws", "--remote-clients", "0"], "at least 1"),
        (["client", "APP", "--backend", "aws", "--rounds-max", "0"], "at least 1"),
        (["deploy", "aws", "--dry-run", "--delete"], "do not go together"),
        (["deploy", "aws", "--code", "not-a-uri"], "s3://BUCKET/KEY"),
        (["deploy", "aws"], "needs the functions' code"),
    ],
)
def test_mistakes_are_one_line(
    argv: list[str], message: str, tiny_app: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tiny_app) if a == "APP" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_run_options_point_at_the_backend(tiny_app: Path, tmp_path: Path) -> None:
    from strato.cli import _apply_backend, _parser
    from strato.fl.config import JobConfig
    from strato.fl.run import RunOptions

    parser = _parser()
    args = parser.parse_args(
        ["run", str(tiny_app), "--backend", "aws", "--endpoint-url", "http://127.0.0.1:4566",
         "--prefix", "t1-", "--remote-clients", "4"]
    )  # fmt: skip
    opts = RunOptions(app_dir=tiny_app, out=tmp_path / "out", config=JobConfig(), quiet=True)
    _apply_backend(opts, args)
    assert opts.services is not None
    assert opts.services["backend"] == "aws" and opts.services["prefix"] == "t1-"
    assert opts.services["endpoint_url"] == "http://127.0.0.1:4566"
    assert opts.services["root"] == str(tmp_path / "out" / "services")
    assert "credentials" in opts.services  # a local endpoint gets the emulators' dummies
    assert opts.simulate is False and opts.attach is not None
    embedded = RunOptions(app_dir=tiny_app, out=tmp_path / "e", config=JobConfig())
    _apply_backend(embedded, parser.parse_args(["run", str(tiny_app)]))
    assert embedded.services is None and embedded.simulate
