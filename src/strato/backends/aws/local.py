"""A local AWS for tests and local runs: moto's server plus Strato's local front.

``LocalAws`` starts two processes on 127.0.0.1, each on a free port:

- ``moto_server`` (``moto[server]``, run by ``emulator._moto_server`` with one fix), with Step
  Functions executions switched on (``POST /moto-api/config`` with
  ``{"stepfunctions": {"execute_state_machine": true}}``) and ``MOTO_PORT`` pointing
  at the front, so the Lambda calls its state machines make come back through it;
- the front (``emulator._front``), the endpoint clients use: it runs Lambda code
  locally and makes moto's conditional writes and receives atomic (see ``emulator``).

Both die with the process that started them (``PR_SET_PDEATHSIG``: start them from
the main thread) and are stopped by ``stop()``. Run it by hand with
``python -m strato.backends.aws.local`` to point ``strato`` at it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from strato.errors import ConfigError

__all__ = ["LocalAws", "main", "shared"]

CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}
_START_TIMEOUT_S = 60.0
# Runs PR_SET_PDEATHSIG (kept across exec) and then execs the real command.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _moto_command(port: int) -> list[str]:
    """moto_server, through ``_moto_server`` (which passes task failure causes on)."""
    module = "strato.backends.aws.emulator._moto_server"
    return [sys.executable, "-m", module, "-H", "127.0.0.1", "-p", str(port)]


class LocalAws:
    """moto + the local front (see the module doc)."""

    def __init__(
        self, workdir: str | os.PathLike[str] | None = None, *, keep_alive_s: float = 30.0
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="strato-localaws-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keep_alive_s = keep_alive_s
        self.region = "us-east-1"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[TextIO] = []
        self.moto_url = ""
        self.endpoint_url = ""

    def start(self) -> LocalAws:
        try:
            import moto  # noqa: F401 - only to say clearly what is missing
        except ImportError:
            raise ConfigError(
                "a local AWS needs moto: install it with pip install 'strato[aws]'"
            ) from None
        moto_port, front_port = free_port(), free_port()
        self.moto_url = f"http://127.0.0.1:{moto_port}"
        self.endpoint_url = f"http://127.0.0.1:{front_port}"
        env = {
            **os.environ,
            "MOTO_PORT": str(front_port),
            "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
            "AWS_DEFAULT_REGION": self.region,
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("AWS_PROFILE", None)
        env.pop("AWS_SESSION_TOKEN", None)
        try:
            self._spawn("moto", _moto_command(moto_port), env)
            front = [sys.executable, "-m", "strato.backends.aws.emulator._front", "--port",
                     str(front_port), "--moto", self.moto_url,
                     "--keep-alive", str(self.keep_alive_s)]  # fmt: skip
            self._spawn("front", front, env)
            self._wait_ready(f"{self.moto_url}/moto-api/config")
            self._wait_ready(f"{self.endpoint_url}/moto-api/config")
            request = urllib.request.Request(
                f"{self.moto_url}/moto-api/config",
                data=json.dumps({"stepfunctions": {"execute_state_machine": True}}).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10):
                pass
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = open(self.workdir / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        self._procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_PARENT, *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )

    def _wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            for proc, log in zip(self._procs, self._logs, strict=True):
                if proc.poll() is not None:
                    log.flush()
                    lines = Path(log.name).read_text(errors="replace").strip().splitlines()
                    raise ConfigError(
                        f"a local AWS process exited with {proc.returncode}: "
                        + (lines[-1] if lines else "(no output)")
                    )
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise ConfigError(f"the local AWS did not answer at {url}") from None
                time.sleep(0.1)

    def config(self, root: str | os.PathLike[str], prefix: str) -> dict[str, Any]:
        """A Services config for this local AWS (its Lambda functions keep their run
        files under ``root``/lambda, not in this machine's /tmp)."""
        return {
            "backend": "aws",
            "root": str(root),
            "lambda_root": str(Path(root) / "lambda"),
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "prefix": prefix,
            "credentials": dict(CREDENTIALS),
        }

    def stop(self) -> None:
        """Stop the front (and its Lambda workers), then moto."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalAws:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_shared: LocalAws | None = None
_shared_error: str | None = None
_shared_lock = threading.Lock()


def shared() -> LocalAws:
    """One ``LocalAws`` per process, started on first use and stopped at exit (what a
    test session wants: every test gets its own ``prefix`` on the same servers). A
    start that failed is not tried again; the same ``ConfigError`` is raised."""
    global _shared, _shared_error
    with _shared_lock:
        if _shared_error is not None:
            raise ConfigError(_shared_error)
        if _shared is None:
            try:
                local = LocalAws().start()
            except (ConfigError, OSError) as exc:
                _shared_error = str(exc)
                raise
            atexit.register(local.stop)
            _shared = local
        return _shared


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a local AWS (moto + Strato's front).")
    parser.add_argument("--root", default=".strato-local", help="where the run files go")
    parser.add_argument("--prefix", default="strato-")
    args = parser.parse_args(argv)
    with LocalAws() as local:
        print(json.dumps(local.config(Path(args.root).resolve(), args.prefix)), flush=True)
        print("Ctrl-C stops it.", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
