"""LIFL end to end: any tree on any nodes gives the flat weighted mean, and the data
plane keeps its promises (warm reuse, locality, bounded memory, clean failure)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.aggregation import Cluster, Node
from strato.control import TreeShape, build_tree, cross_node_bytes
from strato.errors import ConfigError, StratoError
from strato.services.shm import ShmError

F32 = np.float32


def flat_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return (w[:, None] * stack.astype(np.float64)).sum(axis=0) / w.sum()


def assert_close_to_mean(
    got: np.ndarray, stack: np.ndarray, weights: np.ndarray, acc_dtype: str = "F64"
) -> None:
    """F64 sums: the bar of tests/strategy/test_fedavg_accumulator.py, 1e-6 relative
    error with slack only for what no summation order avoids (cancellation, float32
    subnormals). F32 sums: float32 rounding, a few eps32 per term of the magnitude."""
    ref = flat_mean(stack, weights)
    w = np.asarray(weights, dtype=np.float64)
    magnitude = (w[:, None] * np.abs(stack.astype(np.float64))).sum(axis=0) / w.sum()
    tiny = np.finfo(np.float32).smallest_normal
    if acc_dtype == "F64":
        allowed = 1e-6 * np.abs(ref) + 1e-12 * magnitude + tiny
    else:
        allowed = (len(stack) + 4) * np.finfo(np.float32).eps * magnitude + 4 * tiny
    err = np.abs(got.astype(np.float64) - ref)
    assert got.dtype == np.float32
    bad = err > allowed
    assert not bad.any(), f"relative error {np.max(err / np.maximum(np.abs(ref), 1e-300))}"


def run_round(
    cluster: Cluster,
    round_no: int,
    stack: np.ndarray,
    weights: np.ndarray,
    shape: TreeShape,
    *,
    policy: str = "best-fit",
    acc_dtype: str = "F32",
    batch: int = 4,
    nodes: list[str] | None = None,
) -> tuple[np.ndarray, Any]:
    nodes = nodes or sorted(cluster.nodes)
    landing: dict[str, int] = {}
    for i in range(len(stack)):
        name = nodes[i % len(nodes)]
        landing[name] = landing.get(name, 0) + 1
    plan = cluster.plan(shape, landing, policy=policy)
    rnd = cluster.begin_round(
        round_no, plan, nbytes=stack.shape[1] * 4, acc_dtype=acc_dtype, batch=batch
    )
    for i, update in enumerate(stack):
        assert rnd.ingest(nodes[i % len(nodes)], update, client=f"c{i}", weight=weights[i])
    result = rnd.result(timeout=60)
    model = result.array.copy()
    result.release()
    return model, rnd.stats()


def segments_of(cluster: Cluster) -> list[str]:
    return [name for node in cluster.nodes.values() for name in node.pool.segment_names]


def left_in_dev_shm(names: list[str]) -> list[str]:
    return sorted(set(names) & set(os.listdir("/dev/shm")))


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[Cluster]:
    cluster = Cluster.local(3, cores=2.0)  # small models: "auto" runs them on node threads
    yield cluster
    names = segments_of(cluster)
    cluster.close()
    assert names and left_in_dev_shm(names) == []


ROUND = iter(range(10**9))
values = st.floats(min_value=-2.0**100, max_value=2.0**100, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(data=st.data(), clients=st.integers(1, 16), n=st.integers(1, 40),
       bulk=st.integers(0, 2000), seed=st.integers(0, 2**32 - 1))
def test_any_tree_on_any_nodes_is_the_flat_weighted_mean(
    three_nodes: Cluster, data: st.DataObject, clients: int, n: int, bulk: int, seed: int
) -> None:
    # adversarial values (huge, tiny, cancelling) from hypothesis, plus a random bulk
    drawn = np.asarray(
        data.draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=clients,
                           max_size=clients)), dtype=F32)
    noise = np.random.default_rng(seed).standard_normal((clients, bulk)).astype(F32)
    stack = np.ascontiguousarray(np.concatenate([drawn, noise], axis=1))
    weights = np.asarray(data.draw(st.lists(st.floats(0.01, 1e4), min_size=clients,
                                            max_size=clients)))
    used = data.draw(st.integers(1, 3))
    leaves = data.draw(st.integers(1, min(6, clients)))
    shape = TreeShape.of(leaves, data.draw(st.integers(2, 3)))
    acc_dtype = data.draw(st.sampled_from(["F32", "F64"]))
    model, stats = run_round(
        three_nodes, next(ROUND), stack, weights, shape,
        policy=data.draw(st.sampled_from(["best-fit", "round-robin"])),
        acc_dtype=acc_dtype, batch=data.draw(st.integers(1, 5)),
        nodes=[f"n{i}" for i in range(used)],
    )
    assert_close_to_mean(model, stack, weights, acc_dtype)
    assert sum(a.inputs for a in stats.aggregators if a.level == 0) == clients


def test_runtime_functions_stay_warm_across_rounds() -> None:
    rng = np.random.default_rng(1)
    stack = rng.standard_normal((12, 2000)).astype(F32)
    weights = rng.uniform(1, 10, size=12)
    with Cluster.local(1, cores=2.0, executor="runtime") as cluster:
        shape = TreeShape.of(2)
        first, s1 = run_round(cluster, 0, stack, weights, shape, acc_dtype="F64")
        second, s2 = run_round(cluster, 1, stack[::-1].copy(), weights[::-1].copy(), shape,
                               acc_dtype="F64")
        assert_close_to_mean(first, stack, weights)
        assert_close_to_mean(second, stack[::-1], weights[::-1])
        assert s1.cold_starts == 3  # leaf0, leaf1, top: one worker each
        assert s2.cold_starts == 0  # all three reused warm
        assert s2.billed_s >= s2.busy_s > 0
        assert len(s2.peak_rss_kb()) == 3 and min(s2.peak_rss_kb().values()) > 0
        names = segments_of(cluster)
    assert names and left_in_dev_shm(names) == []


@pytest.mark.parametrize(("policy", "acc_dtype"), [("best-fit", "F32"), ("round-robin", "F64")])
def test_bytes_cross_nodes_exactly_as_the_placement_predicts(policy: str, acc_dtype: str) -> None:
    rng = np.random.default_rng(2)
    n, clients = 3000, 40
    stack = rng.standard_normal((clients, n)).astype(F32)
    weights = rng.uniform(1, 10, size=clients)
    shape = TreeShape.of(8, 4)
    with Cluster.local(4, cores=2.0) as cluster:
        model, stats = run_round(cluster, 0, stack, weights, shape, policy=policy,
                                 acc_dtype=acc_dtype)
        assert_close_to_mean(model, stack, weights, acc_dtype)
        landing = {f"n{i}": clients // 4 for i in range(4)}
        tree = build_tree(shape, landing)
        partial_bytes = n * (8 if acc_dtype == "F64" else 4)  # partials travel as summed
        predicted = cross_node_bytes(tree, stats.placement, n * 4, partial_bytes)
        assert stats.cross_node_bytes == predicted
        if policy == "best-fit":
            updates_moved = sum(
                q for a in tree.leaves for node, q in a.serves
                if node != stats.placement.node_of(a.name)
            )
            assert updates_moved == 0  # every leaf sits where its updates land
        else:
            assert stats.cross_node_bytes > 10 * n * 4


def test_close_aggregates_the_updates_that_came(three_nodes: Cluster) -> None:
    rng = np.random.default_rng(3)
    stack = rng.standard_normal((10, 100)).astype(F32)
    weights = rng.uniform(1, 10, size=10)
    plan = three_nodes.plan(TreeShape.of(3, 2), {"n0": 6, "n1": 4})
    rnd = three_nodes.begin_round(next(ROUND), plan, nbytes=400)
    arrived = [0, 1, 2, 6]  # n0 gets 0-2, n1 gets 6; every leaf of n1 may stay empty
    for i in arrived:
        rnd.ingest("n0" if i < 6 else "n1", stack[i], client=f"c{i}", weight=weights[i])
    with pytest.raises(TimeoutError):
        rnd.result(timeout=0.3)  # quotas not met: still waiting
    rnd.close()
    result = rnd.result(timeout=30)
    assert result.updates == 4
    assert_close_to_mean(result.array.copy(), stack[arrived], weights[arrived], "F32")
    result.release()


def test_a_client_arriving_twice_counts_once(three_nodes: Cluster) -> None:
    stack = np.arange(12, dtype=F32).reshape(3, 4)
    plan = three_nodes.plan(TreeShape.of(1), {"n2": 3})
    rnd = three_nodes.begin_round(next(ROUND), plan, nbytes=16)
    assert rnd.ingest("n2", stack[0], client="a", weight=1.0)
    assert not rnd.ingest("n2", stack[1], client="a", weight=5.0)
    assert rnd.ingest("n2", stack[1], client="b", weight=1.0)
    rnd.close()
    result = rnd.result(timeout=30)
    assert result.updates == 2
    np.testing.assert_allclose(result.array, (stack[0] + stack[1]) / 2)
    result.release()


def test_a_round_without_updates_fails_and_the_next_one_works(three_nodes: Cluster) -> None:
    plan = three_nodes.plan(TreeShape.of(2), {"n0": 2})
    rnd = three_nodes.begin_round(next(ROUND), plan, nbytes=8)
    rnd.close()
    with pytest.raises(StratoError, match="no updates"):
        rnd.result(timeout=30)
    stack = np.ones((2, 2), F32)
    model, _ = run_round(three_nodes, next(ROUND), stack, np.ones(2), TreeShape.of(2))
    np.testing.assert_array_equal(model, [1.0, 1.0])


def test_a_failed_invocation_fails_the_round_and_frees_its_memory() -> None:
    node = Node("n0", executor="threads", max_inflight_bytes=4 * 400)
    with Cluster([node]) as cluster:
        executor = node.executor_for(400)
        real = executor.submit
        calls = {"n": 0}

        def flaky(name: str, event: Any) -> Future[Any]:
            calls["n"] += 1
            if calls["n"] == 2:
                failed: Future[Any] = Future()
                failed.set_exception(RuntimeError("worker fell over"))
                return failed
            return real(name, event)

        executor.submit = flaky  # type: ignore[method-assign]  # inject one failure
        stack = np.ones((8, 100), F32)
        plan = cluster.plan(TreeShape.of(1), {"n0": 8})
        rnd = cluster.begin_round(0, plan, nbytes=400, batch=1)
        with pytest.raises(RuntimeError, match="fell over"):
            for i in range(8):
                rnd.ingest("n0", stack[i], client=str(i), weight=1.0, timeout=5)
            rnd.result(timeout=30)
        with pytest.raises(RuntimeError, match="fell over"):
            rnd.result(timeout=30)
        executor.submit = real  # type: ignore[method-assign]
        # every update buffer came back: a full budget's worth can be leased again
        leases = [node.lease_update(400, timeout=5) for _ in range(4)]
        for lease in leases:
            lease.release()
        model, _ = run_round(cluster, 1, stack * 3, np.ones(8), TreeShape.of(2))
        np.testing.assert_array_equal(model, np.full(100, 3.0, F32))
        names = segments_of(cluster)
    assert names and left_in_dev_shm(names) == []


def released(lease: Any) -> bool:
    try:
        lease.buffer  # noqa: B018
    except (StratoError, ShmError):
        return True
    return False


@pytest.mark.parametrize("private", [True, False])
def test_a_new_tree_takes_the_last_trees_warm_buffers_and_gives_back_the_rest(
        private: bool) -> None:
    node = Node("n0")
    try:
        first = node.accumulators({"leaf0": 800, "leaf1": 800, "top": 800, "top/out": 400},
                                  private=private)
        second = node.accumulators({"leaf0": 800, "leaf0/out": 400}, private=private)
        assert second["leaf0"] is first["leaf0"]
        assert second["leaf0/out"] is first["top/out"]  # warm memory, not fresh
        assert released(first["leaf1"]) and released(first["top"])  # the rest given back
        assert not released(second["leaf0"]) and not released(second["leaf0/out"])
        third = node.accumulators({"leaf0": 1600}, private=private)  # another size: fresh
        assert third["leaf0"] is not first["leaf0"] and third["leaf0"].nbytes == 1600
        assert released(first["leaf0"]) and released(first["top/out"])
    finally:
        node.close()


@pytest.mark.parametrize("private", [True, False])
def test_a_buffer_an_invocation_may_still_write_goes_to_no_one_else(private: bool) -> None:
    node = Node("n0")
    try:
        first = node.accumulators({"leaf0": 400, "leaf1": 400, "top": 400}, private=private)
        # a dropped round's invocation of leaf1 is still out: its buffer is kept aside
        second = node.accumulators({"leaf0": 400, "leaf0/out": 400}, private=private,
                                   busy=frozenset({"leaf1"}))
        assert second["leaf0/out"] is first["top"]
        assert not released(first["leaf1"])
        third = node.accumulators({"leaf0": 400, "leaf0/out": 400, "x": 400},
                                  private=private, busy=frozenset({"leaf1"}))
        assert third["x"] is not first["leaf1"] and not released(first["leaf1"])
        # under its own name a busy buffer is reused (its invocations run one at a time)
        again = node.accumulators({"leaf1": 400}, private=private, busy=frozenset({"leaf1"}))
        assert again["leaf1"] is first["leaf1"]
        node.accumulators({"leaf0": 800}, private=private)
        assert released(first["leaf1"])  # idle now, and no one's size: given back
    finally:
        node.close()


@pytest.fixture
def held_adds(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Every aggregator invocation sets ``entered`` and waits for ``gate`` (at most 10 s)
    before it adds."""
    from strato.aggregation import _handler

    entered, gate = threading.Event(), threading.Event()
    real = _handler.aggregate

    def held(event: Any, ctx: Any) -> Any:
        entered.set()
        gate.wait(10)
        return real(event, ctx)

    monkeypatch.setattr(_handler, "aggregate", held)
    return entered, gate


