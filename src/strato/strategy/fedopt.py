"""Server optimisers over the FedAvg mean: FedAvgM, FedAdam, FedYogi, FedAdagrad.

Each round the clients' weighted mean ``x̄`` (computed by ``reduce`` or eagerly by an
``Accumulator``) gives the pseudo-gradient ``g = x − x̄`` (``x`` the global model),
and the server applies an optimiser step to ``x`` with it:

- FedAvgM (Hsu et al. 2019):  ``u ← β·u + g``;  ``x ← x − η·u``.
- FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, "Adaptive Federated
  Optimization", Algorithm 2, written with ``g = −Δ``):
  ``m ← β₁·m + (1 − β₁)·g``, then
  Adagrad ``v ← v + g²``; Adam ``v ← β₂·v + (1 − β₂)·g²``;
  Yogi ``v ← v − (1 − β₂)·g²·sign(v − g²)``; and ``x ← x − η·m / (√v + τ)``.
  As in the paper, ``m`` starts at 0, ``v`` at ``τ²``, and there is no bias correction.

State (``m``, ``v`` or ``u``) is float32 like the model, allocated on the first step,
updated in place, and saved/restored as a dict of numpy arrays.
"""

from __future__ import annotations

import numpy as np

from strato.strategy._base import F32, State, _check_pair, check_float, check_state
from strato.strategy.fedavg import FedAvg

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi"]


class FedAvgM(FedAvg):
    """FedAvg with server momentum.

    Defaults: ``momentum`` 0.9 as in Hsu et al.; ``eta`` 0.1 so that the effective
    server rate η/(1 − β) is 1, i.e. FedAvg's step once the momentum has built up
    (η = 1 with β = 0.9 is a 10× larger step, which diverges with untuned clients).
    """

    name = "fedavgm"

    def __init__(self, *, eta: float = 0.1, momentum: float = 0.9) -> None:
        self.eta = check_float(self.name, "eta", eta, low=0.0, low_open=True)
        self.momentum = check_float(self.name, "momentum", momentum, low=0.0, high=1.0,
                                    high_open=True)
        self._u: F32 | None = None

    def options(self) -> dict[str, float | int]:
        return {"eta": self.eta, "momentum": self.momentum}

    def step(self, global_flat: F32, reduced: F32) -> F32:
        _check_pair(global_flat, reduced)
        g = np.subtract(global_flat, reduced, dtype=np.float32)
        if self._u is None or self._u.shape != g.shape:
            self._u = np.zeros_like(g)
        u = self._u
        u *= np.float32(self.momentum)
        u += g
        np.multiply(u, np.float32(self.eta), out=g)  # g is ours: reuse it for the step
        return np.subtract(global_flat, g, out=g, dtype=np.float32)

    def state_dict(self) -> State:
        return {} if self._u is None else {"momentum": self._u.copy()}

    def load_state_dict(self, state: State) -> None:
        self._u = check_state(self.name, state, ("momentum",))["momentum"] if state else None


class _Adaptive(FedAvg):
    """The shared body of FedAdam, FedYogi and FedAdagrad; subclasses update ``v``."""

    def __init__(self, *, eta: float, beta1: float, beta2: float, tau: float) -> None:
        self.eta = check_float(self.name, "eta", eta, low=0.0, low_open=True)
        self.beta1 = check_float(self.name, "beta1", beta1, low=0.0, high=1.0, high_open=True)
        self.beta2 = check_float(self.name, "beta2", beta2, low=0.0, high=1.0, high_open=True)
        self.tau = check_float(self.name, "tau", tau, low=0.0, low_open=True)
        self._m: F32 | None = None
        self._v: F32 | None = None
        self._g2: F32 | None = None  # scratch for g², reused every round

    def options(self) -> dict[str, float | int]:
        return {"eta": self.eta, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def _update_v(self, v: F32, g2: F32, scratch: F32) -> None:
        """``v`` in place from ``g2`` = g²; both ``g2`` and ``scratch`` may be overwritten."""
        raise NotImplementedError

    def step(self, global_flat: F32, reduced: F32) -> F32:
        _check_pair(global_flat, reduced)
        g = np.subtract(global_flat, reduced, dtype=np.float32)
        if self._m is None or self._v is None or self._m.shape != g.shape:
            self._m = np.zeros_like(g)
            self._v = np.full_like(g, self.tau**2)
        if self._g2 is None or self._g2.shape != g.shape:
            self._g2 = np.empty_like(g)
        m, v, g2 = self._m, self._v, self._g2
        m *= np.float32(self.beta1)
        np.multiply(g, np.float32(1.0 - self.beta1), out=g2)
        m += g2
        np.multiply(g, g, out=g2)
        self._update_v(v, g2, g)  # g is no longer needed: it is the scratch
        # x − η·m / (√v + τ), built in g (ours) with g2 as scratch.
        np.sqrt(v, out=g2)
        g2 += np.float32(self.tau)
        np.divide(m, g2, out=g)
        g *= np.float32(self.eta)
        return np.subtract(global_flat, g, out=g, dtype=np.float32)

    def state_dict(self) -> State:
        if self._m is None or self._v is None:
            return {}
        return {"m": self._m.copy(), "v": self._v.copy()}

    def load_state_dict(self, state: State) -> None:
        if not state:
            self._m = self._v = None
            return
        arrays = check_state(self.name, state, ("m", "v"))
        self._m, self._v = arrays["m"], arrays["v"]


class FedAdam(_Adaptive):
    """Adam on the server (Reddi et al. 2021)."""

    name = "fedadam"
    def __init__(self, *, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=beta2, tau=tau)

    def _update_v(self, v: F32, g2: F32, scratch: F32) -> None:
        v *= np.float32(self.beta2)
        g2 *= np.float32(1.0 - self.beta2)
        v += g2


class FedYogi(_Adaptive):
    """Yogi on the server (Reddi et al. 2021): ``v`` grows and shrinks additively."""

    name = "fedyogi"
    def __init__(self, *, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=beta2, tau=tau)

    def _update_v(self, v: F32, g2: F32, scratch: F32) -> None:
        np.subtract(v, g2, out=scratch)
        np.sign(scratch, out=scratch)
        scratch *= g2
        scratch *= np.float32(1.0 - self.beta2)
        v -= scratch


class FedAdagrad(_Adaptive):
    """Adagrad on the server (Reddi et al. 2021); ``beta2`` is unused."""

    name = "fedadagrad"
    def __init__(self, *, eta: float = 1e-1, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=0.0, tau=tau)

    def options(self) -> dict[str, float | int]:
        return {"eta": self.eta, "beta1": self.beta1, "tau": self.tau}

    def _update_v(self, v: F32, g2: F32, scratch: F32) -> None:
        v += g2
