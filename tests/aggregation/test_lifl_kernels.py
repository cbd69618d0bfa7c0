"""The aggregation kernel equals the plain numpy formula, in both precisions."""

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
    saved = dict(_kernels._FUSED)
    if not fused:
        _kernels._FUSED["fused"] = None
    try:
        yield
    finally:
        _kernels._FUSED.clear()
        _kernels._FUSED.update(saved)


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
    fused=st.booleans(),  # float32: numba's one-pass kernel, or the BLAS fallback
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
