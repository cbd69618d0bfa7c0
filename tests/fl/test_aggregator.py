"""The aggregator function's admission rules, idempotency and round closing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from strato.codec import decode, encode
from strato.fl import aggregator, state
from strato.fl.coordinator import provision
from strato.params import Layout, Params
from strato.services import Services, embedded

LAYOUT = Layout.of([("w", "F32", (2, 3)), ("b", "F32", (3,))])


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Services]:
    aggregator.reset()
    with embedded(tmp_path / "svc") as s:
        provision(s, ["a", "b", "c", "d"])
        s.table.put(
            state.JOB,
            "config",
            {
                "config": {"strategy": "fedavg", "strategy_options": {}, "seed": 0, "rounds": 3},
                "quorum_count": 3,
                "layout": LAYOUT.to_json(),
                "clients": ["a", "b", "c", "d"],
            },
        )
        s.blobs.put(state.model_key(0), encode(Params(LAYOUT)).payload)
        s.table.put(
            state.ROUNDS,
            state.round_key(1),
            {
                "round": 1,
                "status": "open",
                **state.put_selection(s.table, 1, ["a", "b", "c"]),
                "token": "no-such-token",
                "quorum": 3,
                "opened_at": 0.0,
                "accepted_count": 0,
            },
        )
        yield s
    aggregator.reset()


def _upload(
    svc: Services,
    client: str,
    values: Any,
    n: int = 10,
    r: int = 1,
    nonce: str = "x",
    layout: Layout = LAYOUT,
) -> dict[str, Any]:
    p = Params(layout, np.asarray(values, dtype=np.float32).view(np.uint8))
    blob = svc.blobs.put(f"updates/{r}/{client}-{nonce}", encode(p).payload)
    key = state.update_key(r, client, nonce)
    svc.table.put(
        state.UPDATES,
        key,
        {
            "round": r,
            "client": client,
            "blob": blob,
            "num_examples": n,
            "bytes_up": 1,
            "bytes_down": 1,
        },
    )
    return {"key": key}


def _stream(svc: Services) -> list[dict[str, Any]]:
    return [asdict(c) for c in svc.table.read_stream(state.UPDATES, limit=1000)]


def _reasons(svc: Services) -> list[str]:
    return sorted(i.value["reason"] for i in svc.table.query(state.REJECTIONS))


def test_bad_updates_are_rejected_with_reasons_and_never_change_the_model(svc: Services) -> None:
    ones = np.ones(9)
    _upload(svc, "a", ones, n=10)
    _upload(svc, "a", ones * 5, nonce="again")  # duplicate
    _upload(svc, "d", ones * 5)  # not selected
    _upload(svc, "b", np.ones(5), layout=Layout.of([("w", "F32", (5,))]), nonce="y")  # shape
    _upload(svc, "c", ones * 3, n=0)  # no weight
    counts = aggregator.admit_batch(svc, _stream(svc))
    assert counts["accepted"] == 1 and counts["rejected"] == 4
    # NaN: found by the leaf in the pass that adds it, which may wait for more updates
    # (a pass adds several), so it may be refused later, but always before the round
    # closes or the client's next update is judged: the client may send again (below),
    # and the model never sees it.
    before = len(svc.table.query(state.UPDATES))
    _upload(svc, "b", np.r_[ones[:8], np.nan])
    counts = aggregator.admit_batch(svc, _stream(svc)[before:])
    assert counts["accepted"] + counts["rejected"] == 1
    refused_at_once = counts["rejected"]
    reasons = _reasons(svc)
    assert any("duplicate" in r for r in reasons)
    assert any("not selected" in r for r in reasons)
    assert any("wrong layout" in r for r in reasons)
    assert any("num_examples" in r for r in reasons)
    # The good ones close the round: the model is the weighted mean of a, b, c only.
    before = len(svc.table.query(state.UPDATES))
    _upload(svc, "b", ones * 2, n=30, nonce="ok")
    _upload(svc, "c", ones * 4, n=60, nonce="ok")
    counts = aggregator.admit_batch(svc, _stream(svc)[before:])
    # b's NaN update refused first (so its new one is no duplicate), then b and c taken
    assert counts == {"accepted": 2 - (1 - refused_at_once), "rejected": 1 - refused_at_once,
                      "ignored": 0}
    assert svc.table.get(state.ACCEPTED, state.accepted_key(1, "b")) is not None
    assert any("NaN" in r for r in _reasons(svc))
    rnd = svc.table.get(state.ROUNDS, state.round_key(1))
    assert rnd is not None and rnd.value["status"] == "closed"
    model = decode(svc.blobs.get(state.model_key(1)))
    expected = (10 * 1 + 30 * 2 + 60 * 4) / 100
    np.testing.assert_allclose(model.flat(), expected, rtol=1e-6)
    # A late update for the closed round is rejected and changes nothing.
    before = len(svc.table.query(state.UPDATES))
    _upload(svc, "a", ones * 100, nonce="late")
    assert aggregator.admit_batch(svc, _stream(svc)[before:])["rejected"] == 1
    assert any("late" in r for r in _reasons(svc))
    np.testing.assert_allclose(
        decode(svc.blobs.get(state.model_key(1))).flat(), expected, rtol=1e-6
    )


def test_redelivered_stream_records_are_idempotent(svc: Services) -> None:
    for c, v in (("a", 1.0), ("b", 2.0)):
        _upload(svc, c, np.full(9, v))
    records = _stream(svc)
    assert aggregator.admit_batch(svc, records)["accepted"] == 2
    assert aggregator.admit_batch(svc, records) == {"accepted": 0, "rejected": 0, "ignored": 2}
    aggregator.reset()  # a cold worker sees the same records again
    assert aggregator.admit_batch(svc, records)["accepted"] == 0
    assert _reasons(svc) == []
    _upload(svc, "c", np.full(9, 3.0))
    aggregator.admit_batch(svc, _stream(svc)[2:])
    np.testing.assert_allclose(decode(svc.blobs.get(state.model_key(1))).flat(), 2.0, rtol=1e-6)


def test_deadline_close_uses_what_was_admitted_even_from_a_cold_worker(svc: Services) -> None:
    _upload(svc, "a", np.full(9, 1.0), n=1)
    _upload(svc, "b", np.full(9, 4.0), n=3)
    aggregator.admit_batch(svc, _stream(svc))
    aggregator.reset()  # the deadline function runs in another worker
    out = aggregator.close_round(svc, 1)
    assert out["accepted"] == 2
    np.testing.assert_allclose(decode(svc.blobs.get(state.model_key(1))).flat(), 3.25, rtol=1e-6)
    assert aggregator.close_round(svc, 1)["model"] == state.model_key(1)  # idempotent


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("fedmedian", 2.0),
        ("trimmedmean", (1.0 + 2.0 + 10.0) / 3),  # beta 0.1 of 3 trims none
        ("fedavg", (10 * 1.0 + 20 * 2.0 + 20 * 10.0) / 50),
    ],
)
def test_robust_strategies_reduce_through_the_sharded_aggregators(
    svc: Services, strategy: str, expected: float
) -> None:
    item = svc.table.get(state.JOB, "config")
    assert item is not None
    job = item.value
    job["config"] = {**job["config"], "strategy": strategy, "function_memory_mb": 256}
    svc.table.put(state.JOB, "config", job)
    aggregator.reset()
    _upload(svc, "a", np.full(9, 1.0), n=10)
    _upload(svc, "b", np.r_[np.ones(8), np.inf], n=10)  # refused: b may send again
    counts = aggregator.admit_batch(svc, _stream(svc))
    assert counts["accepted"] + counts["rejected"] == 2 and counts["ignored"] == 0
    later = 1 - counts["rejected"]  # found now, or before b's next update is judged
    before = len(svc.table.query(state.UPDATES))
    _upload(svc, "b", np.full(9, 2.0), n=20, nonce="ok")
    _upload(svc, "c", np.full(9, 10.0), n=20, nonce="ok")
    counts = aggregator.admit_batch(svc, _stream(svc)[before:])
    assert counts == {"accepted": 2 - later, "rejected": later, "ignored": 0}
    assert [r for r in _reasons(svc) if "NaN or Inf" in r]
    rnd = svc.table.get(state.ROUNDS, state.round_key(1))
    assert rnd is not None and rnd.value["closed_by"] == "quorum"
    assert rnd.value["accepted_count"] == 3 and rnd.value["tree"]["shards"] >= 1
    model = decode(svc.blobs.get(state.model_key(1))).flat()
    np.testing.assert_allclose(model, expected, rtol=1e-6)


def test_the_norm_bound_scales_far_updates_back_to_k_medians(svc: Services) -> None:
    """max_update_norm = 2: a client 10× farther from the model than the others counts
    as if it were 2 medians away (FedAvg with it unbounded would be dragged along)."""
    job = svc.table.get(state.JOB, "config")
    assert job is not None
    job.value["config"]["max_update_norm"] = 2.0
    svc.table.put(state.JOB, "config", job.value)
    svc.table.put(state.ROUNDS, state.round_key(1), {
        **svc.table.get(state.ROUNDS, state.round_key(1)).value,  # type: ignore[union-attr]
        **state.put_selection(svc.table, 1, ["a", "b", "c", "d"]), "quorum": 4,
    })  # fmt: skip
    rng = np.random.default_rng(0)
    honest = {c: rng.normal(size=9) for c in "abc"}
    poisoned = -10 * rng.normal(size=9)
    weights = {"a": 10, "b": 20, "c": 30, "d": 40}
    for c, x in {**honest, "d": poisoned}.items():
        _upload(svc, c, x, n=weights[c])
    aggregator.admit_batch(svc, _stream(svc)[:2])
    aggregator.reset()  # a cold worker takes the rest: it measures a and b again
    aggregator.admit_batch(svc, _stream(svc)[2:])
    xs = {c: np.asarray(v, np.float32).astype(np.float64) for c, v in
          {**honest, "d": poisoned}.items()}  # fmt: skip
    norms = {c: float(np.linalg.norm(x)) for c, x in xs.items()}  # the model is all zeros
    limit = 2.0 * float(np.median(list(norms.values())))
    assert norms["d"] > limit and all(norms[c] < limit for c in "abc")
    clipped = {c: x * min(1.0, limit / norms[c]) for c, x in xs.items()}
    expected = sum(weights[c] * clipped[c] for c in xs) / sum(weights.values())
    np.testing.assert_allclose(decode(svc.blobs.get(state.model_key(1))).flat(), expected,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    rnd = svc.table.get(state.ROUNDS, state.round_key(1))
    assert rnd is not None and list(rnd.value["norm_bound"]["clipped"]) == ["d"]


def test_a_norm_bound_with_a_strategy_it_cannot_bound_is_a_clear_error() -> None:
    from strato.errors import ConfigError
    from strato.fl.strategies import check_strategy

    check_strategy("fedavg", {}, 3.0)
    check_strategy("fedadam", {}, 3.0)
    for name in ("krum", "fedmedian", "cs"):
        with pytest.raises(ConfigError, match="max_update_norm"):
            check_strategy(name, {}, 3.0)


def test_an_all_zeros_update_is_clipped_by_the_norm_bound(svc: Services) -> None:
    """A well-formed malicious update (all zeros) lies as far from the round's model as
    the model is long: with max_update_norm it moves the model no farther than the
    bound allows, where FedAvg alone would take a quarter of the way to zero."""
    job = svc.table.get(state.JOB, "config")
    assert job is not None
    job.value["config"]["max_update_norm"] = 3.0
    svc.table.put(state.JOB, "config", job.value)
    g = np.full(9, 5.0, dtype=np.float32)
    svc.blobs.put(state.model_key(0), encode(Params(LAYOUT, g.view(np.uint8))).payload)
    svc.table.put(state.ROUNDS, state.round_key(1), {
        **svc.table.get(state.ROUNDS, state.round_key(1)).value,  # type: ignore[union-attr]
        **state.put_selection(svc.table, 1, ["a", "b", "c", "d"]), "quorum": 4,
    })  # fmt: skip
    rng = np.random.default_rng(1)
    for c in "abc":
        _upload(svc, c, g + 0.1 * rng.normal(size=9))
    _upload(svc, "d", np.zeros(9))
    aggregator.admit_batch(svc, _stream(svc))
    model = decode(svc.blobs.get(state.model_key(1))).flat()
    rnd = svc.table.get(state.ROUNDS, state.round_key(1))
    assert rnd is not None
    bound = rnd.value["norm_bound"]
    assert list(bound["clipped"]) == ["d"]
    # each of four equal weights moves the mean at most limit / 4 from g
    assert float(np.linalg.norm(model - g)) <= bound["limit"] + 1e-5
    assert float(np.abs(model - g).max()) < 0.5  # FedAvg alone: 1.25 below g everywhere


def test_an_update_damaged_on_disk_is_made_again_not_lost(svc: Services) -> None:
    """A stored update cut short after its upload was checked (the storage's fault, not
    the client's): refused with the reason, and its client gets the round's notice again."""
    _upload(svc, "a", np.ones(9))
    path, _offset, _length = svc.blobs.locate("updates/1/a-x")  # type: ignore[attr-defined]
    with open(path, "r+b") as f:
        f.truncate(Path(path).stat().st_size // 2)
    counts = aggregator.admit_batch(svc, _stream(svc))
    assert counts["accepted"] == 0 and counts["rejected"] == 1
    assert _reasons(svc) == [aggregator.CORRUPT]
    assert svc.table.get(state.ACCEPTED, state.accepted_key(1, "a")) is None
    assert svc.table.query(state.UPDATES, state.round_key(1) + "/a/") == []  # may send again
    [notice] = svc.bus.receive(state.client_queue("a"), 10, 0.0)
    assert notice.attributes["round"] == "1"
    # made again, it is taken like any other
    before = len(_stream(svc))
    for c, v in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        _upload(svc, c, np.full(9, v), nonce="again")
    assert aggregator.admit_batch(svc, _stream(svc)[before:])["accepted"] == 3
    np.testing.assert_allclose(decode(svc.blobs.get(state.model_key(1))).flat(), 2.0, rtol=1e-6)


def test_an_accepted_update_damaged_before_a_cold_worker_rebuilds_the_round_is_made_again(
    svc: Services,
) -> None:
    """The worker that accepted it is gone (or failed and dropped its state); the one
    that rebuilds the round from its acceptances finds the file cut short."""
    for c, v in (("a", 1.0), ("b", 2.0)):
        _upload(svc, c, np.full(9, v))
    assert aggregator.admit_batch(svc, _stream(svc))["accepted"] == 2
    path, _offset, _length = svc.blobs.locate("updates/1/a-x")  # type: ignore[attr-defined]
    with open(path, "r+b") as f:
        f.truncate(Path(path).stat().st_size // 2)
    aggregator.reset()
    before = len(_stream(svc))
    _upload(svc, "c", np.full(9, 3.0))
    aggregator.admit_batch(svc, _stream(svc)[before:])
    assert _reasons(svc) == [aggregator.CORRUPT]
    assert svc.table.get(state.ACCEPTED, state.accepted_key(1, "a")) is None
    rnd = svc.table.get(state.ROUNDS, state.round_key(1))
    assert rnd is not None and rnd.value["status"] == "open" and rnd.value["accepted_count"] == 2
    [notice] = svc.bus.receive(state.client_queue("a"), 10, 0.0)
    assert notice.attributes["round"] == "1"
    before = len(_stream(svc))
    _upload(svc, "a", np.full(9, 1.0), nonce="again")
    assert aggregator.admit_batch(svc, _stream(svc)[before:])["accepted"] == 1
    np.testing.assert_allclose(decode(svc.blobs.get(state.model_key(1))).flat(), 2.0, rtol=1e-6)


@pytest.mark.parametrize("cores", [1, 16])
def test_updates_wait_to_be_added_several_at_a_time_and_a_bad_one_is_still_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int) -> None:
    """Early in a round the leaf waits for a batch (aggregator.BATCH) before a pass over
    memory: an update held there is admitted (durable) but not yet added. A NaN among
    them is refused when found: before the same client's next update is judged (so that
    one is no duplicate), and before the round closes."""
    clients = [f"k{i:02d}" for i in range(12)]
    # the first round's tree has a leaf per core: with 16, each leaf's own quota is
    # short, so it adds each update as it comes, and the invocation waits for it
    monkeypatch.setattr(aggregator.os, "cpu_count", lambda: cores)
    parks = cores == 1
    aggregator.reset()
    with embedded(tmp_path / "svc") as svc:
        provision(svc, clients)
        svc.table.put(state.JOB, "config", {
            "config": {"strategy": "fedavg", "strategy_options": {}, "seed": 0, "rounds": 1},
            "quorum_count": 12, "layout": LAYOUT.to_json(), "clients": clients})
        svc.blobs.put(state.model_key(0), encode(Params(LAYOUT)).payload)
        svc.table.put(state.ROUNDS, state.round_key(1), {
            "round": 1, "status": "open", **state.put_selection(svc.table, 1, clients),
            "token": "no-such-token",
            "quorum": 12, "opened_at": 0.0, "accepted_count": 0})
        _upload(svc, "k00", np.ones(9))
        _upload(svc, "k01", np.r_[np.ones(8), np.nan])
        counts = aggregator.admit_batch(svc, _stream(svc))
        agent = aggregator._agent(svc)
        assert agent.open is not None
        if parks:  # waiting for a batch, not added: the NaN is not yet found
            assert counts == {"accepted": 2, "rejected": 0, "ignored": 0}
            assert len(agent.open.added) == 2
            assert not any(done.is_set() for done in agent.open.added)
        else:  # added before the invocation returned: the NaN found and refused
            assert counts == {"accepted": 1, "rejected": 1, "ignored": 0}
            assert agent.open.added == []
        before = len(svc.table.query(state.UPDATES))
        _upload(svc, "k01", np.full(9, 2.0), nonce="again")  # k01 sends again
        counts = aggregator.admit_batch(svc, _stream(svc)[before:])
        if parks:
            assert counts == {"accepted": 1 - 1, "rejected": 1, "ignored": 0}  # NaN out, new in
        else:
            assert counts == {"accepted": 1, "rejected": 0, "ignored": 0}
        assert [r for r in _reasons(svc) if "NaN" in r] and not [
            r for r in _reasons(svc) if "duplicate" in r]
        def send(batch: list[str]) -> None:
            before = len(svc.table.query(state.UPDATES))
            for c in batch:
                _upload(svc, c, np.full(9, 1.0 + int(c[1:])))
            aggregator.admit_batch(svc, _stream(svc)[before:])

        send(clients[2:5])  # with k01's new one, a batch of 4: added before it returns
        assert agent.open is not None and agent.open.added == []
        send(clients[5:7])  # 7 of 12: two wait for more
        if parks:
            assert len(agent.open.added) == 2 and not any(d.is_set() for d in agent.open.added)
        else:
            assert agent.open.added == []
        send(clients[7:8])  # 8 of 12: the last tenth (at least a batch) is added at once
        assert agent.open.added == []
        send(clients[8:])
        rnd = svc.table.get(state.ROUNDS, state.round_key(1))
        assert rnd is not None and rnd.value["status"] == "closed"
        expected = (1.0 + 2.0 + sum(1.0 + i for i in range(2, 12))) / 12
        np.testing.assert_allclose(decode(svc.blobs.get(state.model_key(1))).flat(), expected,
                                   rtol=1e-6)
    aggregator.reset()
