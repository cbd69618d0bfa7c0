"""Coordinate-sharded aggregation equals the unsharded references, within a memory cap."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from strato.aggregation import _shard_handler
from strato.aggregation._inputs import file_ref
from strato.aggregation.sharded import ShardedRound, shard_ranges
from strato.control.autoscaler import choose_shards
from strato.errors import ConfigError, FunctionError, LayoutError, StratoError
from strato.services._runtime_process import ProcessRuntime
from strato.services.shm import ShmLease, ShmPool
from strato.strategy import make_strategy
from strato.strategy.fedavg import weighted_mean
from strato.strategy.robust import krum_select, trimmed_mean

F32 = np.float32


@pytest.fixture(scope="module")
def runtime() -> Iterator[ProcessRuntime]:
    with ProcessRuntime() as rt:
        yield rt


@pytest.fixture(scope="module")
def pool() -> Iterator[ShmPool]:
    with ShmPool() as p:
        yield p


def shm_updates(pool: ShmPool, stack: np.ndarray) -> list[ShmLease]:
    leases = []
    for row in stack:
        lease = pool.lease(row.nbytes)
        np.frombuffer(lease.buffer, dtype=F32)[:] = row
        leases.append(lease)
    return leases


def file_updates(tmp: Path, stack: np.ndarray, *, skew: int = 12) -> list[dict[str, Any]]:
    """All updates in one blob file, each at its own (unaligned-to-pages) offset."""
    path = tmp / "updates.bin"
    with open(path, "wb") as f:
        f.write(b"\0" * skew)
        stack.astype(F32).tofile(f)
    row = stack.shape[1] * 4
    return [file_ref(path, skew + i * row, row) for i in range(stack.shape[0])]


def run(runtime: ProcessRuntime, name: str, options: dict[str, Any], stack: np.ndarray,
        weights: np.ndarray, refs: list[Any], shards: int | None, **kw: Any
        ) -> tuple[np.ndarray, Any]:
    k, n = stack.shape
    with ShardedRound(runtime, name, options, n, k, shards, **kw) as rnd:
        for i, ref in enumerate(refs):
            assert rnd.add(f"c{i}", ref, float(weights[i]))
        model = rnd.result(timeout=60)
        return model, rnd.stats()


def release(leases: list[ShmLease]) -> None:
    for lease in leases:
        lease.release()


def test_shard_ranges_cover_the_model_evenly() -> None:
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_ranges(5, 5) == [(i, i + 1) for i in range(5)]
    with pytest.raises(ConfigError):
        shard_ranges(3, 4)


@pytest.mark.parametrize(("k", "n"), [(1, 1001), (4, 7919), (7, 10_007)])
def test_median_equals_numpy_exactly_for_any_shard_count(
    runtime: ProcessRuntime, pool: ShmPool, tmp_path: Path, k: int, n: int
) -> None:
    rng = np.random.default_rng(k)
    stack = rng.standard_normal((k, n)).astype(F32)
    stack[:, :5] = 0.5  # ties
    expected = np.median(stack, axis=0)
    leases = shm_updates(pool, stack)
    files = file_updates(tmp_path, stack)
    try:
        for shards in range(1, 6):
            # half the updates by shared memory, half by file
            refs = [leases[i] if i % 2 else files[i] for i in range(k)]
            model, stats = run(runtime, "fedmedian", {}, stack, np.ones(k), refs, shards)
            assert model.dtype == F32
            assert np.array_equal(model, expected), shards
            assert stats.shards == shards and stats.updates == k
            assert stats.ranges == tuple(shard_ranges(n, shards))
            assert len({p for pids in stats.pids for p in pids}) == shards  # own processes
    finally:
        release(leases)


def test_trimmed_mean_and_mean_equal_the_unsharded_functions(
    runtime: ProcessRuntime, pool: ShmPool
) -> None:
    rng = np.random.default_rng(5)
    stack = (rng.standard_normal((9, 20_011)) * 3 + 1).astype(F32)
    weights = rng.uniform(1, 100, size=9)
    leases = shm_updates(pool, stack)
    try:
        for shards, beta in ((1, 0.0), (2, 0.1), (5, 0.34)):
            model, _ = run(runtime, "trimmedmean", {"beta": beta}, stack, weights, leases, shards)
            np.testing.assert_allclose(model, trimmed_mean(stack, beta), rtol=1e-6, atol=1e-7)
        for name in ("fedavg", "fedadam", "fedavg"):  # any streaming strategy: the mean
            model, stats = run(runtime, name, {}, stack, weights, leases, 4)
            np.testing.assert_allclose(model, weighted_mean(stack, weights), rtol=1e-6)
        assert stats.cold_starts == 0 and stats.billed_s > 0  # the same four, warm
    finally:
        release(leases)


@pytest.mark.parametrize(("f", "m"), [(1, 1), (2, 3), (2, 5)])
def test_krum_picks_what_unsharded_krum_picks(
    runtime: ProcessRuntime, pool: ShmPool, tmp_path: Path, f: int, m: int
) -> None:
    rng = np.random.default_rng(10 * f + m)
    center = rng.standard_normal(30_001).astype(F32)
    spread = rng.uniform(0.01, 1.0, size=(10, 1)).astype(F32)  # distinct scores
    stack = center + spread * rng.standard_normal((10, 30_001)).astype(F32)
    stack[4] += 50.0  # a poisoned one
    weights = rng.uniform(1, 10, size=10)
    chosen = krum_select(stack, f, m)
    assert 4 not in chosen
    expected = make_strategy("krum", f=f, m=m).reduce(stack, weights)
    refs = file_updates(tmp_path, stack, skew=4)
    for shards in (1, 3, 4):
        with ShardedRound(runtime, "krum", {"f": f, "m": m}, 30_001, 10, shards) as rnd:
            for i, ref in enumerate(refs):
                rnd.add(f"c{i}", ref, float(weights[i]))
            model = rnd.result(timeout=60)
            assert rnd.selected == tuple(chosen.tolist())
        if m == 1:
            assert np.array_equal(model, stack[chosen[0]])
        np.testing.assert_allclose(model, expected, rtol=1e-6, atol=1e-7)


def test_a_round_reduces_what_arrived_and_refuses_the_rest(
    runtime: ProcessRuntime, pool: ShmPool
) -> None:
    rng = np.random.default_rng(2)
    stack = rng.standard_normal((6, 3001)).astype(F32)
    leases = shm_updates(pool, stack)
    try:
        with ShardedRound(runtime, "fedmedian", None, 3001, 5, 2) as rnd:
            assert rnd.add("a", leases[0]) and rnd.add("b", leases[1].ref)
            assert not rnd.add("a", leases[2])  # same client again
            assert rnd.add("c", leases[2].to_dict())
            with pytest.raises(LayoutError, match="float32"):
                rnd.add("d", {**leases[3].to_dict(), "nbytes": 8})
            with pytest.raises(ValueError, match="weight"):
                rnd.add("d", leases[3], 0.0)
            model = rnd.result()  # a quorum of 3 of the 5 expected
            assert np.array_equal(model, np.median(stack[:3], axis=0))
            assert rnd.result() is model
            assert not rnd.add("e", leases[4])  # the round is closed
            assert rnd.stats().refused == 2 and rnd.stats().updates == 3
        with ShardedRound(runtime, "krum", {"f": 1}, 3001, 6, 2) as rnd:
            for i in range(4):
                rnd.add(f"c{i}", leases[i])
            with pytest.raises(ConfigError, match="at least 5"):
                rnd.result()
    finally:
        release(leases)


def test_close_without_result_drops_the_shards_state(
    runtime: ProcessRuntime, pool: ShmPool
) -> None:
    stack = np.ones((3, 500), F32)
    leases = shm_updates(pool, stack)
    try:
        rnd = ShardedRound(runtime, "fedmedian", {}, 500, 3, 2)
        for i, lease in enumerate(leases):
            rnd.add(f"c{i}", lease)
        rnd.close()
        out = pool.lease(4 * 250)
        with pytest.raises(FunctionError, match="not in worker"):
            runtime.invoke(rnd._lanes[0].function, {"op": "median", "round": rnd._token,
                                                   "k": 3, "out": out.to_dict()})
        out.release()
    finally:
        release(leases)


def test_bad_inputs_fail_the_round_with_the_shards_error(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    good = tmp_path / "good.bin"
    np.ones(100, F32).tofile(good)
    with ShardedRound(runtime, "fedmedian", {}, 100, 3, 2) as rnd:
        rnd.add("gone", file_ref(tmp_path / "missing.bin", 0, 400))
        with pytest.raises(FunctionError):
            rnd._wait_adds(30)  # the first add has failed on every shard
        assert rnd.add("late", file_ref(good, 0, 400))  # a failed round must not hang
        with pytest.raises(FunctionError, match="does not exist"):
            rnd.result(timeout=30)


def test_explicit_shards_must_fit_the_memory_and_strategies_must_shard(
    runtime: ProcessRuntime,
) -> None:
    fewest = choose_shards(16, 4 * 2_000_000, 100)
    assert fewest >= 3
    with pytest.raises(ConfigError, match=f"at least {fewest}"):
        ShardedRound(runtime, "fedmedian", {}, 2_000_000, 16, fewest - 1, 100)
    with pytest.raises(ConfigError, match="at least 5"):
        ShardedRound(runtime, "krum", {"f": 1}, 100, 4)
    with pytest.raises(ConfigError, match="unknown option"):
        ShardedRound(runtime, "trimmedmean", {"f": 1}, 100, 4)


def test_median_of_16_x_2m_keeps_every_shard_under_its_memory_cap(
    runtime: ProcessRuntime, pool: ShmPool
) -> None:
    k, n, cap = 16, 2_000_000, 128  # 128 MB of updates, 128 MiB per function
    rng = np.random.default_rng(7)
    base = rng.standard_normal(n).astype(F32)
    leases = []
    for i in range(k):  # fill one at a time: no (K, n) stack in this process
        lease = pool.lease(4 * n)
        x = np.frombuffer(lease.buffer, dtype=F32)
        np.multiply(base, F32(1 + 0.01 * i), out=x)
        x[i::k] += F32(i)
        leases.append(lease)
    try:
        model, stats = run(runtime, "fedmedian", {}, np.empty((k, n)), np.ones(k), leases,
                           None, function_memory_mb=cap)
        assert stats.shards == choose_shards(k, 4 * n, cap) >= 3
        assert 0 < stats.max_peak_rss_mb <= cap, stats.to_dict()
        # the matrix alone is (k × n / shards) × 4 bytes: the peak must include it
        assert stats.max_peak_rss_mb * 2**20 > 4 * k * n / stats.shards
        for lo in (0, n // 2, n - 4096):  # compare on column ranges: no full stack here
            cols = np.stack([np.frombuffer(le.buffer, F32)[lo : lo + 4096] for le in leases])
            assert np.array_equal(model[lo : lo + 4096], np.median(cols, axis=0))
    finally:
        release(leases)


def test_the_handler_refuses_what_it_cannot_do(
    pool: ShmPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # called in this process: the state machine and its errors, without a runtime
    monkeypatch.setattr(_shard_handler, "_reset_peak", lambda: None)  # not pytest's VmHWM
    lease = pool.lease(40)
    np.frombuffer(lease.buffer, F32)[:] = np.arange(10)
    add = {"op": "add", "round": "t1", "mode": "rows", "n": 10, "lo": 2, "hi": 6, "k": 2}
    try:
        with pytest.raises(LayoutError, match="row 5"):
            _shard_handler.handle({**add, "inputs": [{"row": 5, "weight": 1, "ref": lease.ref
                                                      .to_dict()}]})
        reply = _shard_handler.handle({**add, "inputs": [{"row": 0, "weight": 1,
                                                          "ref": lease.to_dict()}]})
        assert reply["rows"] == 1 and reply["pid"] == os.getpid()
        out = pool.lease(16)
        with pytest.raises(StratoError, match="missing rows"):
            _shard_handler.handle({"op": "median", "round": "t1", "k": 2, "out": out.to_dict()})
        with pytest.raises(StratoError, match="unknown shard operation"):
            _shard_handler.handle({"op": "nope", "round": "t1"})
        reply = _shard_handler.handle({"op": "median", "round": "t1", "k": 1,
                                       "out": out.to_dict()})
        assert np.frombuffer(out.buffer, F32).tolist() == [2, 3, 4, 5]
        with pytest.raises(StratoError, match="not in worker"):
            _shard_handler.handle({"op": "median", "round": "t1", "k": 1, "out": out.to_dict()})
        assert _shard_handler.handle({"op": "drop", "round": "t1"})["rows"] == 0
        out.release()
    finally:
        lease.release()
    assert _shard_handler.chunk_columns(64) * 16 * 65 <= 16 << 20
    assert _shard_handler.chunk_columns(10**9) == 1
