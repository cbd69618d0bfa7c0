"""The app benchmarks/round_path.py runs through ``strato run``: no training, only updates.

Its model is one ``nn.Parameter`` of exactly P float32 values. ``train`` does not
train: it copies a pre-generated update into the model — one of ``BASES`` random
vectors (drawn once per worker process from a fixed seed, outside every timed
region), chosen by (round, client), plus a constant of each (round, client) — so
every client uploads a distinct, deterministic, full-size float32 update, and the
round's arrival times are set by the real client path (fetch the model, load it,
"train", encode, upload, record), not by a training loop. ``evaluate`` returns a
constant: the benchmark measures the aggregation path, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

APP_SOURCE = '''\
"""round_path benchmark app: {params:,} float32 parameters, pre-generated updates."""

import numpy as np
import torch
from torch import nn

from strato.fl import App

P = {params}
BASES = {bases}
SEED = {seed}
app = App()
_bases: list = []


def _base(i: int) -> torch.Tensor:
    if not _bases:  # once per worker process, from a fixed seed
        rng = np.random.default_rng(SEED)
        for _ in range(BASES):
            x = rng.standard_normal(P, dtype=np.float32)
            x *= np.float32(0.01)
            _bases.append(torch.from_numpy(x))
    return _bases[i % BASES]


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(P))


@app.model
def model(info):
    return Flat()


@app.train
def train(model, data, ctx):
    c = int(ctx.client)
    with torch.no_grad():
        model.w.copy_(_base(ctx.round + c))
        model.w.add_(1e-6 * (ctx.round * 10007 + c))  # an offset of its own: distinct bytes
    return {{}}


@app.evaluate
def evaluate(model, data):
    return {{"loss": 1.0, "accuracy": 0.5}}
'''

TOML = """\
# round_path benchmark job: every client of the job in every round, quorum all.
[job]
rounds = {rounds}
clients = {clients}
clients_per_round = {clients}
seed = 0
client_concurrency = {concurrency}

[round]
quorum = 1.0
round_deadline_s = {deadline}

[aggregation]
accumulator = "{accumulator}"

[strategy]
name = "fedavg"
"""


def write_app(
    directory: Path,
    *,
    params: int,
    clients: int,
    rounds: int,
    concurrency: int = 2,
    bases: int = 4,
    seed: int = 0,
    deadline_s: int = 900,
    accumulator: str = "float64",
) -> Path:
    """Write ``app.py`` and ``strato.toml`` into ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "app.py").write_text(APP_SOURCE.format(params=params, bases=bases, seed=seed))
    (directory / "strato.toml").write_text(
        TOML.format(rounds=rounds, clients=clients, concurrency=concurrency, deadline=deadline_s,
                    accumulator=accumulator)
    )
    return directory
