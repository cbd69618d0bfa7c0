"""The sparsity benchmark script runs end to end (2 rounds, 4 clients, synthetic data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sparsity_benchmark_smoke_run_writes_its_json(tmp_path: Path) -> None:
    summary, out = tmp_path / "summary.json", tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sparsity.py"), "--smoke",
         "--methods", "fedavg,topk,cs50,combined", "--json", str(summary), "--out", str(out)],
        capture_output=True, text=True, timeout=270, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = json.loads(summary.read_text())
    for key in ("fedavg_accuracy", "cs50_accuracy", "cs50_bytes_ratio", "best_accuracy",
                "best_bytes_ratio"):
        assert isinstance(keys[key], float), key
    assert 0.0 <= keys["fedavg_accuracy"] <= 1.0
    # two rounds: the dense first round, then one sparse one, so CS is cheaper but < 2x
    assert 1.0 < keys["cs50_bytes_ratio"] < 2.0
    assert keys["best_bytes_ratio"] > keys["cs50_bytes_ratio"]
    record = json.loads((out / "sparsity.json").read_text())
    runs = next(iter(record["results"].values()))
    assert set(runs) == {"fedavg", "topk", "cs50", "combined"}
    for run in runs.values():
        rows = run["rounds"]
        assert [r["round"] for r in rows] == [1, 2]
        assert 0 < rows[0]["bytes_up"] < rows[1]["bytes_up"]
        assert 0 < rows[0]["bytes_down"] < rows[1]["bytes_down"]
    # FedAvg moves dense float32 both ways: 2 clients x (header + 4 bytes per parameter);
    # the smoke run uses the fast CNN (63,766 parameters)
    fed = runs["fedavg"]["rounds"][0]
    assert fed["bytes_up"] == fed["bytes_down"] > 2 * 4 * 63_766
    assert (out / "sparsity.png").stat().st_size > 0
