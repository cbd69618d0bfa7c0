"""The streaming FedAvg accumulator: any tree of merged partials is the flat mean."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from strato.errors import CodecError, LayoutError
from strato.strategy import _kernels
from strato.strategy.fedavg import PARTIAL_HEADER_SIZE, Accumulator, Partial, weighted_mean


@pytest.fixture(params=["numba", "numpy"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    before = _kernels.backend()
    _kernels.set_backend(request.param)
    yield request.param
    _kernels.set_backend(before)


def flat_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The oracle: the flat float64 weighted mean."""
    w = np.asarray(weights, dtype=np.float64)
    return (w[:, None] * stack.astype(np.float64)).sum(axis=0) / w.sum()


def assert_close_to_mean(got: np.ndarray, stack: np.ndarray, weights: np.ndarray) -> None:
    """``got`` within 1e-6 relative error of the flat float64 weighted mean.

    The absolute slack covers what no summation order can avoid: where values of
    opposite signs cancel, the float64 sums of two orders differ by ~1e-16 of the
    cancelled magnitude (we allow 1e-12 of it), and float32 has no precision below
    its smallest normal number.
    """
    ref = flat_mean(stack, weights)
    w = np.asarray(weights, dtype=np.float64)
    magnitude = (w[:, None] * np.abs(stack.astype(np.float64))).sum(axis=0) / w.sum()
    slack = 1e-12 * magnitude + np.finfo(np.float32).smallest_normal
    err = np.abs(got.astype(np.float64) - ref)
    assert got.dtype == np.float32
    bad = err > 1e-6 * np.abs(ref) + slack
    assert not bad.any(), f"relative error {np.max(err / np.maximum(np.abs(ref), 1e-300))}"


def _build(data: st.DataObject, stack: np.ndarray, weights: np.ndarray, idx: list[int],
           depth: int) -> Partial:
    """A random subtree over updates ``idx``: leaves add, inner nodes merge partials."""
    n = stack.shape[1]
    leaf = depth >= 3 or len(idx) <= 1 or data.draw(st.booleans())
    acc = Accumulator(n)
    if leaf:
        if data.draw(st.booleans()):
            for i in idx:
                acc.add(stack[i], float(weights[i]))
        else:
            acc.add_many([stack[i] for i in idx], [float(weights[i]) for i in idx])
    else:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(idx)), min_size=1, max_size=3)))
        bounds = [0, *cuts, len(idx)]
        for lo, hi in itertools.pairwise(bounds):
            acc.merge(_build(data, stack, weights, idx[lo:hi], depth + 1))
    part = acc.to_partial()
    if data.draw(st.booleans()):  # travel as bytes, as between aggregator functions
        part = Partial.from_bytes(part.to_bytes())
    return part


values = st.floats(min_value=-2.0**100, max_value=2.0**100, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 12),
    n=st.integers(1, 40),
    data=st.data(),
)
def test_any_tree_of_merged_partials_is_the_flat_weighted_mean(k: int, n: int,
                                                               data: st.DataObject) -> None:
    stack = data.draw(arrays(np.float32, (k, n), elements=values))
    weights = np.array(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=k, max_size=k)))
    order = data.draw(st.permutations(range(k)))
    top = Accumulator.from_partial(_build(data, stack, weights, list(order), 0))
    assert top.count == k
    assert top.weight == pytest.approx(weights.sum(), rel=1e-12)
    assert_close_to_mean(top.result(), stack, weights)


