"""benchmarks/fl_example.py runs the example job per partition and writes what the docs
render (2 rounds on the bundled digits here: the figures come from the script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fl_example_runs_each_partition_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    env = {k: v for k, v in os.environ.items() if k != "STRATO_DATA_DIR"}  # the digits
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fl_example.py"), "--rounds", "2",
         "--partitions", "iid", "shards", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["partition"], r["strategy"]) for r in runs] == [("iid", "fedavg"),
                                                               ("shards", "fedavg")]
    for r in runs:
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["cold_starts"] >= 1
        assert r["bytes_up"] > 0 and len(r["aggregation_latency_s"]) == 2
        assert "digits" in r["first_line"]  # it said which data it trained on


def test_fl_example_runs_a_strategy_with_its_options(tmp_path: Path) -> None:
    out = tmp_path / "strategies.json"
    env = {k: v for k, v in os.environ.items() if k != "STRATO_DATA_DIR"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fl_example.py"), "--rounds", "2",
         "--partitions", "iid", "--strategies", "cs --eta 4", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["strategy"] == "cs --eta 4"
    assert run["config"]["strategy"] == "cs" and float(run["config"]["eta"]) == 4.0
    # round 2 uploads only the complement: fewer bytes up than round 1's dense ones
    assert run["bytes_up_per_round"][1] < run["bytes_up_per_round"][0]
