from __future__ import annotations

import json
from pathlib import Path

import pytest

from strato.inference import tsv
from strato.inference.cli import main_infer


@pytest.mark.parametrize(
    "argv",
    [
        ["--neurons", "1000", "--layers", "2"],
        ["--neurons", "1024", "--layers", "0"],
        ["--neurons", "1024", "--layers", "2", "--workers", "x"],
        ["--neurons", "1024", "--layers", "2", "--channel", "pigeon"],
        ["--neurons", "1024"],
        ["--neurons", "1024", "--layers", "2", "--data-dir", "/nonexistent"],
        ["--neurons", "1024", "--layers", "2", "--workers", "auto", "--max-workers", "0"],
        ["--neurons", "1024", "--layers", "2", "--latency-target", "-1"],
        ["--neurons", "1024", "--layers", "2", "--json", "/nonexistent/dir/run.json"],
        ["--neurons", "1024", "--layers", "2", "--save-network", "/dev/null"],
        ["--neurons", "1024", "--layers", "2", "--address", "10.0.0.1:6379"],  # no ray
        ["--neurons", "1024", "--layers", "2", "--backend", "ray"],  # no backend given in
        ["--neurons", "1024", "--layers", "2", "--backend", "pigeon"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main_infer(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("strato infer: error: ") and err.count("\n") == 1


def test_run_writes_json_categories_and_network(fake_mnist: Path, tmp_path: Path) -> None:
    out, cats, netdir = tmp_path / "r.json", tmp_path / "c.tsv", tmp_path / "net"
    argv = [
        "--neurons", "1024", "--layers", "4", "--inputs", "40", "--workers", "auto",
        "--channel", "auto", "--partition", "contiguous", "--data-dir", str(fake_mnist),
        "--max-workers", "2", "--json", str(out), "--categories-out", str(cats),
        "--save-network", str(netdir), "--compare",
    ]
    assert main_infer(argv) == 0
    doc = json.loads(out.read_text())
    for key in ("rate_edges_per_s", "inference_s", "bytes_exchanged", "messages", "predicted",
                "measured", "cost_usd", "graphblas_rate_edges_per_s"):
        assert key in doc
    assert doc["matches_graphblas"] is True
    assert len(doc["candidates"]) == 4  # W ∈ {1, 2} × {bus, blob}
    assert tsv.read_categories(cats).size == doc["categories"]
    assert (netdir / "n1024-l4.tsv").exists() and (netdir / "sparse-images-1024.tsv").exists()
    # the saved challenge files run again and give the same categories
    again = tmp_path / "again.tsv"
    argv2 = [
        "--neurons", "1024", "--layers", "4", "--inputs", "40", "--workers", "2",
        "--channel", "blob", "--network-dir", str(netdir), "--images-file",
        str(netdir / "sparse-images-1024.tsv"), "--categories-out", str(again),
    ]
    assert main_infer(argv2) == 0
    assert again.read_text() == cats.read_text()
