"""benchmarks/async_fl.py runs end to end (its figures come from the script, not from
here): a tiny sync and async pair on the digits writes every key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "async_fl.py"


@pytest.mark.slow
def test_the_async_benchmark_runs_both_modes_and_writes_its_keys(tmp_path: Path) -> None:
    out = tmp_path / "async.json"
    env = {k: v for k, v in os.environ.items() if k != "STRATO_DATA_DIR"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--clients", "4", "--per-round", "2", "--rounds", "2",
         "--target", "0.05", "--json", str(out)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads(out.read_text())
    for key in ("sync_time_to_target_s", "async_time_to_target_s", "speedup",
                "sync_final_accuracy", "async_final_accuracy", "updates_refused_stale",
                "speedup_busy"):
        assert key in data, key
    assert data["data"] == "digits" and data["speedup"] > 0
    sync, asyn = data["runs"]["sync"][0], data["runs"]["async"][0]
    assert sync["updates_accepted"] == asyn["updates_accepted"] == 4  # the same work
    assert len(asyn["curve"]) == 2 and sum(asyn["staleness_histogram"].values()) == 4
    assert "| async |" in res.stdout
