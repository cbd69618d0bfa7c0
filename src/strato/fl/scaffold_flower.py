"""``strato new NAME --flower``: a Flower app (Message API) that ``strato run`` and
``flwr run`` both accept.

It trains a small perceptron on scikit-learn's bundled digits (no download), each node
on its partition (``partition-id`` of ``num-partitions``), with FedAvg in its
ServerApp. Beside the Flower files: ``test_app.py``, ``requirements.txt`` and a README
with the two commands that run the app and its tests in a fresh virtual environment.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["new_flower_app"]

_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "A Flower app, made by `strato new {name} --flower`"
dependencies = ["flwr[simulation]>=1.42", "torch", "scikit-learn"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "strato"

[tool.flwr.app.components]
serverapp = "{package}.server_app:app"
clientapp = "{package}.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 10
fraction-train = 1.0
fraction-evaluate = 1.0
local-epochs = 2
lr = 0.1

[tool.flwr.federations]
default = "local-simulation"

[tool.flwr.federations.local-simulation]
options.num-supernodes = 5
"""

_TASK = '''"""The model, a node's share of the data, and the training and evaluation loops."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def load_data(partition_id: int, num_partitions: int,
              split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This node's rows of scikit-learn's digits (80 % train, 20 % test), shuffled once."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    rows = order[:cut] if split == "train" else order[cut:]
    mine = np.array_split(rows, num_partitions)[partition_id]
    return (torch.tensor(x[mine] / 16.0, dtype=torch.float32),
            torch.tensor(y[mine], dtype=torch.int64))


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
          seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), 16):
            idx = order[i: i + 16]
            opt.zero_grad()
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(1, batches)


def test(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    net.eval()
    with torch.no_grad():
        out = net(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())
'''

_CLIENT = '''"""The ClientApp: each node trains and evaluates on its own partition."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from {package}.task import load_data, make_model, test
from {package}.task import train as train_fn

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    net = make_model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    part, parts = _partition(context)
    x, y = load_data(part, parts, "train")
    # Context.state lives on between this node's rounds: here, how many it trained.
    seen = context.state.get("seen", MetricRecord({{"rounds": 0}}))
    rounds = int(seen["rounds"]) + 1
    context.state["seen"] = MetricRecord({{"rounds": rounds}})
    loss = train_fn(net, x, y, int(context.run_config["local-epochs"]),
                    float(msg.content["config"]["lr"]), seed=1000 * rounds + part)
    metrics = MetricRecord({{"train_loss": loss, "num-examples": len(y)}})
    return Message(RecordDict({{"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    net = make_model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(*_partition(context), "test")
    loss, acc = test(net, x, y)
    metrics = MetricRecord({{"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)}})
    return Message(RecordDict({{"metrics": metrics}}), reply_to=msg)
'''

_SERVER = '''"""The ServerApp: FedAvg over the nodes; the final model is saved where it runs."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from {package}.task import make_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(0)
    strategy = FedAvg(fraction_train=float(context.run_config["fraction-train"]),
                      fraction_evaluate=float(context.run_config["fraction-evaluate"]))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(make_model().state_dict()),
        train_config=ConfigRecord({{"lr": float(context.run_config["lr"])}}),
        num_rounds=int(context.run_config["num-server-rounds"]),
    )
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")
'''

_TEST = '''"""{name}'s tests: a node's training step, then a two-round run on Strato."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from {package} import task  # noqa: E402


def test_training_lowers_the_loss() -> None:
    net = task.make_model()
    x, y = task.load_data(0, 5, "train")
    before, _ = task.test(net, x, y)
    task.train(net, x, y, epochs=2, lr=0.1, seed=0)
    after, acc = task.test(net, x, y)
    assert after < before and 0.0 <= acc <= 1.0


def test_a_short_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "strato", "run", str(HERE), "--out", str(out),
         "--run-config", "num-server-rounds=2"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] > 0.5
    assert (out / "final_model.pt").exists()
'''

_README = """# {name}

A Flower app (Flower's Message API), made by `strato new {name} --flower`.

```bash
{run}
{test}
```

The first command runs it on Strato: the ServerApp's FedAvg over 5 nodes, each
training on its share of scikit-learn's digits, 10 rounds; the run goes to
`runs/{name}` (`summary.json`, `metrics.jsonl`, the ServerApp's `final_model.pt`).
The second runs the app's tests (`test_app.py`).

- `{package}/client_app.py`, `{package}/server_app.py`, `{package}/task.py`: the app.
- `pyproject.toml`: its components and its config (`[tool.flwr.app.config]`).
- `strato run . --run-config 'num-server-rounds=3 lr=0.05'`: values over the config.
- Flower's own runtime takes the same directory: `.venv/bin/pip install 'flwr[simulation]'`,
  then `PATH=.venv/bin:$PATH flwr run . --stream`.
"""


def new_flower_app(name: str, where: Path, requirement: str, commands: tuple[str, str]) -> None:
    """Write the Flower app ``name`` into the new, empty directory ``where``."""
    package = name.lower().replace("-", "_")
    (where / package).mkdir()
    files = {
        "pyproject.toml": _PYPROJECT,
        f"{package}/__init__.py": '"""{name}: a Flower app."""\n',
        f"{package}/task.py": _TASK,
        f"{package}/client_app.py": _CLIENT,
        f"{package}/server_app.py": _SERVER,
        "test_app.py": _TEST,
        "README.md": _README,
        "requirements.txt": "{requirement}\n",
        ".gitignore": ".venv/\nruns/\n__pycache__/\n",
    }
    for file, template in files.items():
        text = template.format(name=name, package=package, requirement=requirement,
                               run=commands[0], test=commands[1])
        (where / file).write_text(text)
