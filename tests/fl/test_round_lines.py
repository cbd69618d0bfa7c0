"""The per-round lines a run prints (``strato.fl.report.round_line``)."""

from __future__ import annotations

from strato.fl.report import round_line

ROW = {"round": 3, "accuracy": 0.9, "loss": 0.3, "accepted": 10, "rejected": 1,
       "bytes_up": 2_500_000, "bytes_down": 1_200, "aggregation_latency_s": 0.0123,
       "tree": {"leaves": 2, "levels": 2}, "cold_starts": 0}  # fmt: skip


def test_a_sync_round_line_says_round_and_its_figures() -> None:
    line = round_line(ROW, 20)
    assert line.startswith("round   3/20  acc 0.9000  loss 0.3000  updates 10 ok/1 rejected")
    assert "up 2.5 MB  down 1.2 KB  agg 12.3 ms (2 leaves, 2 levels)  cold starts 0" in line
    assert "staleness" not in line


def test_an_async_line_says_version_and_how_stale_its_updates_were() -> None:
    line = round_line({**ROW, "staleness": {"0": 8, "2": 2}}, 30)
    assert line.startswith("version   3/30  acc 0.9000")
    assert line.endswith("cold starts 0  staleness 0:8 2:2")
