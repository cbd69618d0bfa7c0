"""The autoscaler policy: keeps up at the fewest function-seconds, reuses warm aggregators."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strato.control import (
    AutoscalerContext,
    AutoscalerState,
    TreeShape,
    aggregator_names,
    decide,
    estimate,
)
from strato.control.autoscaler import choose_shards
from strato.errors import ConfigError


def ctx(rate: float, *, service: float = 0.01, cores: float = 8, updates: int = 1000,
        now: float = 0.0, **kw: object) -> AutoscalerContext:
    return AutoscalerContext(updates, rate, service, 40 << 20, cores, now, **kw)  # type: ignore[arg-type]


def test_light_load_is_one_leaf_that_is_its_own_root() -> None:
    shape, state = decide(ctx(10), AutoscalerState())
    assert shape == TreeShape(1, 1, 1)
    assert aggregator_names(shape) == ["leaf0"]
    assert state.previous == shape and state.decisions == 1


@pytest.mark.parametrize(("rate", "leaves"), [(69, 1), (71, 2), (139, 2), (141, 3), (500, 8)])
def test_leaves_are_the_fewest_that_keep_utilization_under_target(rate: float, leaves: int) -> None:
    # 10 ms per update: a leaf is 70% busy at 70 updates/s; 8 cores cap the leaves
    shape, _ = decide(ctx(rate), AutoscalerState())
    assert shape.leaves == leaves
    est = estimate(shape, ctx(rate), set())
    assert est.keeps_up == (rate <= 8 * 70)


def test_leaves_never_exceed_cores_or_updates() -> None:
    assert decide(ctx(10_000, cores=2), AutoscalerState())[0].leaves == 2
    assert decide(ctx(10_000, updates=3), AutoscalerState())[0].leaves == 3


def test_wide_trees_get_middle_levels() -> None:
    shape, _ = decide(ctx(3000, cores=64, max_fan_in=4), AutoscalerState())
    assert shape.leaves == 43 and shape.fan_in == 4
    assert shape.level_sizes() == [43, 11, 3, 1] and shape.levels == 4
    names = aggregator_names(shape)
    assert len(names) == len(set(names)) == shape.aggregators and names[-1] == "top"


def test_a_tail_budget_trades_function_seconds_for_a_shorter_tail() -> None:
    loose, _ = decide(ctx(600, cores=64), AutoscalerState())
    tight, _ = decide(ctx(600, cores=64, tail_budget_s=0.1), AutoscalerState())
    assert loose.leaves == tight.leaves == 9
    # worst case after the last arrival: one update, then each level merges fan-in partials
    assert loose.level_sizes() == [9, 2, 1] and estimate(loose, ctx(600), set()).tail_s > 0.1
    assert tight.level_sizes() == [9, 3, 1] and tight.fan_in == 4  # 3 would tie: wider wins
    assert estimate(tight, ctx(600), set()).tail_s <= 0.1
    assert estimate(tight, ctx(600), set()).function_s > estimate(loose, ctx(600), set()).function_s


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0, 5000),
    service=st.floats(1e-4, 0.05),
    cores=st.integers(1, 32),
    fan=st.integers(2, 8),
    updates=st.integers(1, 2000),
)
def test_no_cheaper_shape_keeps_up(
    rate: float, service: float, cores: int, fan: int, updates: int
) -> None:
    c = ctx(rate, service=service, cores=cores, updates=updates, max_fan_in=fan)
    shape, _ = decide(c, AutoscalerState())
    chosen = estimate(shape, c, set())
    for leaves in range(1, min(cores, updates) + 1):
        for f in range(2, fan + 1):
            other = estimate(TreeShape.of(leaves, f), c, set())
            if other.keeps_up:
                assert chosen.keeps_up
                assert chosen.function_s <= other.function_s + 1e-12
    if not chosen.keeps_up:  # nothing keeps up: all the parallelism there is
        assert shape.leaves == min(cores, updates)


def test_same_load_next_round_reuses_every_warm_aggregator() -> None:
    c1 = ctx(200, now=100.0)
    shape1, state = decide(c1, AutoscalerState())
    assert estimate(shape1, c1, set()).cold_starts == shape1.aggregators
    c2 = dataclasses.replace(c1, now=110.0)
    shape2, state = decide(c2, state)
    assert shape2 == shape1
    assert estimate(shape2, c2, state.warm_names(110.0, c2.keep_alive_s)).cold_starts == 0
    assert dict(state.warm) == {name: 110.0 for name in aggregator_names(shape2)}


def test_idle_aggregators_are_forgotten_after_keep_alive() -> None:
    _, state = decide(ctx(300, now=0.0, keep_alive_s=30), AutoscalerState())
    assert state.warm_names(29.0, 30) == set(aggregator_names(TreeShape.of(5)))
    shape, state = decide(ctx(10, now=100.0, keep_alive_s=30), state)
    assert shape.leaves == 1
    assert dict(state.warm) == {"leaf0": 100.0}  # the rest scaled to zero


def test_scale_up_is_immediate_scale_down_waits_for_a_margin() -> None:
    _, state = decide(ctx(130), AutoscalerState())  # 1.3 cores of work: 2 leaves
    assert state.previous is not None and state.previous.leaves == 2
    # 0.65 cores: one leaf would be 65% busy, under 70% but above the 56% margin
    shape, state = decide(ctx(65), state)
    assert shape.leaves == 2
    shape, state = decide(ctx(50), state)  # 50% busy: clearly enough with one
    assert shape.leaves == 1
    shape, state = decide(ctx(75), state)  # over the target: grow at once
    assert shape.leaves == 2


def test_the_policy_is_pure() -> None:
    state = AutoscalerState(warm=(("leaf0", 1.0),), previous=TreeShape.of(1), decisions=3)
    frozen = dataclasses.replace(state)
    assert decide(ctx(500, now=2.0), state) == decide(ctx(500, now=2.0), state)
    assert state == frozen


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("arrival_rate", -1.0, "arrival_rate"),
        ("cores", 0, "cores"),
        ("target_utilization", 1.5, "target_utilization"),
        ("max_fan_in", 1, "max_fan_in"),
    ],
)
def test_bad_context_is_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(ctx(1), **{field: value})


def test_tree_shapes_are_consistent() -> None:
    with pytest.raises(ConfigError, match="levels"):
        TreeShape(4, 2, 2)
    with pytest.raises(ConfigError, match="fan-in"):
        TreeShape(3, 1, 2)
    assert TreeShape.of(3, 8) == TreeShape(3, 3, 2)  # a fan-in over the leaves is flat
    assert TreeShape.of(1, 8) == TreeShape(1, 1, 1)


def test_replaying_arrivals_counts_what_is_left_when_the_last_lands() -> None:
    from strato.control.autoscaler import simulate_leaves

    # four updates at once, 1 s each: one leaf still has 3 s queued after the last,
    # two leaves 1 s, four none; at most 3, 2, 0 wait at once
    burst = (0.0, 0.0, 0.0, 0.0)
    assert simulate_leaves(burst, 1, 1.0) == (3.0, 3)
    assert simulate_leaves(burst, 2, 1.0) == (1.0, 2)
    assert simulate_leaves(burst, 4, 1.0) == (0.0, 0)
    # spread out, one leaf keeps up
    assert simulate_leaves((0.0, 2.0, 4.0), 1, 1.0) == (0.0, 0)


def test_a_burst_that_drains_before_the_last_arrival_needs_one_leaf() -> None:
    # 50 updates in 0.25 s at 12.5 ms each (2.5 cores' worth at the peak), then a
    # sparse tail for 2 s: by the last arrival one leaf has long caught up
    trace = tuple(i * 0.005 for i in range(50)) + tuple(0.3 + i * 0.2 for i in range(10))
    c = ctx(200.0, service=0.0125, cores=8, updates=60, arrival_offsets=trace)
    assert estimate(TreeShape.of(1), c, set()).utilization > 1  # the peak alone says "more"
    shape, _ = decide(c, AutoscalerState())
    assert shape.leaves == 1
    # ...unless memory caps how many updates may wait: then the burst must be absorbed
    capped = dataclasses.replace(c, max_queued=5)
    assert decide(capped, AutoscalerState())[0].leaves == 3


def test_a_load_that_never_lets_up_gets_enough_leaves_to_drain() -> None:
    # one update a second, 2.5 s each, until the very end: 2.5 cores' worth
    trace = tuple(float(i) for i in range(100))
    c = ctx(1.0, service=2.5, cores=8, updates=100, arrival_offsets=trace)
    assert decide(c, AutoscalerState())[0].leaves == 3
    assert decide(dataclasses.replace(c, cores=2), AutoscalerState())[0].leaves == 2


# ---- choose_shards: coordinate shards of a robust aggregation under a memory cap ------

MiB = 1 << 20


def shard_peak(updates: int, update_bytes: int, shards: int, overhead_mb: int = 64,
               scratch_mb: int = 16) -> int:
    """The model choose_shards budgets: process + scratch + (rows held + 1 read) × slice."""
    coordinates = -(-update_bytes // 4)
    columns = -(-coordinates // shards)
    return (overhead_mb + scratch_mb) * MiB + 4 * (updates + 1) * columns


def test_choose_shards_is_the_fewest_that_fit() -> None:
    assert choose_shards(1, 4, 1024) == 1
    assert choose_shards(64, 100_000_000, 1024) == 7  # 64 × 25M float32 in 1 GiB functions
    for updates, nbytes, mb in [(64, 100_000_000, 1024), (16, 8_000_000, 100),
                                (10, 4 * 1001, 81), (1000, 4 * 10**6, 256), (2, 400 * MiB, 128)]:
        m = choose_shards(updates, nbytes, mb)
        assert shard_peak(updates, nbytes, m) <= mb * MiB
        if m > 1:
            assert shard_peak(updates, nbytes, m - 1) > mb * MiB


def test_choose_shards_budget_edges() -> None:
    assert choose_shards(10, 4 * 7, 81, overhead_mb=64, scratch_mb=16) == 1
    assert choose_shards(3, 4 * 5, 1, overhead_mb=0, scratch_mb=0) == 1
    # columns of 3 updates (+1 read) that fit in 1 MiB beside one column's float64 scratch
    tight = (MiB - 16 * 4) // (4 * 4)
    assert choose_shards(3, 4 * tight, 1, overhead_mb=0, scratch_mb=0) == 1
    assert choose_shards(3, 4 * (tight + 1), 1, overhead_mb=0, scratch_mb=0) == 2
    assert choose_shards(3, 4 * (2 * tight + 1), 1, overhead_mb=0, scratch_mb=0) == 3
    assert choose_shards(1, 4 * 10**6, 100) == 1
    # more memory never needs more shards, more updates never fewer
    for mb in range(100, 2000, 97):
        assert choose_shards(64, 10**8, mb + 97) <= choose_shards(64, 10**8, mb)
        assert choose_shards(65, 10**8, mb) >= choose_shards(64, 10**8, mb)


def test_choose_shards_refuses_what_cannot_fit() -> None:
    with pytest.raises(ConfigError, match="even for one coordinate"):
        choose_shards(16, 10**6, 80)  # the 64 MiB process and 16 MiB scratch fill it
    with pytest.raises(ConfigError, match="even for one coordinate"):
        choose_shards(10**7, 4, 100)  # ten million rows of one coordinate: 80 MB + 160 MB
    with pytest.raises(ConfigError, match="updates"):
        choose_shards(0, 4, 100)
    with pytest.raises(ConfigError, match="no float32"):
        choose_shards(1, 3, 100)
    with pytest.raises(ConfigError, match="function_memory_mb"):
        choose_shards(1, 4, 0)
