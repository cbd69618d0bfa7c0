"""The model, the data of one partition, and the training and evaluation loops."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 14 * 14, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in _CACHE:
        prefix = "train" if split == "train" else "t10k"
        x = _idx(Path(data_dir) / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        y = _idx(Path(data_dir) / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        _CACHE[split] = ((x[:, None] - 0.1307) / 0.3081, y)
    return _CACHE[split]


def load_data(partition_id: int, num_partitions: int, data_dir: str | None,
              split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This partition's rows of MNIST (``data-dir`` in the node config, or $MNIST_DIR),
    the first ``limit`` of them when it is set."""
    where = data_dir or os.environ.get("MNIST_DIR")
    if not where:
        raise RuntimeError("no MNIST directory: set node config data-dir or $MNIST_DIR")
    x, y = _split(where, split)
    rows = np.array_split(np.arange(len(y)), num_partitions)[partition_id]
    rows = rows[:limit] if limit > 0 else rows
    return torch.from_numpy(x[rows]), torch.from_numpy(y[rows])


def train(net: Net, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
          batch_size: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch_size):
            idx = order[i: i + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(1, batches)


def test(net: Net, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    net.eval()
    with torch.no_grad():
        out = net(x)
        return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())
