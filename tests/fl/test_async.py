"""Asynchronous FL: staleness weights, the buffer's model, stale refusals, duplicated
deliveries, who trains next, and a killed async run resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from fltools import cli_env, make_tiny_app, strato_workers
from strato.codec import decode, encode
from strato.control.asynchronous import next_client, speed_factor, staleness_weight
from strato.errors import ConfigError
from strato.fl import aggregator, buffered, state
from strato.fl.config import JobConfig
from strato.fl.coordinator import provision
from strato.params import Layout, Params
from strato.services import Services, embedded

LAYOUT = Layout.of([("w", "F32", (2, 3)), ("b", "F32", (3,))])
CLIENTS = ["a", "b", "c", "d", "e"]


def test_staleness_weights_are_exact_for_each_rule() -> None:
    for s in range(6):
        assert staleness_weight(s, "constant") == 1.0
        assert staleness_weight(s, "polynomial", a=0.5) == pytest.approx((1 + s) ** -0.5, 1e-15)
        assert staleness_weight(s, "polynomial", a=2.0) == pytest.approx((1 + s) ** -2.0, 1e-15)
    assert [staleness_weight(s, "hinge", a=0.5, b=2) for s in range(5)] == [
        1.0, 1.0, 1.0, 1 / 1.5, 1 / 2.0]
    with pytest.raises(ValueError, match="unknown staleness rule"):
        staleness_weight(1, "exponential")
    with pytest.raises(ValueError, match="negative"):
        staleness_weight(-1)


def test_the_next_client_is_a_seeded_draw_among_those_not_busy() -> None:
    pool = [f"{i:04d}" for i in range(20)]
    busy = {"0003", "0007"}
    picks = [next_client(0, d, pool, busy) for d in range(200)]
    assert not busy & set(picks) and len(set(picks)) == 18
    assert picks == [next_client(0, d, pool, busy) for d in range(200)]  # reproducible
    assert next_client(0, 0, ["a"], {"a"}) is None


def test_speeds_are_per_client_heavy_tailed_and_checked() -> None:
    factors = [speed_factor("lognormal:1", 0, f"{i:04d}") for i in range(400)]
    assert factors[:3] == [speed_factor("lognormal:1", 0, f"{i:04d}") for i in range(3)]
    assert 0.8 < float(np.median(factors)) < 1.25 and max(factors) > 8  # exp(N(0, 1))
    assert speed_factor("", 0, "a") == 0.0
    with pytest.raises(ConfigError, match="speed"):
        JobConfig(speed="pareto:2").validate()
    with pytest.raises(ConfigError, match="concurrency"):
        JobConfig(mode="async", clients=4, concurrency=5).validate()
    default = JobConfig(mode="async", clients=8, clients_per_round=3).validate()
    assert (default.async_concurrency, default.async_buffer) == (3, 3)  # a round's work


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Services]:
    aggregator.reset()
    with embedded(tmp_path / "svc") as s:
        provision(s, CLIENTS)
        config = {"strategy": "fedavg", "strategy_options": {}, "seed": 0, "rounds": 4,
                  "clients_per_round": 3, "mode": "async", "concurrency": 2, "buffer": 2,
                  "staleness": "polynomial", "staleness_exponent": 0.5, "staleness_hinge": 4,
                  "max_staleness": 1}
        job = {"config": config, "quorum_count": 2, "layout": LAYOUT.to_json(),
               "clients": CLIENTS, "simulate": True}
        s.table.put(state.JOB, "config", job)
        s.blobs.put(state.model_key(0), encode(Params(LAYOUT)).payload)
        buffered.open_version(s, job, 1)  # as the round loop's first step does
        yield s
    aggregator.reset()


def _upload(svc: Services, client: str, value: float, n: int, base: int,
            nonce: str = "x") -> None:
    p = Params(LAYOUT, np.full(9, value, dtype=np.float32).view(np.uint8))
    blob = svc.blobs.put(f"updates/{base}/{client}-{nonce}", encode(p).payload)
    svc.table.put(state.UPDATES, state.update_key(base, client, nonce),
                  {"round": base, "client": client, "blob": blob, "num_examples": n,
                   "bytes_up": 1, "bytes_down": 1})  # fmt: skip


def _deliver(svc: Services, start: int = 0) -> dict[str, int]:
    records = [asdict(c) for c in svc.table.read_stream(state.UPDATES, limit=1000)]
    return aggregator.admit_batch(svc, records[start:])


def _model(svc: Services, version: int) -> np.ndarray:
    return np.array(decode(svc.blobs.get(state.model_key(version))).flat(), dtype=np.float64)


def test_a_buffer_adds_each_update_against_the_model_it_started_from(svc: Services) -> None:
    # version 1: a and b started from version 0 (zeros)
    _upload(svc, "a", 1.0, 10, base=1)
    _upload(svc, "b", 2.0, 30, base=1)
    assert _deliver(svc)["accepted"] == 2
    x1 = _model(svc, 1)
    np.testing.assert_allclose(x1, (10 * 1 + 30 * 2) / 40, rtol=1e-6)
    assert svc.table.get(state.ROUNDS, state.round_key(2)).value["status"] == "open"
    # version 2: c started from version 0 (one version stale), d from version 1
    _upload(svc, "c", 4.0, 60, base=1)
    _upload(svc, "d", 3.0, 20, base=2)
    assert _deliver(svc, 2)["accepted"] == 2
    wc, wd = 60 * 2 ** -0.5, 20.0
    expected = x1 + (wc * (4.0 - 0.0) + wd * (3.0 - x1)) / (wc + wd)
    np.testing.assert_allclose(_model(svc, 2), expected, rtol=1e-6)
    acc = svc.table.get(state.ACCEPTED, state.accepted_key(2, "c")).value
    assert acc["base"] == 1 and acc["staleness"] == 1 and acc["weight"] == pytest.approx(wc)
    # version 3 is open: an update that started from version 0 is 2 versions stale,
    # beyond max_staleness 1: refused, with the reason, and the model never sees it
    _upload(svc, "e", 100.0, 10, base=1, nonce="late")
    counts = _deliver(svc, 4)
    assert counts["accepted"] == 0 and counts["rejected"] == 1
    (refusal,) = svc.table.query(state.REJECTIONS)
    assert refusal.value["reason"].startswith("stale: it started from version 0, 2 versions")
    # Every record delivered again (at-least-once delivery): nothing changes.
    counts = _deliver(svc)
    assert counts["accepted"] == 0 and counts["rejected"] == 0 and counts["ignored"] == 5
    assert [len(svc.table.query(state.ACCEPTED, state.round_key(r) + "/")) for r in (1, 2, 3)] \
        == [2, 2, 0]
    assert len(svc.table.query(state.REJECTIONS)) == 1
    np.testing.assert_allclose(_model(svc, 2), expected, rtol=1e-6)


def test_each_arrival_frees_its_slot_for_a_client_not_in_flight(svc: Services) -> None:
    aggregator.warm_up(svc, 1)  # the loop's first step: two clients in flight
    flying = buffered.in_flight(svc)
    assert len(flying) == 2 and set(flying.values()) == {1}
    first = sorted(flying)[0]
    _upload(svc, first, 1.0, 10, base=1)
    _deliver(svc)
    after = buffered.in_flight(svc)
    assert first not in after and len(after) == 2  # its slot went to another client
    _deliver(svc)  # the same record again draws nobody
    assert buffered.in_flight(svc) == after
    notices = {c: svc.bus.receive(state.client_queue(c), 10, wait_s=0) for c in CLIENTS}
    assert {c for c, got in notices.items() if got} == set(flying) | set(after)


ASYNC_TOML = """
[job]
rounds = 4
clients = 8
clients_per_round = 3
seed = 1
client_concurrency = 4
mode = "async"

