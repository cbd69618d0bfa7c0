"""The one small interface every server strategy has, and option checking for it."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from strato.errors import ConfigError, LayoutError

__all__ = ["F32", "State", "Strategy", "check_float", "check_int", "check_stack", "check_state"]

F32 = npt.NDArray[np.float32]
State = dict[str, npt.NDArray[Any]]


class Strategy:
    """A round's server side, in two pure steps: ``reduce`` then ``step``.

    - ``reduce(updates, weights)`` combines the clients' models of one round into one
      model. For a ``streaming`` strategy it is the weighted mean, which the caller
      may compute eagerly with an ``Accumulator`` instead (same numbers).
    - ``step(global_flat, reduced)`` turns the old global model and the reduced model
      into the new global model (server optimisers keep state here; plain strategies
      return ``reduced``).

    Updates are client *models* (parameters after local training), flat float32.
    """

    name: ClassVar[str] = ""
    streaming: ClassVar[bool] = True  # the step needs only the weighted mean of the updates

    @property
    def min_updates(self) -> int:
        """The fewest updates a round needs for this strategy to be defined."""
        return 1

    def options(self) -> dict[str, float | int]:
        """The options this strategy was made with (for logs and summaries)."""
        return {}

    def client_options(self) -> dict[str, float]:
        """Settings the clients need for local training (e.g. FedProx's ``mu``)."""
        return {}

    def reduce(self, updates: npt.ArrayLike, weights: npt.ArrayLike) -> F32:
        """Combine ``K`` updates stacked as ``(K, n)`` (or a list of ``n``-vectors)."""
        raise NotImplementedError

    def step(self, global_flat: F32, reduced: F32) -> F32:
        """The new global model; may return ``reduced`` itself."""
        _check_pair(global_flat, reduced)
        return reduced

    def aggregate(self, global_flat: F32, updates: npt.ArrayLike, weights: npt.ArrayLike) -> F32:
        """``step(global_flat, reduce(updates, weights))``."""
        return self.step(global_flat, self.reduce(updates, weights))

    def state_dict(self) -> State:
        """Server state as named numpy arrays (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: State) -> None:
        if state:
            raise ConfigError(f"strategy {self.name} keeps no state, but the checkpoint "
                              f"holds {', '.join(sorted(state))}")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def _check_pair(global_flat: F32, reduced: F32) -> None:
    if global_flat.shape != reduced.shape:
        raise LayoutError(f"global model has shape {global_flat.shape}, reduced model "
                          f"{reduced.shape}")


def check_stack(
    updates: npt.ArrayLike, weights: npt.ArrayLike, min_updates: int, name: str
) -> tuple[npt.NDArray[np.floating[Any]], npt.NDArray[np.float64]]:
    """Updates as a 2-D float array and weights as float64, both checked."""
    stack = np.asarray(updates)
    if stack.ndim != 2 or stack.dtype.kind != "f":
        raise LayoutError(f"updates must be a (K, n) float array, "
                          f"got {stack.dtype}{list(stack.shape)}")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != stack.shape[0]:
        raise ValueError(f"{stack.shape[0]} updates but {w.shape[0]} weights")
    if not (np.all(np.isfinite(w)) and np.all(w > 0)):
        raise ValueError("update weights must be positive finite numbers")
    if stack.shape[0] < min_updates:
        raise ConfigError(f"{name} needs at least {min_updates} updates per round, "
                          f"got {stack.shape[0]}")
    return stack, w


def check_float(
    strategy: str, option: str, value: Any, *, low: float, high: float = math.inf,
    low_open: bool = False, high_open: bool = False,
) -> float:
    """A numeric option inside [low, high] (ends open when asked), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{strategy}: option {option} must be a number, got {value!r}")
    v = float(value)
    bad_low = v <= low if low_open else v < low
    bad_high = v >= high if high_open else v > high
    if not math.isfinite(v) or bad_low or bad_high:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{strategy}: option {option} must be in {lo}{low}, {high}{hi}, "
                          f"got {value!r}")
    return v


def check_int(strategy: str, option: str, value: Any, *, low: int) -> int:
    """An integer option ≥ low (a float with an integral value is accepted)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{strategy}: option {option} must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{strategy}: option {option} must be ≥ {low}, got {value}")
    return value


def check_state(strategy: str, state: State, names: tuple[str, ...]) -> State:
    """The state arrays ``names``, all float 1-D of one length, else ConfigError."""
    unknown = sorted(set(state) - set(names))
    missing = sorted(set(names) - set(state))
    if unknown or missing:
        raise ConfigError(f"{strategy}: checkpoint state has {sorted(state)}, "
                          f"expected {list(names)}")
    arrays = {k: np.array(state[k], dtype=np.float32).reshape(-1) for k in names}
    if len({a.shape for a in arrays.values()}) > 1:
        raise ConfigError(f"{strategy}: checkpoint state arrays differ in length")
    return dict(arrays)
