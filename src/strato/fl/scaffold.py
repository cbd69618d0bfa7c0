"""``strato new NAME``: a ready app directory to start from (``--flower``: a Flower
app, written by ``scaffold_flower``).

It holds ``app.py`` (a small model, its training and its evaluation), ``strato.toml``
(the job), ``test_app.py`` (the app's own tests), ``requirements.txt`` (Strato, from
where this Strato was installed) and a README with the two commands that run the app
and its tests in a fresh virtual environment.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

from strato.errors import ConfigError

__all__ = ["COMMANDS", "new_app"]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")

_APP = '''"""{name}: a federated learning app for Strato.

Three functions make an app: the model, how a client trains it on its own data, and
how the server evaluates it on the test set. The job (clients, rounds, strategy,
training settings) is in strato.toml.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from strato.fl import App, DataInfo, Dataset, TrainContext
from strato.fl.torch import batches

app = App()


@app.model
def model(info: DataInfo) -> nn.Module:
    """A two-layer perceptron over the flattened image: replace it with yours."""
    inputs = 1
    for size in info.input_shape:
        inputs *= size
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 128), nn.ReLU(),
                         nn.Linear(128, info.num_classes))


@app.train
def train(net: nn.Module, data: Dataset, ctx: TrainContext) -> dict[str, float]:
    """One client's training on its share of the data (ctx.config is [train])."""
    cfg = ctx.config
    opt = torch.optim.SGD(net.parameters(), lr=float(cfg.get("lr", 0.05)))
    net.train()
    total, seen = 0.0, 0
    for epoch in range(int(cfg.get("epochs", 1))):
        for x, y in batches(data, int(cfg.get("batch_size", 16)), seed=ctx.seed + epoch):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
    return {{"train_loss": total / max(1, seen)}}


@app.evaluate
def evaluate(net: nn.Module, data: Dataset) -> dict[str, float]:
    """The global model on the test set, after every round."""
    net.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in batches(data, 1000, seed=0, shuffle=False):
            out = net(x)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
    return {{"loss": loss / len(data), "accuracy": correct / len(data)}}
'''

_TOML = """# {name}: the job. `strato run .` reads this file; command-line options override it.
[job]
rounds = 10
clients = 50
clients_per_round = 10
seed = 0
client_concurrency = 2   # simulated clients training at once on this machine

[round]
quorum = 1.0             # close a round once this fraction of its clients reported
round_deadline_s = 120   # ... or after this many seconds

[strategy]
name = "fedavg"          # fedavgm, fedadam, fedyogi, fedadagrad, fedprox, fedmedian, ...

[train]                  # handed to train() as ctx.config
epochs = 1
batch_size = 16
lr = 0.05

# Without MNIST (no STRATO_DATA_DIR, no --data-dir) the run trains on scikit-learn's
# digits, 1,437 images: 10 clients of about 144 images suit them better than 50 of 29.
[dataset.digits]
clients = 10
"""

_TEST = '''"""{name}'s tests: the app's functions on a few digits, then a one-round run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from strato.data import load_digits
from strato.fl import DataInfo, Dataset, TrainContext, load_app

HERE = Path(__file__).resolve().parent


def _data() -> Dataset:
    ds = load_digits()
    info = DataInfo(ds.name, tuple(ds.train_x.shape[1:]), ds.num_classes)
    return Dataset(ds.train_x[:256], ds.train_y[:256], info)


def test_training_lowers_the_loss() -> None:
    app = load_app(HERE)
    data = _data()
    net = app.model_fn(data.info)
    before = app.evaluate_fn(net, data)
    ctx = TrainContext(round=1, client="test", seed=0, config={{"epochs": 3, "lr": 0.05}})
    app.train_fn(net, data, ctx)
    after = app.evaluate_fn(net, data)
    assert after["loss"] < before["loss"]
    assert 0.0 <= after["accuracy"] <= 1.0


def test_a_short_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "strato", "run", str(HERE), "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1
    assert np.isfinite(summary["final_loss"])
'''

_README = """# {name}

A federated learning app for Strato, made by `strato new {name}`.

```bash
{run}
{test}
```

The first command trains the model of `app.py` across the clients of `strato.toml`
and writes the run to `runs/{name}` (`summary.json`, `metrics.jsonl`, `curves.png`).
Give it MNIST with `STRATO_DATA_DIR=/path/to/mnist` (gzipped IDX files) or
`--data-dir`; without it, it trains on scikit-learn's digits and says so. The second
command runs the app's tests (`test_app.py`).

- `app.py`: the model, how a client trains, how the server evaluates.
- `strato.toml`: the job (clients, rounds, strategy, training settings).
- `strato run . --rounds 3 --strategy fedadam`: options override the file.
- `strato run --resume runs/{name}`: continue a stopped run.
"""


_INSTALL = "python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt"
# The app README's two commands: run the app, run its tests (each in a fresh venv).
COMMANDS = (f"{_INSTALL} && .venv/bin/strato run .",
            f"{_INSTALL} pytest && .venv/bin/python -m pytest")


def _requirement(extras: str = "torch,fl") -> str:
    """Strato as this one was installed: from its source directory or URL if it came
    from one (an editable checkout, a wheel file), else by name from the index."""
    spec = f"strato[{extras}]"
    try:
        text = importlib.metadata.distribution("strato").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        text = None
    if text:
        url = json.loads(text).get("url")
        if url:
            return f"{spec} @ {url}"
    return spec


def new_app(name: str, parent: Path, flower: bool = False) -> Path:
    """Write the app ``name`` in ``parent/name`` (a Flower app with ``flower``);
    returns its directory."""
    if not _NAME.match(name):
        raise ConfigError(f"an app name is a letter followed by letters, digits, '-' or '_' "
                          f"(at most 64), not {name!r}")
    where = parent / name
    if where.exists():
        raise ConfigError(f"{where} already exists: choose another name or remove it")
    where.mkdir(parents=True)
    if flower:
        from strato.fl.scaffold_flower import new_flower_app

        new_flower_app(name, where, _requirement("torch,fl,flower"), COMMANDS)
        return where
    files = {
        "app.py": _APP,
        "strato.toml": _TOML,
        "test_app.py": _TEST,
        "README.md": _README,
        "requirements.txt": "{requirement}\n",
        ".gitignore": ".venv/\nruns/\n__pycache__/\n",
    }
    for file, template in files.items():
        (where / file).write_text(template.format(name=name, requirement=_requirement(),
                                                  run=COMMANDS[0], test=COMMANDS[1]))
    return where
