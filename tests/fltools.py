"""Helpers for tests that run strato: a tiny app, the strato CLI in a subprocess, process checks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from strato.params import Params

REPO = Path(__file__).resolve().parents[1]
MNIST_APP = REPO / "examples" / "mnist"

TINY_TOML = """
[job]
rounds = 3
clients = 6
clients_per_round = 3
seed = 1
client_concurrency = 2

[round]
round_deadline_s = 60

[train]
epochs = 2
batch_size = 16
lr = 0.05
"""


# The Complement Sparsification run tests' job: two clients a round out of four.
CS_TOML = """
[job]
rounds = {rounds}
clients = 4
clients_per_round = 2
seed = {seed}
client_concurrency = 2

[round]
round_deadline_s = 60

[train]
epochs = 1
batch_size = 16
lr = 0.05
"""


def make_tiny_app(tmp_path: Path, toml: str = TINY_TOML) -> Path:
    """The MNIST example's code with a small job (runs on the digits in seconds)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text((MNIST_APP / "app.py").read_text())
    (app / "strato.toml").write_text(toml)
    return app


def toy_params(seed: int) -> Params:
    """A four-tensor model (two kernels, two biases) with seeded normal values."""
    rng = np.random.default_rng(seed)
    return Params.from_arrays({
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=4).astype(np.float32),
        "fc.weight": rng.normal(size=(3, 8)).astype(np.float32),
        "fc.bias": rng.normal(size=3).astype(np.float32),
    })


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "STRATO_DATA_DIR"}
    env.update(extra)
    return env


def strato(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strato.cli", *args],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def strato_workers(root: Path) -> list[int]:
    """PIDs of live worker processes that belong to the run rooted at ``root``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"strato.services._worker" in cmd and str(root).encode() in env:
            pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def run_pids(root: Path, every_s: float = 0.05) -> Iterator[set[int]]:
    """While the block runs: the pids of the processes of the run rooted at ``root`` (its
    command line or environment names it), sampled every ``every_s``. Segments another
    test's processes left (a test that kills a run on purpose) are not this run's."""
    pids: set[int] = set()
    stop = threading.Event()
    mark = str(root).encode()

    def sample() -> None:
        while True:
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit() and int(proc.name) not in pids:
                    try:
                        if mark in (proc / "cmdline").read_bytes() or mark in (
                                proc / "environ").read_bytes():
                            pids.add(int(proc.name))
                    except OSError:
                        continue
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield pids
    finally:
        stop.set()
        thread.join()


def leaked_by(pids: set[int]) -> set[str]:
    """Strato segments in /dev/shm left by these (exited) processes."""
    return {s for s in shm_segments() if int(s.split("-")[1]) in pids}


def shm_segments() -> set[str]:
    """Strato segments in /dev/shm whose owner process has exited: leaks.

    (Segments of live owners belong to whatever else runs on the machine.)"""
    leaked = set()
    for p in Path("/dev/shm").iterdir():
        parts = p.name.split("-")
        owner = parts[1] if p.name.startswith("strato-") and len(parts) > 1 else ""
        if owner.isdigit() and not Path("/proc", owner).exists():
            leaked.add(p.name)
    return leaked


def cs_model(seed: int = 0, scale_fc: float = 1.0) -> Params:
    """A small CNN-shaped model (three kernels, three biases) for the CS tests."""
    rng = np.random.default_rng(seed)
    return Params.from_arrays({
        "conv.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=4).astype(np.float32),
        "fc.weight": (scale_fc * rng.normal(size=(5, 7))).astype(np.float32),
        "fc.bias": rng.normal(size=5).astype(np.float32),
        "out.weight": rng.normal(size=(3, 5)).astype(np.float32),
        "out.bias": rng.normal(size=3).astype(np.float32),
    })