def test_a_round_begun_after_a_failed_one_tells_the_node_what_is_still_being_added(
        monkeypatch: pytest.MonkeyPatch, held_adds: tuple[threading.Event, threading.Event],
) -> None:
    entered, gate = held_adds
    node = Node("n0", executor="threads")
    seen: list[frozenset[str]] = []
    accumulators = node.accumulators

    def spy(wanted: dict[str, int], **kw: Any) -> dict[str, Any]:
        seen.append(kw.get("busy", frozenset()))
        return accumulators(wanted, **kw)

    monkeypatch.setattr(node, "accumulators", spy)
    with Cluster([node]) as cluster:
        rnd = cluster.begin_round(0, cluster.plan(TreeShape.of(1), {"n0": 2}), nbytes=400,
                                  batch=1)
        assert rnd.ingest("n0", np.ones(100, F32), client="a", weight=1.0, timeout=5)
        assert entered.wait(10)
        node.dispatcher.post("fail", RuntimeError("a node went away"))
        with pytest.raises(RuntimeError, match="went away"):
            rnd.result(timeout=10)
        cluster.begin_round(1, cluster.plan(TreeShape.of(2), {"n0": 2}), nbytes=400)
        gate.set()
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [frozenset(), frozenset({"leaf0", "leaf0/out"})]


