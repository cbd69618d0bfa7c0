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
    # The hand-off passes a reference: the receiver copies far less than the buffer
    # holds, while the pickling baseline copies at least the whole buffer; a handler
    # that copies out of the memory map shows up in the same measure.
    handoff, buffer = data["shm_handoff"], 16 << 20
    assert handoff["shm_bytes_copied"] < 1 << 20
    # (peak RSS is counted in pages some of which the heap already held: ≥ 90 %)
    assert handoff["control_copying_handler_bytes_copied"] >= 0.9 * buffer
    assert handoff["baseline_bytes_copied"] >= 0.9 * buffer
    assert handoff["baseline_pipe_bytes"] >= buffer
    assert "bytes copied" in res.stdout
