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
         "--methods", "fedavg,topk,cs50,combined", "--json", str(summary), "--out", str(out)],
        capture_output=True, text=True, timeout=270, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = json.loads(summary.read_text())
    for key in ("fedavg_accuracy", "cs50_accuracy", "cs50_bytes_ratio", "best_accuracy",
                "best_bytes_ratio"):
        assert isinstance(keys[key], float), key
    assert 0.0 <= keys["fedavg_accuracy"] <= 1.0
    # two rounds: the dense first round, then one sparse one, so CS is cheaper but < 2x
    assert 1.0 < keys["cs50_bytes_ratio"] < 2.0
    assert keys["best_bytes_ratio"] > keys["cs50_bytes_ratio"]
    record = json.loads((out / "sparsity.json").read_text())
    runs = next(iter(record["results"].values()))
    assert set(runs) == {"fedavg", "topk", "cs50", "combined"}
    for run in runs.values():
        rows = run["rounds"]
        assert [r["round"] for r in rows] == [1, 2]
        assert 0 < rows[0]["bytes_up"] < rows[1]["bytes_up"]
        assert 0 < rows[0]["bytes_down"] < rows[1]["bytes_down"]
    # FedAvg moves dense float32 both ways: 2 clients x (header + 4 bytes per parameter);
    # the smoke run uses the fast CNN (63,766 parameters)
    fed = runs["fedavg"]["rounds"][0]
    assert fed["bytes_up"] == fed["bytes_down"] > 2 * 4 * 63_766
    assert (out / "sparsity.png").stat().st_size > 0


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