def test_hierarchy_matches_flat_mean_to_1e6_on_model_like_updates(backend: str) -> None:
    # Realistic updates (close to each other, mixed signs), 3 levels, strict relative bound.
    rng = np.random.default_rng(7)
    k, n = 40, 50_000
    base = rng.standard_normal(n).astype(np.float32)
    stack = base + 0.01 * rng.standard_normal((k, n)).astype(np.float32)
    weights = rng.integers(10, 600, size=k).astype(np.float64)
    leaves = [Accumulator(n) for _ in range(8)]
    for i in range(k):
        leaves[i % 8].add(stack[i], weights[i])
    middles = [Accumulator(n), Accumulator(n)]
    for j, leaf in enumerate(leaves):
        middles[j % 2].merge(Partial.from_bytes(leaf.to_partial().to_bytes()))
    top = Accumulator(n)
    for m in middles:
        top.merge(m)
    ref = flat_mean(stack, weights)
    got = top.result().astype(np.float64)
    mask = np.abs(ref) > 1e-3  # relative error is meaningless at exact zeros
    assert np.max(np.abs(got - ref)[mask] / np.abs(ref)[mask]) < 1e-6


def test_backends_are_bit_identical() -> None:
    rng = np.random.default_rng(1)
    k, n = 9, 3 * _kernels.BLOCK + 17
    stack = (rng.standard_normal((k, n)) * 10.0 ** rng.integers(-5, 5, (k, 1))).astype(np.float32)
    weights = rng.random(k) + 0.01
    sums = {}
    before = _kernels.backend()
    try:
        for name in ("numba", "numpy"):
            _kernels.set_backend(name)
            acc = Accumulator(n)
            acc.add(stack[0], weights[0])
            acc.add_many(stack[1:], weights[1:])
            sums[name] = acc.sum.copy()
    finally:
        _kernels.set_backend(before)
    assert np.array_equal(sums["numba"], sums["numpy"])


@pytest.fixture(params=["in order", "thread pool"])
def runner(request: pytest.FixtureRequest) -> Iterator[str]:
    """The ranges of a split add run in order on the calling thread (the default), or
    at once on threads the caller owns (a runner it installs; aggregation's to own)."""
    if request.param == "in order":
        previous = _kernels.set_runner(None)
        yield request.param
        _kernels.set_runner(previous)
        return
    ran: list[int] = []
    with ThreadPoolExecutor(max_workers=4) as pool:

        def run(tasks: Sequence[Callable[[], None]]) -> None:
            ran.append(len(tasks))
            for fut in [pool.submit(t) for t in tasks]:
                fut.result()

        previous = _kernels.set_runner(run)
        try:
            yield request.param
        finally:
            _kernels.set_runner(previous)
    assert ran and all(n > 1 for n in ran)  # the adds were split and ran on the pool


def test_threads_give_the_same_bits(backend: str, runner: str) -> None:
    rng = np.random.default_rng(2)
    n = 40 * _kernels.BLOCK + 5  # large enough to be split
    stack = rng.standard_normal((5, n)).astype(np.float32)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    one, two = Accumulator(n), Accumulator(n, threads=2)
    for acc in (one, two):
        acc.add(stack[0], weights[0])
        acc.add_many(stack[1:], weights[1:])
    assert np.array_equal(one.sum, two.sum)


def test_the_kernels_start_no_threads(backend: str) -> None:
    import threading

    previous = _kernels.set_runner(None)
    try:
        before = threading.active_count()
        acc = Accumulator(40 * _kernels.BLOCK, threads=2)
        acc.add(np.ones(acc.n, dtype=np.float32), 1.0)
        assert threading.active_count() == before and acc.result()[-1] == 1.0
    finally:
        _kernels.set_runner(previous)


def test_add_takes_read_only_shared_buffers_and_float64(backend: str) -> None:
    rng = np.random.default_rng(3)
    stack = rng.standard_normal((3, 1000)).astype(np.float32)
    frozen = np.frombuffer(stack[0].tobytes(), dtype=np.float32)  # read-only, like an shm view
    assert not frozen.flags.writeable
    acc = Accumulator(1000)
    acc.add(frozen, 2.0)
    acc.add_many([stack[1], stack[2].astype(np.float64)], [1.0, 3.0])  # mixed dtypes
    assert_close_to_mean(acc.result(), stack, np.array([2.0, 1.0, 3.0]))


