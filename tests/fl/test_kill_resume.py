"""SIGKILL the run process or the aggregator's worker mid-round: nothing accepted is lost.

Each case kills at one of two moments of round 2 (one update accepted, half the
quorum accepted); a run killed during its set-up resumes too. A killed run is resumed with
``--resume``; a killed aggregator worker is replaced by the runtime (the stream
trigger delivers its batch again and a cold worker rebuilds the round from its
accepted items). Either way the final model equals an uninterrupted run's (same
seed) and ``updates_accepted`` is the same.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fltools import cli_env, strato, strato_workers
from strato.codec import decode
from strato.errors import NotFound

ROUNDS = 3
CLIENTS_PER_ROUND = 3  # fltools.TINY_TOML


def _run(app: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "strato.cli", "run", str(app), "--out", str(out),
         "--rounds", str(ROUNDS)],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if cond():
                return
        except Exception:  # the run's files are being written: try again
            pass
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _accepted(out: Path, r: int) -> int:
    from strato.fl import state
    from strato.services import embedded

    with embedded(out / "services") as svc:
        if svc.table.get(state.ROUNDS, state.round_key(r)) is None:
            return -1
        return len(svc.table.query(state.ACCEPTED, state.round_key(r) + "/"))


def _accepted_keys(out: Path, r: int) -> dict[str, str]:
    """Round r's accepted updates: client -> the update record's key."""
    from strato.fl import state
    from strato.services import embedded

    with embedded(out / "services") as svc:
        items = svc.table.query(state.ACCEPTED, state.round_key(r) + "/")
        return {i.value["client"]: i.value["key"] for i in items}


def _aggregator_pid(out: Path) -> int | None:
    for pid in strato_workers(out):
        try:
            if b"STRATO_FUNCTION=aggregate" in Path(f"/proc/{pid}/environ").read_bytes():
                return pid
        except OSError:
            continue
    return None


def _final(out: Path) -> tuple[np.ndarray, int]:
    model = out / "services" / "blobs" / "models" / f"round-{ROUNDS:05d}.safetensors"
    data = model.read_bytes()[64:]  # the blob store's header, then safetensors
    summary = json.loads((out / "summary.json").read_text())
    return np.array(decode(data).flat()), int(summary["updates_accepted"])


def _kill_once_written(app: Path, out: Path, name: str) -> None:
    """Start the run and SIGKILL it as soon as OUT/name exists."""
    proc = _run(app, out)
    try:
        _wait_for(lambda: (out / name).exists(), 60, name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _assert_equals_reference(out: Path, model_ref: np.ndarray, accepted_ref: int) -> None:
    model, accepted = _final(out)
    assert accepted == accepted_ref
    assert np.abs(model - model_ref).max() <= 1e-6


def _saved_invocations(out: Path) -> int:
    """What a run (killed or not) saved of its count so far, for its resume to add to."""
    return int(json.loads((out / "accounting.json").read_text())["invocations"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, int]:
    from fltools import make_tiny_app

    root = tmp_path_factory.mktemp("reference")
    app = make_tiny_app(root)
    res = strato("run", str(app), "--out", str(root / "out"), "--rounds", str(ROUNDS))
    assert res.returncode == 0, res.stderr
    model, accepted = _final(root / "out")
    return app, model, accepted


@pytest.mark.slow
def test_a_run_killed_during_its_set_up_resumes(
    reference: tuple[Path, np.ndarray, int], tmp_path: Path
) -> None:
    from strato.fl import state
    from strato.services import embedded

    app, model_ref, accepted_ref = reference
    out = tmp_path / "out"
    _kill_once_written(app, out, "run.json")
    _wait_for(lambda: strato_workers(out) == [], 15, "the killed run's workers to exit")
    if (out / "services").exists():
        with embedded(out / "services") as svc:
            try:
                job = svc.table.get(state.JOB, "config")
            except NotFound:  # not even its tables made yet
                job = None
            assert job is None  # killed before its set-up ended
    res = strato("run", "--resume", str(out))
    assert res.returncode == 0, res.stderr
    assert "setting it up again" in res.stdout
    _assert_equals_reference(out, model_ref, accepted_ref)


# (Killed before round 2 has anything accepted, and at random moments from start-up to
# shut-down: benchmarks/faults.py, whose small version runs in tests/benchmarks.)
MOMENTS = {"one-accepted": 1, "half-accepted": 2}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("victim", "moment"),
    # the aggregator once (its cold replacement rebuilds the round from its accepted
    # items; benchmarks/faults.py kills it at random moments)
    [("run", "one-accepted"), ("run", "half-accepted"), ("aggregator", "half-accepted")],
)
def test_sigkill_mid_round_then_resume_equals_an_uninterrupted_run(
    reference: tuple[Path, np.ndarray, int], tmp_path: Path, victim: str, moment: str
) -> None:
    app, model_ref, accepted_ref = reference
    out = tmp_path / "out"
    proc = _run(app, out)
    try:
        need = MOMENTS[moment]
        _wait_for(lambda: _accepted(out, 2) >= need, 180, f"round 2 with {need} accepted")
        if victim == "run":
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            before = _accepted_keys(out, 2)
            saved = _saved_invocations(out)
            model1 = out / "services" / "blobs" / "models" / "round-00001.safetensors"
            model1_stat = model1.stat()
            _wait_for(lambda: strato_workers(out) == [], 15, "the killed run's workers to exit")
            res = strato("run", "--resume", str(out))
            assert res.returncode == 0, res.stderr
            after = _accepted_keys(out, 2)
            assert all(after[c] == key for c, key in before.items())  # none lost or redone
            assert model1.stat().st_mtime_ns == model1_stat.st_mtime_ns  # round 1 not redone
            lines = (out / "metrics.jsonl").read_text().splitlines()
            rows = [json.loads(x)["round"] for x in lines]
            assert sorted(rows) == list(range(1, ROUNDS + 1))  # each round reported once
        else:
            pid = _aggregator_pid(out)
            assert pid is not None, "the aggregator should be warm mid-round"
            os.kill(pid, signal.SIGKILL)
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_equals_reference(out, model_ref, accepted_ref)
    assert strato_workers(out) == []
    if victim == "run":
        # The killed segment's work is counted (saved as it happens: at least round 1's
        # trainings and one aggregation), and the resumed segment's own (at least round
        # 3's trainings) adds to it. (The total is not the reference's: an invocation
        # killed in flight never completed, and the aggregator batches the arrivals it
        # finds waiting, so the number of its invocations depends on timing.)
        summary = json.loads((out / "summary.json").read_text())
        assert saved >= CLIENTS_PER_ROUND + 1
        assert summary["invocations_this_segment"] >= CLIENTS_PER_ROUND
        assert summary["invocations"] == saved + summary["invocations_this_segment"]


# Appended to the app: while FULL lies beside it, round 2's training meets a full disk.
_FULL_DISK = '''
import errno as _errno
import pathlib as _pathlib

_train = train


@app.train
def _train_or_fail(net, data, ctx):
    if ctx.round == 2 and (_pathlib.Path(__file__).parent / "FULL").exists():
        raise OSError(_errno.ENOSPC, "No space left on device")
    return _train(net, data, ctx)
'''


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_a_clear_error_and_the_resumed_run_loses_nothing(
    reference: tuple[Path, np.ndarray, int], tmp_path: Path
) -> None:
    app_ref, model_ref, accepted_ref = reference
    app = tmp_path / "app"
    shutil.copytree(app_ref, app)
    with (app / "app.py").open("a") as f:
        f.write(_FULL_DISK)
    (app / "FULL").touch()
    out = tmp_path / "out"
    res = strato("run", str(app), "--out", str(out), "--rounds", str(ROUNDS))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "the disk is full" in res.stderr and "in round 2" in res.stderr
    assert f"strato run --resume {out}" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (out / "summary.json").exists()
    assert _accepted(out, 2) == 0  # stopped in round 2, before it closed without them
    _wait_for(lambda: strato_workers(out) == [], 15, "the stopped run's workers to exit")
    (app / "FULL").unlink()  # room again
    res = strato("run", "--resume", str(out))
    assert res.returncode == 0, res.stderr
    _assert_equals_reference(out, model_ref, accepted_ref)


@pytest.mark.slow
def test_a_run_killed_before_it_wrote_run_json_starts_again_on_resume(
    reference: tuple[Path, np.ndarray, int], tmp_path: Path
) -> None:
    """`strato run` notes its command in OUT first thing (command.json, before the slow
    imports); killed before run.json, `--resume OUT` starts it as first asked."""
    app, model_ref, accepted_ref = reference
    out = tmp_path / "out"
    _kill_once_written(app, out, "command.json")
    assert not (out / "run.json").exists()  # killed before it: this path, not the set-up's
    res = strato("run", "--resume", str(out))
    assert res.returncode == 0, res.stderr
    assert "stopped before it began; starting it again" in res.stdout
    _assert_equals_reference(out, model_ref, accepted_ref)
    # Nothing at all in OUT (killed in its first milliseconds): a clear one-line error.
    res = strato("run", "--resume", str(tmp_path / "never"))
    assert res.returncode == 2 and "nothing of it was started" in res.stderr
    assert "Traceback" not in res.stderr
