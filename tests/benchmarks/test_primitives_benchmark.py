"""The primitives benchmark runs and writes its JSON (its numbers are not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "primitives.py"


def test_primitives_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "primitives.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--handoff-mb", "16", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert set(data) >= {"invoke", "bus", "blobs", "shm_handoff"}
    # The hand-off passes a reference: far fewer bytes cross than the buffer holds,
    # while the pickling baseline moves at least the whole buffer.
    assert data["shm_handoff"]["shm_bytes_copied"] < 4096
    assert data["shm_handoff"]["baseline_bytes_copied"] >= 16 << 20
    assert "bytes copied" in res.stdout
