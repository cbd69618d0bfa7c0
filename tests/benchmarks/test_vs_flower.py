"""benchmarks/vs_flower.py runs both systems on the example's job and writes its keys
(2 rounds on the bundled digits: the figures come from the script, not from here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_vs_flower_runs_both_systems_on_the_same_schedule(tmp_path: Path) -> None:
    out = tmp_path / "vs.json"
    env = {k: v for k, v in os.environ.items() if k != "STRATO_DATA_DIR"}  # the digits
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vs_flower.py"), "--quick", "--rounds", "2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    for key in ("strato_overhead_s_per_round", "flower_overhead_s_per_round", "overhead_ratio",
                "accuracy_gap"):
        assert isinstance(rec[key], float), key
    assert rec["strato_overhead_s_per_round"] > 0 and rec["flower_overhead_s_per_round"] > 0
    strato, flower = rec["runs"]["strato"][0], rec["runs"]["flower"][0]
    # the same clients, seeds and local training: every round trains ten clients on both,
    # and the models end up the same up to the order of float additions
    assert [r["updates"] for r in strato["rounds"]] == [10, 10]
    assert [r["replies"] for r in flower["rounds"]] == [10, 10]
    assert abs(rec["accuracy_gap"]) < 0.02
    # both move the same dense float32 model each way, ten clients a round
    assert abs(strato["bytes_up"] - flower["bytes_up"]) < 0.01 * flower["bytes_up"]
    assert strato["peak_pss_mb"] > 0 and flower["peak_pss_mb"] > 0
