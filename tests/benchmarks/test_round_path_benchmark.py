"""The round_path benchmark's smallest configuration runs end to end and writes every key.

``--smoke``: 4 clients × 10k parameters, 2 rounds of the real ``strato run`` pipeline,
the eager server's replay of round 2; no 1000-client run, no sharded part. Its numbers
are not asserted (a 10k-parameter round says nothing about speed), only their shapes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "round_path.py"


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_round_path_smoke_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    env = {k: v for k, v in os.environ.items() if k != "STRATO_DATA_DIR"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out),
         "--out", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard; the smoke run itself takes well under 60 s
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads(out.read_text())

    for key in ("completion_s", "completion_s_eager_server", "completion_ratio_vs_eager_server",
                "cpu_per_update_ratio"):
        assert _number(data[key]) and data[key] > 0, (key, data[key])
    for key in ("completion_s_per_round", "completion_s_eager_server_per_round"):
        assert data[key] and all(_number(v) and v > 0 for v in data[key]), (key, data[key])
    assert len(data["completion_s_per_round"]) == len(data["ran"]["measured_rounds"]) == 1
    assert data["ran"]["warmup_rounds"] == [1]

    accounting = data["cpu_accounting"]
    assert isinstance(accounting["what"], str) and accounting["what"]
    assert any(p["label"] == "aggregate" or p["label"].startswith("lifl.")
               for p in accounting["processes"]), accounting["processes"]
    assert _number(accounting["saxpy"]["cpu_s"])

    # the 1000-client and sharded parts are left out of --smoke: null, with a note why
    assert data["peak_rss_ratio_1000_vs_100"] is None
    assert data["sharded_median_peak_mb"] is None or _number(data["sharded_median_peak_mb"])
    assert "peak_rss_ratio_1000_vs_100" in data["notes"]

    targets = data["targets"]
    assert set(targets) >= {"completion_ratio_vs_eager_server", "cpu_per_update_ratio",
                            "peak_rss_ratio_1000_vs_100", "sharded_median_peak_mb"}
    for key, target in targets.items():
        assert target["met"] in (True, False, None), (key, target)
        assert isinstance(target["target"], str)

    assert "--smoke" in data["command"]
    machine = data["machine"]
    assert isinstance(machine["nproc"], int) and machine["nproc"] >= 1
    assert len(machine["loadavg_at_start"]) == 3
    assert all(_number(v) for v in machine["loadavg_at_start"])

    # the eager server's model is the run's own (same kernel, same order, float32)
    for rec in data["details"]["server"]["records"]:
        assert rec["max_rel_diff_vs_run_model"] < 1e-5
    assert "| key | value | target | met |" in res.stdout
    assert not (tmp_path / "runs" / "main").exists()  # run directories are deleted
