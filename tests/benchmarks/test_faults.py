"""The fault campaign's small version: the script runs end to end, and the product passes.

One trial of a kind no other test covers (the run killed, then its update stream's
checkpoint lost: every update record is delivered again, twice and out of order with
the new ones), at a random moment of the run, resumed as a user would. It must pass:
the final model equals the uninterrupted run's, no update lost or counted twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "faults.py"


@pytest.mark.slow
def test_a_small_campaign_passes_every_trial(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--trials", "1", "--seed", "3",
         "--kinds", "stream-redelivery",
         "--work", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads(out.read_text())
    for key in ("trials", "passed", "lost_updates", "double_counted", "diverged",
                "shm_leftovers", "per_kind", "records", "command"):  # fmt: skip
        assert key in data, key
    assert set(data["per_kind"]) == {"stream-redelivery"}
    failed = [r for r in data["records"] if not r["passed"]]
    assert data["trials"] == 1 and not failed, failed
    assert data["complete"] and data["records"][0]["fault_injected"]
    assert data["lost_updates"] == data["double_counted"] == data["diverged"] == 0
    assert "| **all** | 1 | 1 |" in res.stdout
