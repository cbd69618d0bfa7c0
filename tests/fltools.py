"""Helpers for tests that run strato: a tiny app, the strato CLI in a subprocess, process checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def make_tiny_app(tmp_path: Path) -> Path:
    """The MNIST example's code with a small job (runs on the digits in seconds)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text((MNIST_APP / "app.py").read_text())
    (app / "strato.toml").write_text(TINY_TOML)
    return app


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
