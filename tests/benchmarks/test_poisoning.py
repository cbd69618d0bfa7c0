"""The poisoning benchmark runs end to end (its figures come from the script, not from
here): one round of the norm-bounded FedAvg under attack on the digits, whose attackers'
updates lie far enough out that the bound clips them; and the trimmed mean's ``beta`` is
chosen on a validation split carved from the training images, never the test set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import poisoning
from strato.data.mnist import read_mnist

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


def _fake_mnist(root: Path, n_train: int = 120, n_test: int = 30) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256  # a mark to tell images apart
        images[:, 0, 1] = 1 if stem == "t10k" else 0  # test images carry a 1 here
        labels = (np.arange(n) % 10).astype(np.uint8)
        poisoning._write_idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        poisoning._write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    return root


def test_the_validation_split_is_carved_from_the_training_images_only(tmp_path: Path) -> None:
    real = _fake_mnist(tmp_path / "mnist")
    train_x, train_y, _, _ = read_mnist(real)
    val = poisoning.validation_dir(str(real), tmp_path / "work")
    vx, vy, hx, hy = read_mnist(val)
    assert len(vy) + len(hy) == len(train_y) == 120
    assert not (hx[:, 0, 1] == 1).any() and not (vx[:, 0, 1] == 1).any()  # no test image
    assert np.bincount(hy, minlength=10).tolist() == [2] * 10  # 1/6 of each class's 12
    both = np.concatenate([vx, hx]).reshape(120, -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, train_x.reshape(120, -1)))


def test_beta_is_chosen_by_validation_accuracy_and_the_smaller_wins_a_tie(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _fake_mnist(tmp_path / "mnist")
    seen: list[str | None] = []
    scores = {"0.1": 0.80, "0.2": 0.90, "0.3": 0.90}

    def fake_run(app: Path, out: Path, data_dir: str | None, rounds: int | None) -> dict:
        seen.append(data_dir)
        beta = app.name.split("-")[2]
        assert f"beta = {beta}" in (app / "strato.toml").read_text()
        return {"final_accuracy": scores[beta], "wall_s": 0.0}

    monkeypatch.setattr(poisoning, "run_one", fake_run)
    tuning = poisoning.tune_beta([0.3, 0.1, 0.2], tmp_path / "work", str(real), 2, 1)
    assert tuning["chosen_beta"] == 0.2
    assert tuning["validation_final_accuracy"] == {"0.3": 0.9, "0.1": 0.8, "0.2": 0.9}
    assert len(seen) == 6 and str(real) not in seen  # every run on the validation split
