"""The accumulator-memory benchmark runs and writes its JSON (its numbers are not
asserted here, beyond their shape)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "accumulator_memory.py"


def test_accumulator_memory_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    shm_before = set(os.listdir("/dev/shm"))
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--reps", "3", "--json",
                          str(out)], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["params"] == 1_000_000 and data["saxpy_ms"] > 0
    assert [r["updates_per_pass"] for r in data["rows"]] == [1, 2, 4]
    assert all(r["shm_ms_per_update"] > 0 and r["private_ms_per_update"] > 0
               for r in data["rows"])
    assert "| 4 |" in res.stdout
    assert not {n for n in set(os.listdir("/dev/shm")) - shm_before if "strato-bench-acc" in n}