def test_reset_reuses_the_buffer_for_the_next_round(backend: str) -> None:
    rng = np.random.default_rng(4)
    acc = Accumulator(500)
    address = acc.sum.ctypes.data
    acc.add(rng.standard_normal(500).astype(np.float32), 5.0)
    acc.reset()
    assert acc.count == 0 and acc.weight == 0.0 and not acc.sum.any()
    stack = rng.standard_normal((4, 500)).astype(np.float32)
    acc.add_many(stack, [1.0, 1.0, 2.0, 2.0])
    assert acc.sum.ctypes.data == address
    out = np.empty(500, dtype=np.float32)
    assert acc.result(out) is out
    assert_close_to_mean(out, stack, np.array([1.0, 1.0, 2.0, 2.0]))


def test_weighted_mean_batch_helper(backend: str) -> None:
    rng = np.random.default_rng(5)
    stack = rng.standard_normal((6, 777)).astype(np.float32)
    weights = rng.random(6) + 0.1
    assert_close_to_mean(weighted_mean(stack, weights), stack, weights)
    with pytest.raises(LayoutError):
        weighted_mean(stack[0], weights[:1])


def test_partial_bytes_round_trip_is_zero_copy_and_checked() -> None:
    acc = Accumulator(10)
    acc.add(np.arange(10, dtype=np.float32), 3.0)
    part = acc.to_partial()
    raw = part.to_bytes()
    assert len(raw) == part.nbytes == Partial.encoded_size(10) == PARTIAL_HEADER_SIZE + 80
    back = Partial.from_bytes(raw)
    assert (back.weight, back.count) == (3.0, 1)
    assert np.array_equal(back.sum, part.sum)
    assert not back.sum.flags.owndata  # a view of the received bytes
    into = bytearray(part.nbytes)
    assert part.write_into(into) == part.nbytes and bytes(into) == raw

    with pytest.raises(CodecError, match="truncated"):
        Partial.from_bytes(raw[:10])
    with pytest.raises(CodecError, match="needs"):
        Partial.from_bytes(raw[:-8])
    with pytest.raises(CodecError, match="magic"):
        Partial.from_bytes(b"X" * len(raw))
    with pytest.raises(LayoutError):
        Accumulator(11).merge(back)


def test_bad_inputs_are_refused_and_change_nothing(backend: str) -> None:
    acc = Accumulator(4)
    acc.add(np.ones(4, dtype=np.float32), 1.0)
    before = acc.sum.copy()
    bad_calls: list[tuple[Any, ...]] = [
        (np.ones(5, dtype=np.float32), 1.0),
        (np.ones(4, dtype=np.float32), 0.0),
        (np.ones(4, dtype=np.float32), float("nan")),
        (np.ones(4, dtype=np.float32), -2.0),
        (np.ones(4, dtype=np.int32), 1.0),
    ]
    for update, weight in bad_calls:
        with pytest.raises((ValueError, LayoutError)):
            acc.add(update, weight)
    with pytest.raises(ValueError):
        acc.add_many([np.ones(4, dtype=np.float32)] * 2, [1.0])
    assert np.array_equal(acc.sum, before) and acc.count == 1
    with pytest.raises(ValueError, match="no updates"):
        Accumulator(4).result()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_finds_nan_and_inf_anywhere(backend: str, dtype: type) -> None:
    from strato.strategy import all_finite

    n = 2 * _kernels.BLOCK + 3
    x = np.linspace(-3e38 if dtype == np.float32 else -1e300, 3e38 if dtype == np.float32
                    else 1e300, n).astype(dtype)
    assert all_finite(x)
    assert all_finite(np.empty(0, dtype=dtype))
    for pos in (0, 1, _kernels.BLOCK - 1, _kernels.BLOCK, n - 1):
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[pos] = bad
            assert not all_finite(y), (pos, bad)