def test_closing_a_node_mid_batch_gives_the_batch_memory_back(
        held_adds: tuple[threading.Event, threading.Event]) -> None:
    entered, gate = held_adds  # still adding when the node is told to stop
    node = Node("n0", executor="threads", max_inflight_updates=1)
    cluster = Cluster([node])
    plan = cluster.plan(TreeShape.of(1), {"n0": 2})
    rnd = cluster.begin_round(0, plan, nbytes=400, batch=1)
    assert rnd.ingest("n0", np.ones(100, F32), client="a", weight=1.0, timeout=5)
    assert entered.wait(10) and not node.has_room(400)
    threading.Timer(0.3, gate.set).start()  # the batch ends while the node closes
    cluster.close()
    assert gate.is_set() and node.has_room(400)  # the update's buffer came back


def test_memory_does_not_grow_with_the_number_of_clients() -> None:
    rng = np.random.default_rng(4)
    n = 20_000
    created = {}
    for clients in (20, 400):
        node = Node("n0", cores=2.0, max_inflight_bytes=6 * n * 4)
        with Cluster([node]) as cluster:
            stack = rng.standard_normal((8, n)).astype(F32)
            weights = rng.uniform(1, 10, size=clients)
            plan = cluster.plan(TreeShape.of(2), {"n0": clients})
            rnd = cluster.begin_round(0, plan, nbytes=n * 4)
            for i in range(clients):
                rnd.ingest("n0", stack[i % 8], client=str(i), weight=weights[i], timeout=30)
            result = rnd.result(timeout=60)
            big = np.stack([stack[i % 8] for i in range(clients)])
            assert_close_to_mean(result.array.copy(), big, weights, "F32")
            result.release()
            created[clients] = node.pool.created
    # update buffers in flight are capped by the budget: the same handful of segments
    # serves 20 clients or 400 (accumulators: 3, update buffers: at most 6)
    assert created[400] <= 3 + 1 + 6
    assert created[400] <= created[20] + 2


