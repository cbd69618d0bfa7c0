"""FedProx (Li et al. 2020): FedAvg on the server, a proximal term on the clients.

Each client minimises ``loss + μ/2 · ‖w − w_g‖²`` where ``w_g`` is the global model
it received, which keeps heterogeneous clients from drifting apart. The server side
is exactly FedAvg; the strategy only carries ``mu`` to the clients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from strato.strategy._base import check_float
from strato.strategy.fedavg import FedAvg

__all__ = ["FedProx", "proximal_term"]


class FedProx(FedAvg):
    """FedAvg whose clients add ``proximal_term(..., mu)`` to their training loss."""

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01) -> None:
        self.mu = check_float(self.name, "mu", mu, low=0.0)

    def options(self) -> dict[str, float | int]:
        return {"mu": self.mu}

    def client_options(self) -> dict[str, float]:
        return {"mu": self.mu}


def proximal_term(model_params: Iterable[Any], global_params: Iterable[Any], mu: float) -> Any:
    """``mu/2 · Σ ‖w − w_g‖²`` as a torch scalar that back-propagates into ``model_params``.

    ``model_params`` are the tensors being trained (e.g. ``model.parameters()``);
    ``global_params`` the same tensors as received from the server, in the same
    order (torch tensors or numpy arrays; they are treated as constants).
    """
    import torch  # lazily: strategies must import without torch

    total: Any = None
    for w, g in zip(model_params, global_params, strict=True):
        ref = torch.as_tensor(g, device=w.device, dtype=w.dtype).detach()
        sq = torch.sum((w - ref) ** 2)
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError("proximal_term needs at least one parameter tensor")
    return (float(mu) / 2.0) * total
