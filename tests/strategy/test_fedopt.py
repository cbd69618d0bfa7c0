"""Server optimisers against hand-computed steps and a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from strato.errors import ConfigError, LayoutError
from strato.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, make_strategy


def reference(name: str, x: np.ndarray, means: list[np.ndarray], **o: float) -> np.ndarray:
    """Reddi et al. 2021, Algorithm 2 (and Hsu et al. 2019 for FedAvgM), in float64."""
    x = x.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, o.get("tau", 0.0) ** 2)
    for mean in means:
        delta = mean.astype(np.float64) - x  # the paper's Δ = mean − x
        if name == "fedavgm":
            m = o["momentum"] * m - delta
            x = x - o["eta"] * m
            continue
        m = o["beta1"] * m + (1 - o["beta1"]) * delta
        if name == "fedadagrad":
            v = v + delta**2
        elif name == "fedadam":
            v = o["beta2"] * v + (1 - o["beta2"]) * delta**2
        else:
            v = v - (1 - o["beta2"]) * delta**2 * np.sign(v - delta**2)
        x = x + o["eta"] * m / (np.sqrt(v) + o["tau"])
    return x


CASES = [
    ("fedavgm", {"eta": 0.3, "momentum": 0.8}),
    ("fedadam", {"eta": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
    ("fedyogi", {"eta": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
    ("fedadagrad", {"eta": 0.1, "beta1": 0.5, "tau": 1e-2}),
]


@pytest.mark.parametrize(("name", "options"), CASES)
def test_matches_numpy_reference_over_rounds(name: str, options: dict[str, float]) -> None:
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(300).astype(np.float32)
    means = [(x0 + rng.standard_normal(300) * 0.1).astype(np.float32) for _ in range(4)]
    strategy = make_strategy(name, **options)
    x = x0
    for mean in means:
        x = strategy.step(x, mean)
        assert x.dtype == np.float32
    opts = dict(options)
    if name == "fedadagrad":
        opts["beta2"] = 0.0
    np.testing.assert_allclose(x, reference(name, x0, means, **opts), rtol=1e-5, atol=1e-6)


def test_fedavgm_by_hand() -> None:
    s = FedAvgM(eta=0.1, momentum=0.9)
    x = s.step(np.array([1.0], np.float32), np.array([0.5], np.float32))
    assert x[0] == pytest.approx(0.95)  # u = 0.5
    x = s.step(x, np.array([0.5], np.float32))
    assert x[0] == pytest.approx(0.86)  # u = 0.9·0.5 + 0.45 = 0.9


def test_fedadam_by_hand() -> None:
    s = FedAdam(eta=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    x = s.step(np.array([1.0], np.float32), np.array([0.5], np.float32))
    # g = 0.5; m = 0.05; v = 0.99·1e-6 + 0.01·0.25 = 0.00250099
    step = 0.01 * 0.05 / (np.sqrt(0.00250099) + 1e-3)
    assert x[0] == pytest.approx(1.0 - step, rel=1e-6)


def test_fedyogi_and_adagrad_by_hand() -> None:
    g = 0.5
    yogi = FedYogi(eta=0.01, beta1=0.0, beta2=0.9, tau=0.1)
    x = yogi.step(np.array([1.0], np.float32), np.array([1.0 - g], np.float32))
    v = 0.01 + 0.1 * g * g  # v0 = τ² < g², so sign(v − g²) = −1 and v grows
    assert x[0] == pytest.approx(1.0 - 0.01 * g / (np.sqrt(v) + 0.1), rel=1e-6)
    ada = FedAdagrad(eta=0.1, beta1=0.0, tau=0.1)
    x = ada.step(np.array([1.0], np.float32), np.array([1.0 - g], np.float32))
    assert x[0] == pytest.approx(1.0 - 0.1 * g / (np.sqrt(0.01 + g * g) + 0.1), rel=1e-6)


@pytest.mark.parametrize(("name", "options"), CASES)
def test_state_dict_resumes_exactly(name: str, options: dict[str, float]) -> None:
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(64).astype(np.float32)
    means = [(x0 + rng.standard_normal(64) * 0.1).astype(np.float32) for _ in range(3)]
    a = make_strategy(name, **options)
    assert a.state_dict() == {}
    x = a.step(a.step(x0, means[0]), means[1])
    saved = a.state_dict()
    assert saved and all(isinstance(v, np.ndarray) for v in saved.values())
    b = make_strategy(name, **options)
    b.load_state_dict({k: v.copy() for k, v in saved.items()})
    assert np.array_equal(a.step(x, means[2]), b.step(x, means[2]))
    with pytest.raises(ConfigError):
        make_strategy(name, **options).load_state_dict({"bogus": np.zeros(64, np.float32)})


def test_fedavg_step_is_the_mean_and_aggregate_is_weighted() -> None:
    s = FedAvg()
    stack = np.array([[1.0, 2.0], [3.0, 6.0]], np.float32)
    new = s.aggregate(np.zeros(2, np.float32), stack, [1.0, 3.0])
    np.testing.assert_allclose(new, [2.5, 5.0])
    with pytest.raises(LayoutError):
        s.step(np.zeros(3, np.float32), new)
    with pytest.raises(ConfigError):
        s.load_state_dict({"m": np.zeros(2, np.float32)})


def test_no_op_when_clients_agree_with_the_server() -> None:
    x = np.linspace(-1, 1, 50, dtype=np.float32)
    for name, options in CASES:
        assert np.array_equal(make_strategy(name, **options).step(x, x.copy()), x), name