def test_mistakes_get_clear_errors(three_nodes: Cluster) -> None:
    plan = three_nodes.plan(TreeShape.of(1), {"n0": 2})
    with pytest.raises(ConfigError, match="F32 or F64"):
        three_nodes.begin_round(next(ROUND), plan, nbytes=8, dtype="I8")
    with pytest.raises(ConfigError, match="whole number"):
        three_nodes.begin_round(next(ROUND), plan, nbytes=7)
    with pytest.raises(ConfigError, match="no node named"):
        three_nodes.plan(TreeShape.of(1), {"n9": 2})
    rnd = three_nodes.begin_round(next(ROUND), plan, nbytes=8)
    with pytest.raises(StratoError, match="still running"):
        three_nodes.begin_round(next(ROUND), plan, nbytes=8)
    with pytest.raises(StratoError, match="weight"):
        rnd.ingest("n0", np.ones(2, F32), client="x", weight=0.0)
    with pytest.raises(StratoError, match="12 bytes"):
        rnd.ingest("n0", np.ones(3, F32), client="x", weight=1.0)
    rnd.ingest("n0", np.ones(2, F32), client="x", weight=1.0)
    rnd.ingest("n0", np.ones(2, F32), client="y", weight=1.0)
    rnd.result(timeout=30).release()


def test_the_descriptor_that_travels_is_a_few_bytes() -> None:
    from strato.aggregation._messages import Arrived
    from strato.services.shm import ShmRef

    ref = ShmRef("strato-123-abcdef01-7", 0, 40_000_000)
    desc = Arrived(12, "client-0042", ref, 250.0, 9.5, 9.52)
    raw = desc.to_json()
    assert len(raw) < 160  # for a 40 MB update
    assert Arrived.from_json(raw) == desc


def test_auto_runs_small_models_on_threads_and_large_ones_in_functions() -> None:
    from strato.aggregation.node import THREADS_BELOW_BYTES

    node = Node("n0")
    try:
        assert node.executor_for(THREADS_BELOW_BYTES - 4).kind == "threads"
        assert node.executor_for(THREADS_BELOW_BYTES).kind == "runtime"
        assert node.executor_for(4) is node.executor_for(8)  # one executor per kind
    finally:
        node.close()
