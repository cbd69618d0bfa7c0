"""Data, model and local training for the sparsity benchmark.

A private minimal MNIST loader, a stratified validation split carved from the
training set (every setting of the benchmark is chosen on it; the test set is
scored once, at the end), and the two partitioners, so the benchmark runs on its
own; the model is the CS paper's FEMNIST CNN shape adapted to 10 classes and 28×28
inputs (3×3 convolutions without padding: conv32–pool–conv64–conv64–pool–dense100–
dense10, 159,254 parameters).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from strato.params import Params

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass
class Dataset:
    x_train: torch.Tensor  # (N, 1, 28, 28) float32, normalised
    y_train: npt.NDArray[np.int64]
    x_test: torch.Tensor
    y_test: npt.NDArray[np.int64]
    name: str
    # rows of x_train the clients share, and the rows held out for validation
    train_idx: npt.NDArray[np.int64] | None = None
    val_idx: npt.NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        if self.train_idx is None or self.val_idx is None:
            self.train_idx, self.val_idx = hold_out(self.y_train, VALIDATION_FRACTION, seed=0)


VALIDATION_FRACTION = 0.1  # of the training set: 6,000 MNIST images


def hold_out(labels: npt.NDArray[np.int64], fraction: float,
             seed: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(train rows, validation rows): ``fraction`` of each class held out, fixed seed."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        val.append(members[: max(1, round(fraction * members.size))])
    is_val = np.zeros(labels.size, dtype=bool)
    is_val[np.concatenate(val)] = True
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def _idx(path: Path) -> npt.NDArray[np.uint8]:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    zero, dtype, ndim = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or dtype != 0x08:
        raise SystemExit(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack_from(">" + "I" * ndim, data, 4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _normalise(images: npt.NDArray[np.uint8]) -> torch.Tensor:
    x = (images.astype(np.float32) / 255.0 - 0.1307) / 0.3081
    return torch.from_numpy(x).unsqueeze(1).contiguous()


def load_mnist(data_dir: str | None) -> Dataset:
    root = data_dir or os.environ.get("STRATO_DATA_DIR")
    if not root:
        raise SystemExit("MNIST needed: pass --data-dir DIR or set STRATO_DATA_DIR")
    base = Path(root)
    missing = [f for pair in _FILES.values() for f in pair if not (base / f).is_file()]
    if missing:
        raise SystemExit(f"{base} holds no MNIST files (missing {', '.join(missing)})")
    parts = {k: (_idx(base / i), _idx(base / lab)) for k, (i, lab) in _FILES.items()}
    (xtr, ytr), (xte, yte) = parts["train"], parts["test"]
    return Dataset(_normalise(xtr), ytr.astype(np.int64), _normalise(xte), yte.astype(np.int64),
                   f"MNIST ({base})")


def synthetic(n_train: int = 400, n_test: int = 200, seed: int = 0) -> Dataset:
    """Ten noisy class templates: learnable, tiny, no files needed (smoke runs)."""
    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(10, 28, 28)).astype(np.float32)

    def make(n: int) -> tuple[torch.Tensor, npt.NDArray[np.int64]]:
        y = rng.integers(0, 10, n)
        x = templates[y] + 0.5 * rng.normal(size=(n, 28, 28)).astype(np.float32)
        return torch.from_numpy(x).unsqueeze(1).contiguous(), y.astype(np.int64)

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    return Dataset(xtr, ytr, xte, yte, "synthetic (smoke)")


def dirichlet_partition(labels: npt.NDArray[np.int64], clients: int, alpha: float,
                        seed: int, min_size: int = 10) -> list[npt.NDArray[np.int64]]:
    """Label skew: each class is split over clients by proportions drawn from Dir(α)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * idx.size).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min(min_size, labels.size // clients):
            return [np.array(sorted(p), dtype=np.int64) for p in parts]
    raise SystemExit("could not draw a Dirichlet partition with non-empty clients")


def shards_partition(labels: npt.NDArray[np.int64], clients: int, seed: int,
                     per_client: int = 2) -> list[npt.NDArray[np.int64]]:
    """The FedAvg paper's pathological split: sort by label, two shards per client."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, clients * per_client)
    pick = rng.permutation(len(shards))
    return [np.sort(np.concatenate([shards[j] for j in pick[i::clients]])) for i in range(clients)]


class CNN(nn.Module):
    """conv32–pool–conv64–conv64–pool–dense100–dense10 on 28×28 inputs.

    ``fast`` makes the first convolution 5×5 with stride 2 (28 → 12), which cuts the
    multiply-adds per image from 5.5 M to 0.55 M and the parameters from 159,254 to
    63,766; the layer sequence and widths are the same.
    """

    def __init__(self, fast: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, stride=2) if fast else nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.conv3 = nn.Conv2d(64, 64, 3)
        # fast: 28 -> 12 -> 6 -> 4 -> 2 -> 1; else 28 -> 26 -> 13 -> 11 -> 9 -> 4
        side = 1 if fast else 4
        self.fc1 = nn.Linear(64 * side * side, 100)
        self.fc2 = nn.Linear(100, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = self.pool(torch.relu(self.conv3(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    optimizer: str = "sgd"  # or "adam" (fresh per client and round; momentum unused)
    init: str = "torch"  # or "he": He-uniform kernels, zero biases
    max_steps: int | None = 10  # local steps cap per round (None: full epochs)
    fast_model: bool = False


class Trainer:
    """One model object reused for every client (load parameters, train, read back).

    The model and its inputs are channels-last: on one CPU thread that cut a training
    step of the fast CNN from 5.7 to 3.5 ms (CPU time) and halved evaluation. The
    numbers are the same model's (parameters go in and out in the usual order).
    """

    def __init__(self, data: Dataset, config: TrainConfig) -> None:
        self.data = data
        self.config = config
        self.model = CNN(config.fast_model).to(memory_format=torch.channels_last)
        self._val: tuple[torch.Tensor, npt.NDArray[np.int64]] | None = None

    def initial(self, seed: int) -> Params:
        torch.manual_seed(seed)
        model = CNN(self.config.fast_model)
        if self.config.init == "he":
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.kaiming_uniform_(p, nonlinearity="relu")
        return Params.from_state_dict(model.state_dict())

    def train(self, params: Params, indices: npt.NDArray[np.int64], seed: int) -> Params:
        self.model.load_state_dict(params.to_state_dict())
        self.model.train()
        cfg = self.config
        opt: torch.optim.Optimizer
        if cfg.optimizer == "adam":
            opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        else:
            opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        rng = np.random.default_rng(seed)
        x, y = self.data.x_train, torch.from_numpy(self.data.y_train)
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.from_numpy(indices[rng.permutation(indices.size)])
            for start in range(0, order.numel(), cfg.batch_size):
                if cfg.max_steps is not None and steps == cfg.max_steps:
                    break
                steps += 1
                batch = order[start : start + cfg.batch_size]
                opt.zero_grad(set_to_none=True)
                inputs = x[batch].contiguous(memory_format=torch.channels_last)
                loss = nn.functional.cross_entropy(self.model(inputs), y[batch])
                loss.backward()
                opt.step()
        return Params.from_state_dict(self.model.state_dict())

    def accuracy(self, params: Params, limit: int | None = None,
                 split: str = "validation") -> float:
        """Accuracy on the first ``limit`` images (all when None) of the validation
        split (held out of the training set) or of the test set."""
        if split == "validation":
            assert self.data.val_idx is not None
            if self._val is None:
                rows = torch.from_numpy(self.data.val_idx)
                self._val = (self.data.x_train[rows], self.data.y_train[self.data.val_idx])
            x, y = self._val
        elif split == "test":
            x, y = self.data.x_test, self.data.y_test
        else:
            raise ValueError(f"unknown split {split!r}")
        self.model.load_state_dict(params.to_state_dict())
        self.model.eval()
        n = len(y) if limit is None else min(limit, len(y))
        correct = 0
        with torch.inference_mode():
            for start in range(0, n, 500):
                stop = min(start + 500, n)
                batch = x[start:stop].contiguous(memory_format=torch.channels_last)
                predicted = self.model(batch).argmax(1).numpy()
                correct += int((predicted == y[start:stop]).sum())
        return correct / n
