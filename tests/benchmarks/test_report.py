"""The docs' benchmark tables are what benchmarks/report.py renders from the committed
results: a hand edit, or results committed without re-rendering, fails here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "report.py"


def _check(docs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--docs", str(docs)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_docs_tables_equal_what_the_results_render() -> None:
    res = _check(ROOT / "docs")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 differ" in res.stdout and "report table(s)" in res.stdout
    assert int(res.stdout.split()[0]) >= 4  # primitives, round path, aggregation, inference


def test_a_hand_edited_table_is_caught_and_rewritten(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    page = docs / "benchmarks.md"
    text = page.read_text()
    start = text.index("<!-- report: primitives -->")
    end = text.index("<!-- /report -->", start)
    edited = text[:start] + text[start:end].replace("| 0 |", "| 1 |", 1) + text[end:]
    assert edited != text
    page.write_text(edited)
    res = _check(docs)
    assert res.returncode == 1 and "benchmarks.md: primitives" in res.stdout
    subprocess.run([sys.executable, str(SCRIPT), "--docs", str(docs)], check=True,
                   capture_output=True, timeout=120, cwd=ROOT)
    assert page.read_text() == text


def test_a_results_file_without_its_provenance_renders_nothing(tmp_path: Path) -> None:
    import report

    results = tmp_path / "results"
    (results / "primitives").mkdir(parents=True)
    original = report.RESULTS / "primitives" / "quick.json"
    doc = json.loads(original.read_text())
    del doc["date"]
    (results / "primitives" / "quick.json").write_text(json.dumps(doc))
    saved = report.RESULTS
    report.RESULTS = results
    try:
        with pytest.raises(SystemExit, match="no date"):
            report.primitives()
        doc["date"] = "2026-12-03"
        (results / "primitives" / "quick.json").write_text(json.dumps(doc))
        assert "| invoke, warm" in report.primitives()
    finally:
        report.RESULTS = saved


def test_every_committed_results_file_records_its_command_date_and_machine() -> None:
    files = sorted((ROOT / "benchmarks" / "results").rglob("*.json"))
    assert len(files) >= 10
    for path in files:
        doc = json.loads(path.read_text())
        missing = [key for key in ("command", "date", "machine") if key not in doc]
        assert not missing, f"{path.relative_to(ROOT)} lacks {missing}"
