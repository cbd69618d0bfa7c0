"""The aggregation kernel equals the plain numpy formula, in both precisions, and leaves
out (with ``check``) exactly the inputs that hold a NaN or ±Inf."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strato.aggregation import _kernels, accumulate
from strato.errors import LayoutError


@contextlib.contextmanager
def kernel(fused: bool) -> Iterator[None]:
    """Run the float32 path with numba's fused kernel, or force the BLAS fallback."""
    saved = _kernels._fused
    if not fused:
        _kernels._fused = lambda: None  # type: ignore[assignment]
    try:
        yield
    finally:
        _kernels._fused = saved  # type: ignore[method-assign]


def reference(acc0: np.ndarray, xs: list[np.ndarray], cs: list[float], fresh: bool) -> np.ndarray:
    total = np.zeros(acc0.shape, np.float64) if fresh else acc0.astype(np.float64)
    for x, c in zip(xs, cs, strict=True):
        total += c * x.astype(np.float64)
    return total


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 700),
    k=st.integers(0, 19),  # past the fused kernel's 8 inputs per pass
    chunk=st.sampled_from([1, 7, 64, 1 << 16]),
    fresh=st.booleans(),
    acc_dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**31),
    fused=st.booleans(),  # numba's one-pass kernel, or the BLAS / axpy_many fallback
)
def test_batch_add_matches_numpy(
    n: int, k: int, chunk: int, fresh: bool, acc_dtype: type, seed: int, fused: bool
) -> None:
    rng = np.random.default_rng(seed)
    acc = rng.standard_normal(n).astype(acc_dtype)
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(k)]
    cs = [float(c) for c in rng.uniform(0.1, 10.0, size=k)]
    want = reference(acc, xs, cs, fresh)
    with kernel(fused):
        accumulate(acc, list(zip(xs, cs, strict=True)), fresh=fresh, chunk=chunk)
    tol = 1e-5 if acc_dtype == np.float32 else 1e-12
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(acc - want).max() <= tol * scale * (k + 1)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 3000),  # several of the fused kernel's 512-value blocks
    k=st.integers(1, 11),
    bad=st.lists(st.tuples(st.integers(0, 10), st.floats(0, 1),
                           st.sampled_from([np.nan, np.inf, -np.inf])), max_size=4),
    fresh=st.booleans(),
    acc_dtype=st.sampled_from([np.float32, np.float64]),
    root=st.booleans(),  # the root's call: scale, and the float32 model written to out
    seed=st.integers(0, 2**31),
    fused=st.booleans(),
    measure=st.booleans(),  # each input's squared distance to a reference (a norm bound)
)
def test_checked_add_leaves_out_exactly_the_non_finite_inputs(
    n: int, k: int, bad: list[tuple[int, float, float]], fresh: bool, acc_dtype: type,
    root: bool, seed: int, fused: bool, measure: bool,
) -> None:
    rng = np.random.default_rng(seed)
    acc = rng.standard_normal(n).astype(acc_dtype)
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(k)]
    cs = [float(c) for c in rng.uniform(0.1, 10.0, size=k)]
    for which, where, value in bad:
        if which < k:
            xs[which][min(n - 1, int(where * n))] = value
    broken = sorted({which for which, _, _ in bad if which < k})
    clean = [i for i in range(k) if i not in broken]
    want = reference(acc, [xs[i] for i in clean], [cs[i] for i in clean], fresh)
    out = np.full(n, np.nan, np.float32) if root else None
    ref = rng.standard_normal(n).astype(np.float32) if measure else None
    dist = np.full(k, -1.0) if measure else None
    with kernel(fused):
        found = accumulate(acc, list(zip(xs, cs, strict=True)), fresh=fresh, check=True,
                           scale=0.5 if root else None, out=out, ref=ref, dist=dist)
    assert sorted(found) == broken
    if ref is not None and dist is not None:
        assert np.isnan(dist[broken]).all()
        want_dist = [float(((xs[i].astype(np.float64) - ref) ** 2).sum()) for i in clean]
        np.testing.assert_allclose(dist[clean], want_dist, rtol=1e-9)
    got = out if out is not None else acc
    factor = 0.5 if root else 1.0
    tol = 1e-5 if acc_dtype == np.float32 else 1e-12
    scale = max(1.0, float(np.abs(want).max()))
    assert np.isfinite(got).all()
    assert np.abs(got - factor * want).max() <= max(tol, 1e-6) * scale * (k + 1)


def test_unchecked_add_lets_a_nan_through() -> None:
    xs = [np.ones(1500, np.float32), np.ones(1500, np.float32)]
    xs[1][1200] = np.nan
    acc = np.zeros(1500, np.float32)
    assert accumulate(acc, [(x, 1.0) for x in xs], fresh=True) == []
    assert np.isnan(acc[1200]) and acc[0] == 2.0 and acc[1499] == 2.0


@pytest.mark.parametrize("acc_dtype", [np.float32, np.float64])
def test_final_scale_writes_the_model(acc_dtype: type) -> None:
    rng = np.random.default_rng(3)
    n = 1000
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    acc = np.empty(n, acc_dtype)
    accumulate(acc, [(xs[0], 2.0), (xs[1], 3.0)], fresh=True, chunk=128)
    out = np.full(n, np.nan, np.float32)
    accumulate(acc, [(xs[2], 5.0)], fresh=False, scale=0.1, out=out, chunk=300)
    want = (2.0 * xs[0] + 3.0 * xs[1] + 5.0 * xs[2]) / 10.0
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    # without an output buffer, the accumulator itself is scaled in place
    accumulate(acc, [], fresh=False, scale=2.0)
    want2 = 2.0 * (2.0 * xs[0] + 3.0 * xs[1] + 5.0 * xs[2])
    np.testing.assert_allclose(acc, want2, rtol=1e-5, atol=1e-5)


def test_fresh_without_inputs_is_zero() -> None:
    acc = np.ones(10, np.float32)
    accumulate(acc, [], fresh=True)
    assert not acc.any()


def test_float64_partials_add_into_float64_accumulators() -> None:
    acc = np.zeros(50, np.float64)
    partial = np.arange(50, dtype=np.float64) * 1e-20  # below float32's resolution of 1.0
    accumulate(acc, [(np.ones(50, np.float32), 1.0), (partial, 1.0)], fresh=False)
    assert np.array_equal(acc, 1.0 + partial)


def test_mismatched_inputs_are_refused() -> None:
    acc = np.zeros(8, np.float32)
    with pytest.raises(LayoutError, match="cannot add"):
        accumulate(acc, [(np.zeros(9, np.float32), 1.0)], fresh=False)
    with pytest.raises(LayoutError, match="cannot add"):
        accumulate(acc, [(np.zeros(8, np.float64), 1.0)], fresh=False)
    with pytest.raises(LayoutError, match="writable"):
        accumulate(np.zeros(8, np.float32)[::2], [], fresh=True)
    with pytest.raises(LayoutError, match="float32/float64"):
        accumulate(np.zeros(8, np.int32), [], fresh=True)
