"""The poisoning benchmark runs end to end (its figures come from the script, not from
here): one round of the norm-bounded FedAvg under attack on the digits, whose attackers'
updates lie far enough out that the bound clips them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "poisoning.py"


@pytest.mark.slow
def test_the_poisoning_benchmark_runs_and_the_bound_clips_the_attackers(tmp_path: Path) -> None:
    out = tmp_path / "poisoning.json"
    env = {k: v for k, v in os.environ.items() if k != "STRATO_DATA_DIR"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "1", "--seeds", "1",
         "--configs", "fedavg+bound", "--json", str(out)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads(out.read_text())
    row = data["per_config"]["fedavg+bound"]
    assert data["data"] == "digits" and data["max_update_norm"] == 1.0
    assert 0.0 <= row["final_accuracy"] <= 1.0 and len(row["runs"]) == 1
    # 10 digits clients, every fifth attacking: at least the 2 attackers (10x farther
    # than the median) are clipped, and with k = 1 about half the round is
    assert 2 <= row["updates_clipped"] <= 10
    assert "| fedavg+bound |" in res.stdout
