"""MNIST with a small CNN: the app `strato run examples/mnist` trains.

Copy this directory to start your own app: a model, a training function and an
evaluation function; the job's settings are in strato.toml.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from strato.fl import App, DataInfo, Dataset, TrainContext
from strato.fl.torch import batches
from strato.strategy import proximal_term

app = App()


class Net(nn.Module):
    """Two 5x5 conv layers and a small head (about 29k parameters)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.pool = nn.AdaptiveAvgPool2d(4)  # 28x28 MNIST and 8x8 digits alike
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@app.model
def model(info: DataInfo) -> nn.Module:
    return Net(info.input_shape[0], info.num_classes)


@app.train
def train(net: nn.Module, data: Dataset, ctx: TrainContext) -> dict[str, float]:
    cfg = ctx.config
    opt = torch.optim.SGD(
        net.parameters(), lr=cfg.get("lr", 0.05), momentum=cfg.get("momentum", 0.9)
    )
    net.train()
    total, seen = 0.0, 0
    for epoch in range(int(cfg.get("epochs", 1))):
        for x, y in batches(data, int(cfg.get("batch_size", 32)), seed=ctx.seed + epoch):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            if ctx.proximal_mu > 0:  # FedProx
                loss = loss + proximal_term(
                    net.parameters(), ctx.global_model.parameters(), ctx.proximal_mu
                )
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
    return {"train_loss": total / max(1, seen)}


@app.evaluate
def evaluate(net: nn.Module, data: Dataset) -> dict[str, float]:
    net.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in batches(data, 1000, seed=0, shuffle=False):
            out = net(x)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
    return {"loss": loss / len(data), "accuracy": correct / len(data)}
