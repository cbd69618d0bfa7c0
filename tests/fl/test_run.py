"""`strato run` end to end on the embedded backend (scikit-learn digits: fast, offline)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fltools import (
    TINY_TOML,
    cli_env,
    leaked_by,
    make_tiny_app,
    run_pids,
    strato,
    strato_workers,
)
from strato.fl import state
from strato.services import embedded

pytestmark = pytest.mark.slow


def test_run_writes_summary_metrics_and_curves(tmp_path: Path) -> None:
    # [dataset.digits] shapes the job for the data it has (here: the digits), and says so
    toml = TINY_TOML.replace("clients = 6", "clients = 12") + "\n[dataset.digits]\nclients = 6\n"
    app = make_tiny_app(tmp_path, toml)
    out = tmp_path / "out"
    with run_pids(out) as pids:
        res = strato("run", str(app), "--out", str(out), "--keep-rounds", "1")
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[:2]
    assert first[0].startswith("data: scikit-learn digits")  # says which data it used
    assert first[1].startswith("job shaped for the digits by [dataset.digits]")
    assert first[1].endswith(": clients 6")
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("round")]
    assert len(lines) == 3
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "rounds",
        "final_accuracy",
        "final_loss",
        "wall_s",
        "bytes_up",
        "bytes_down",
        "function_seconds",
        "cold_starts",
        "updates_accepted",
        "updates_rejected",
        "per_round",
    ):
        assert key in summary, key
    assert summary["rounds"] == 3 and len(summary["per_round"]) == 3
    assert summary["config"]["clients"] == 6
    assert summary["updates_accepted"] == 9 and summary["updates_rejected"] == 0
    assert summary["final_accuracy"] > 0.4  # ten classes: chance is 0.1
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    assert summary["function_seconds"] > 0 and summary["cold_starts"] >= 5
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:  # where each close's time went: one node, so no partials to collect
        parts = r["close_parts_s"]
        assert set(parts) == {"result_s", "model_write_s"}, parts
        assert all(v >= 0 for v in parts.values())
        if r["closed_by"] == "quorum":  # the close starts after the last update came in
            assert sum(parts.values()) <= r["aggregation_latency_s"], r
    assert (out / "curves.png").stat().st_size > 1000
    assert strato_workers(out) == []
    assert pids and not leaked_by(pids)
    # --keep-rounds 1: once a round's model is written, the round before it has no
    # update blobs left, nor records of its updates (its metrics sum them up)
    kept = sorted(p.parent.name for p in (out / "services/blobs/updates").rglob("*-*"))
    assert set(kept) == {state.round_key(3)} and len(kept) == 3, kept
    # ... nor its model: the initial one and the last are kept
    models = sorted(p.name for p in (out / "services/blobs/models").iterdir())
    assert models == [Path(state.model_key(0)).name, Path(state.model_key(3)).name], models
    with embedded(out / "services") as svc:
        for table in (state.UPDATES, state.ACCEPTED):
            keys = [i.key for i in svc.table.query(table)]
            assert len(keys) == 3 and {k[:5] for k in keys} == {state.round_key(3)}, keys
        # a round's record names its selection, kept apart: the record each admitted
        # update rewrites (its counter) does not grow with the clients a round selects
        job = svc.table.get(state.JOB, "config")
        assert job is not None
        for item in svc.table.query(state.ROUNDS):
            assert "selected" not in item.value and item.value["selected_count"] == 3
            chosen = state.selected(svc.table, int(item.value["round"]), item.value)
            assert len(set(chosen)) == 3 and set(chosen) <= set(job.value["clients"]), chosen


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_ctrl_c_leaves_no_workers_and_no_shared_memory(tiny_app: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with run_pids(out) as pids:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "strato.cli",
                "run",
                str(tiny_app),
                "--out",
                str(out),
                "--rounds",
                "50",
            ],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        _wait_for(lambda: (out / "metrics.jsonl").exists(), 120, "the first round")
        assert strato_workers(out), "the run should have live workers mid-run"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "interrupted" in err
        _wait_for(lambda: strato_workers(out) == [], 10, "workers to exit")
    assert pids and not leaked_by(pids)
