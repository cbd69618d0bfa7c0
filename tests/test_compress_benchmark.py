"""The sparsity benchmark script runs end to end (2 rounds, 4 clients, synthetic data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sparsity_benchmark_smoke_run_writes_its_json(tmp_path: Path) -> None:
    summary, out = tmp_path / "summary.json", tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sparsity.py"), "--smoke",
         "--methods", "fedavg,fedavg_q8,fedavg_q4,topk,cs50,combined", "--json", str(summary),
         "--out", str(out), "--tuning", str(tmp_path / "none.json")],
        capture_output=True, text=True, timeout=270, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = json.loads(summary.read_text())
    assert keys["tuned_on"] == "validation"
    for key in ("fedavg_accuracy", "cs50_accuracy", "cs50_bytes_ratio", "best_accuracy",
                "best_bytes_ratio", "fedavg_q4_zstd_accuracy", "fedavg_q4_zstd_bytes_ratio",
                "fedavg_q8_zstd_accuracy", "fedavg_q8_zstd_bytes_ratio"):
        assert isinstance(keys[key], float), key
    assert 0.0 <= keys["fedavg_accuracy"] <= 1.0
    # two rounds: the dense first round, then one sparse one, so CS is cheaper but < 2x
    assert 1.0 < keys["cs50_bytes_ratio"] < 2.0
    assert keys["best_bytes_ratio"] > keys["cs50_bytes_ratio"]
    # 4 bits and zstd both ways shrink FedAvg's bytes more than 8 bits do
    assert keys["fedavg_q4_zstd_bytes_ratio"] > keys["fedavg_q8_zstd_bytes_ratio"] > 2.0
    record = json.loads((out / "sparsity.json").read_text())
    assert record["tuned_on"] == "validation"
    runs = next(iter(record["results"].values()))
    assert set(runs) == {"fedavg", "fedavg_q8", "fedavg_q4", "topk", "cs50", "combined"}
    for run in runs.values():
        rows = run["rounds"]
        assert [r["round"] for r in rows] == [1, 2]
        assert 0 < rows[0]["bytes_up"] < rows[1]["bytes_up"]
        assert 0 < rows[0]["bytes_down"] < rows[1]["bytes_down"]
        # every round on validation; the test set once, on the last round's model
        assert all("val_accuracy" in r for r in rows)
        assert "test_accuracy" not in rows[0] and rows[1]["test_accuracy"] == run["final_accuracy"]
    # FedAvg moves dense float32 both ways: 2 clients x (header + 4 bytes per parameter);
    # the smoke run uses the fast CNN (63,766 parameters)
    fed = runs["fedavg"]["rounds"][0]
    assert fed["bytes_up"] == fed["bytes_down"] > 2 * 4 * 63_766
    assert (out / "sparsity.png").stat().st_size > 0


def test_sparsity_tuning_chooses_on_validation_and_the_run_takes_its_choice(
    tmp_path: Path,
) -> None:
    tuning = tmp_path / "tuning.json"
    script = str(ROOT / "benchmarks" / "sparsity.py")
    proc = subprocess.run(
        [sys.executable, script, "--smoke", "--tune", "--tuning", str(tuning),
         "--out", str(tmp_path / "t"), "--jobs", "1"],  # in this process, one by one
        capture_output=True, text=True, timeout=270, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(tuning.read_text())
    assert record["tuned_on"] == "validation" and "test" not in json.dumps(record["candidates"])
    chosen, cands = record["chosen"], record["candidates"]
    assert {c["stage"] for c in cands} == {"lr", "batch and step cap",
                                           "CS eta; combined eta and kept rate"}
    lr_stage = [c for c in cands if c["stage"] == "lr"]
    best = max(c["val_accuracy"] for c in lr_stage)
    assert float(next(c for c in lr_stage if c["val_accuracy"] == best)["args"][1]) == chosen["lr"]
    combined = [c for c in cands if c["method"].startswith("combined")]
    assert len(combined) == 4
    assert chosen["combined"] in {c["method"] for c in combined if c["val_accuracy"] == max(
        x["val_accuracy"] for x in combined)}
    # a run without flags takes the tuned settings, and says where they came from
    summary, out = tmp_path / "s.json", tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, script, "--smoke", "--methods", "fedavg,combined", "--tuning",
         str(tuning), "--json", str(summary), "--out", str(out), "--jobs", "1"],
        capture_output=True, text=True, timeout=270, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ran = json.loads((out / "sparsity.json").read_text())
    assert ran["config"]["lr"] == chosen["lr"] and ran["config"]["eta"] == chosen["eta"]
    assert ran["settings"]["from"]["lr"] == str(tuning.resolve())
    assert next(iter(ran["results"].values()))["combined"]["spec"] == chosen["combined"]


def test_benchmark_trainer_options_change_what_they_say() -> None:
    """Adam and He-uniform initialisation are real options, not labels."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _sparsity_data import TrainConfig, Trainer, synthetic

    data = synthetic(n_train=64, n_test=16)
    he = Trainer(data, TrainConfig(init="he", fast_model=True)).initial(0)
    torch_init = Trainer(data, TrainConfig(fast_model=True)).initial(0)
    for name, tensor in he.to_state_dict().items():
        values = tensor.numpy()
        if name.endswith("bias"):
            assert not values.any(), name  # zero biases
        else:  # He-uniform: bound sqrt(6 / fan_in), wider than torch's 1 / sqrt(fan_in)
            fan_in = int(np.prod(values.shape[1:]))
            assert np.abs(values).max() <= np.sqrt(6 / fan_in) + 1e-6, name
            assert np.abs(values).max() > 1 / np.sqrt(fan_in), name
    assert torch_init.to_state_dict()["fc1.bias"].abs().sum() > 0

    indices = np.arange(64)
    runs = {opt: Trainer(data, TrainConfig(optimizer=opt, lr=0.01, batch_size=16, max_steps=4,
                                           fast_model=True)).train(torch_init, indices, 3)
            for opt in ("adam", "sgd")}
    start = torch_init.flat()
    adam_step, sgd_step = (np.abs(runs[o].flat() - start) for o in ("adam", "sgd"))
    # Adam moves every weight with a gradient by about lr per step whatever its scale;
    # plain SGD moves by lr x gradient. Four steps of each from the same start differ.
    assert not np.allclose(adam_step, sgd_step)
    assert 0.005 < float(np.median(adam_step[adam_step > 0])) <= 4 * 0.01 + 1e-6