[async]
concurrency = 3
buffer = 2
max_staleness = 3

[round]
round_deadline_s = 60

[train]
epochs = 1
batch_size = 16
lr = 0.05
"""


def _accepted_updates(out: Path) -> dict[str, str]:
    """update record key -> the accepted item's key (round/client)."""
    with embedded(out / "services") as svc:
        return {i.value["key"]: i.key for i in svc.table.query(state.ACCEPTED)}


@pytest.mark.slow
def test_a_killed_async_run_resumes_at_its_last_version_and_loses_no_update(
    tmp_path: Path,
) -> None:
    app = make_tiny_app(tmp_path, ASYNC_TOML)
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "strato.cli", "run", str(app), "--out",
                            str(out)], env=cli_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    before: dict[str, str] = {}
    while time.monotonic() < deadline:  # kill once version 1 is made and more is accepted
        try:
            before = _accepted_updates(out)
            with embedded(out / "services") as svc:
                made = svc.table.get(state.ROUNDS, state.round_key(1))
            if made is not None and "model" in made.value and len(before) >= 3:
                break
        except Exception:  # the run's files are being made
            pass
        assert run.poll() is None, run.stderr.read() if run.stderr else ""
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    before = _accepted_updates(out)
    resumed = subprocess.run([sys.executable, "-m", "strato.cli", "run", "--resume", str(out)],
                             env=cli_env(), capture_output=True, text=True, timeout=300,
                             stdin=subprocess.DEVNULL)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    after = _accepted_updates(out)
    assert before.items() <= after.items()  # nothing accepted was lost or moved
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "async" and summary["versions"] == 4
    rows = summary["per_round"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    # each version's buffer holds its own updates: no update counted twice
    assert len(after) == sum(r["accepted"] for r in rows) == summary["updates_accepted"]
    assert sum(summary["staleness_histogram"].values()) == len(after)
    assert strato_workers(out) == []


def test_async_refuses_what_it_cannot_run_in_one_line(tmp_path: Path) -> None:
    from fltools import strato

    app = make_tiny_app(tmp_path)
    for extra, says in ((["--strategy", "fedmedian"], "not fedmedian"),
                        (["--max-update-norm", "1"], "not max_update_norm"),
                        (["--strategy", "cs"], "not cs")):  # fmt: skip
        res = strato("run", str(app), "--mode", "async", *extra, "--out", str(tmp_path / "o"))
        assert res.returncode == 2 and says in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = strato("run", str(app), "--mode", "later", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "--mode" in res.stderr
