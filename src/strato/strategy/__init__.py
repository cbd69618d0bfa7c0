"""Server strategies: pure functions over flat float32 parameter buffers.

No I/O, no clocks, no globals: the coordinator and the aggregator functions call
these. Every strategy has the same small interface (``Strategy`` in ``_base``):

``streaming``
    True when the round needs only the weighted mean of the updates (fedavg,
    fedavgm, fedadam, fedyogi, fedadagrad, fedprox): aggregate eagerly with an
    ``Accumulator`` as updates arrive, merge partials up a tree of aggregators, and
    pass ``acc.result()`` to ``step``. False (fedmedian, trimmedmean, krum): keep
    the round's updates and call ``reduce`` on all of them at once.
``min_updates``
    The fewest updates a round needs (Krum: ``2f + 3``); check it against the quorum.
``reduce(updates, weights) -> reduced``
    ``(K, n)`` client models and ``K`` positive weights (e.g. example counts) to one
    model: the weighted mean, or the robust combination.
``step(global_flat, reduced) -> new_global``
    The server update: FedAvg returns ``reduced``; the server optimisers take the
    pseudo-gradient ``global − reduced``. Updates are client *models*, not deltas.
``aggregate(global_flat, updates, weights)``
    ``step(global_flat, reduce(updates, weights))`` in one call.
``client_options()``
    What clients need for local training (FedProx: ``{"mu": μ}``).
``state_dict()`` / ``load_state_dict(state)``
    Server state as a dict of numpy arrays for checkpoints (``{}`` when stateless).

Typical eager round::

    strategy = make_strategy("fedadam", eta=0.01)
    acc = Accumulator(n)                 # once; acc.reset() every round
    for update, examples in arrivals:    # as they arrive
        acc.add(update, examples)
    new_global = strategy.step(global_flat, acc.result())
"""

from __future__ import annotations

import inspect
from typing import Any

from strato.errors import ConfigError
from strato.strategy._base import Strategy
from strato.strategy.fedavg import (
    PARTIAL_HEADER_SIZE,
    Accumulator,
    FedAvg,
    Partial,
    all_finite,
    weighted_mean,
)
from strato.strategy.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from strato.strategy.fedprox import FedProx, proximal_term
from strato.strategy.robust import FedMedian, Krum, TrimmedMean

__all__ = [
    "PARTIAL_HEADER_SIZE",
    "STRATEGIES",
    "Accumulator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedProx",
    "FedYogi",
    "Krum",
    "Partial",
    "Strategy",
    "TrimmedMean",
    "all_finite",
    "make_strategy",
    "option_names",
    "proximal_term",
    "weighted_mean",
]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx, FedMedian,
                TrimmedMean, Krum)
}


def option_names(name: str) -> list[str]:
    """The options strategy ``name`` accepts."""
    cls = _lookup(name)
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _lookup(name: str) -> type[Strategy]:
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    try:
        return STRATEGIES[key]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r} (valid: {', '.join(STRATEGIES)})") from None


def make_strategy(name: str, **options: Any) -> Strategy:
    """A strategy by name with its options; ConfigError for an unknown name or option."""
    cls = _lookup(name)
    valid = option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        accepted = ", ".join(valid) if valid else "none"
        raise ConfigError(f"strategy {cls.name}: unknown option {', '.join(unknown)} "
                          f"(accepted: {accepted})")
    return cls(**options)
