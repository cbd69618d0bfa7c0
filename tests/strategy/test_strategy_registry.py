"""make_strategy: names, options, one-line errors; FedProx's proximal term."""

from __future__ import annotations

import numpy as np
import pytest

from strato.errors import ConfigError
from strato.strategy import STRATEGIES, Strategy, make_strategy, option_names, proximal_term

NAMES = ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "fedmedian",
         "trimmedmean", "krum"]


def test_every_named_strategy_is_registered_with_defaults() -> None:
    assert sorted(STRATEGIES) == sorted(NAMES)
    for name in NAMES:
        s = make_strategy(name)
        assert isinstance(s, Strategy) and s.name == name
        assert s.streaming == (name not in ("fedmedian", "trimmedmean", "krum"))
        assert set(s.options()) <= set(option_names(name))


def test_names_are_forgiving_about_case_and_separators() -> None:
    assert make_strategy("Trimmed_Mean").name == "trimmedmean"
    assert make_strategy(" FedAvg-M ", momentum=0.5).name == "fedavgm"


def test_unknown_name_lists_the_valid_ones_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        make_strategy("fedmagic")
    message = str(info.value)
    assert "\n" not in message and "fedmagic" in message
    assert all(name in message for name in NAMES)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("fedadam", {"lr": 0.1}, "unknown option lr"),
        ("fedavg", {"eta": 1.0}, "accepted: none"),
        ("fedadagrad", {"beta2": 0.9}, "unknown option beta2"),
        ("fedadam", {"eta": -1.0}, "eta"),
        ("fedyogi", {"beta1": 1.0}, "beta1"),
        ("fedadam", {"tau": "small"}, "must be a number"),
        ("fedavgm", {"momentum": True}, "must be a number"),
        ("fedprox", {"mu": float("inf")}, "mu"),
    ],
)
def test_bad_options_are_config_errors(name: str, options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        make_strategy(name, **options)
    assert "\n" not in str(info.value)


def test_fedprox_tells_clients_mu_and_aggregates_like_fedavg() -> None:
    prox = make_strategy("fedprox", mu=0.1)
    assert prox.client_options() == {"mu": 0.1}
    assert make_strategy("fedavg").client_options() == {}
    stack = np.array([[0.0, 4.0], [2.0, 0.0]], np.float32)
    np.testing.assert_allclose(prox.aggregate(np.ones(2, np.float32), stack, [1.0, 1.0]), [1, 2])


def test_proximal_term_value_and_gradient() -> None:
    torch = pytest.importorskip("torch")
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    g = [np.array([0.0, 0.0], np.float32), torch.tensor([[1.0]])]
    term = proximal_term(w, g, mu=0.5)
    assert term.ndim == 0
    assert term.item() == pytest.approx(0.25 * (1 + 4 + 4))
    term.backward()
    assert w[0].grad.tolist() == pytest.approx([0.5, 1.0])  # mu · (w − w_g)
    assert w[1].grad.item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        proximal_term(w, g[:1], mu=0.5)
