"""The parent's handle on one runtime worker process, and the thread that starts them.

Threading rule: a ``WorkerProcess`` is used by one thread at a time (the invocation
that holds it, or the reaper while it is idle). Only that thread closes its pipes;
anyone may ``terminate()`` it (SIGKILL + reap), which the holder then sees as EOF.
Closing a pipe under a thread blocked reading it could hand its fd number to an
unrelated file.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import site
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import strato
from strato.services import _frames
from strato.services._shm_lifetime import sweep_orphans

_F_SETPIPE_SZ = 1031  # Linux fcntl: bigger pipes move multi-MB events in fewer wakeups
_PIPE_BYTES = 1 << 20


class WorkerGone(Exception):
    """The worker process died (EOF on its pipe, or a write hit a closed pipe)."""


class WorkerInitFailed(Exception):
    """The handler could not be imported; carries the worker's error fields."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__(fields.get("message", ""))
        self.fields = dict(fields)


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], generation: int) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.pid = proc.pid
        self.generation = generation
        self.fresh = True  # no invocation served yet: the next one is a cold start
        self.last_used = time.monotonic()
        self._in = proc.stdin
        self._out = proc.stdout
        self._reader = _frames.FrameReader(proc.stdout.fileno())
        if sys.platform.startswith("linux"):
            import fcntl

            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)

    def send(self, frame: bytes) -> None:
        try:
            _frames.write_frame(self._in.fileno(), frame)
        except (ValueError, OSError):
            raise WorkerGone(self.describe_exit()) from None

    def receive(self, deadline: float | None) -> Any:
        """The next message; TimeoutError at the deadline, WorkerGone if the worker died."""
        try:
            return self._reader.read(deadline)
        except TimeoutError:
            raise  # an OSError subclass, but the worker is alive: the caller decides
        except (EOFError, ValueError, OSError):
            raise WorkerGone(self.describe_exit()) from None

    def wait_ready(self, deadline: float) -> None:
        message = self.receive(deadline)
        if message.get("op") == "init_error":
            raise WorkerInitFailed(message)
        if message.get("op") != "ready":
            raise WorkerGone(f"unexpected first message from worker: {message.get('op')!r}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """SIGKILL and reap. Safe from any thread; leaves the pipes to the holder."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        _unlink_segments_of([self])

    def dispose(self) -> None:
        """Kill, reap and close the pipes (only the thread holding the worker calls this)."""
        self.terminate()
        self._close_pipes()

    def retire(self, grace_s: float = 1.0) -> None:
        """Let an idle worker exit on its own (stdin EOF, so its atexit hooks run, e.g.
        a handler's own shm pool), then make sure it did."""
        retire_all([self], grace_s)

    def _close_pipes(self) -> None:
        for pipe in (self._in, self._out):
            with contextlib.suppress(OSError):
                pipe.close()

    def describe_exit(self) -> str:
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return f"worker {self.pid} closed its pipe"
        if code < 0:
            try:
                return f"worker {self.pid} was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"worker {self.pid} was killed by signal {-code}"
        return f"worker {self.pid} exited with status {code}"


def retire_all(workers: list[WorkerProcess], grace_s: float = 1.0) -> None:
    """Retire idle workers together: all get EOF at once, then share one grace period."""
    for worker in workers:
        with contextlib.suppress(OSError):
            worker._in.close()
    deadline = time.monotonic() + grace_s
    for worker in workers:
        try:
            worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.terminate()
        worker._close_pipes()
    _unlink_segments_of(workers)


def _unlink_segments_of(workers: list[WorkerProcess]) -> None:
    """Unlink the shared-memory segments of dead workers (a handler may own a ShmPool).

    A worker that exits on its own unlinks them itself (atexit); one that was SIGKILLed
    (timeout, crash, close of a busy or slow-to-exit worker) cannot, and its segments
    would stay in /dev/shm until some later pool's sweep."""
    if workers:
        sweep_orphans(owners=[w.pid for w in workers])


def worker_env(*layers: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: ours, overlaid by each layer in turn."""
    env = dict(os.environ)
    for layer in layers:
        env.update(layer)
    env.setdefault("PYTHONUNBUFFERED", "1")  # handler prints reach stderr promptly
    # Make sure the worker imports this very strato, even if our sys.path was tweaked.
    root = str(Path(strato.__file__).resolve().parent.parent)
    if root not in {str(Path(p).resolve()) for p in site.getsitepackages()}:
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in parts:
            env["PYTHONPATH"] = os.pathsep.join([*parts, root])
    return env


class Spawner:
    """Starts worker processes from one long-lived thread.

    A worker asks the kernel to SIGKILL it when its parent dies (PR_SET_PDEATHSIG), but
    Linux counts the *thread* that forked it as the parent: a worker started from a
    short-lived invocation thread would die with that thread. So every fork happens here.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[
            tuple[list[str], dict[str, str], Future[subprocess.Popen[bytes]]] | None
        ] = queue.SimpleQueue()
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="strato-spawner", daemon=True)
        self._thread.start()

    def spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        future: Future[subprocess.Popen[bytes]] = Future()
        with self._lock:
            if self._stopped:
                raise WorkerGone("the runtime is closed")
            self._requests.put((argv, env, future))
        return future.result()

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            argv, env, future = request
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,  # the protocol; never the user's terminal
                    stdout=subprocess.PIPE,
                    stderr=None,  # handler output and tracebacks go to our stderr
                    env=env,
                    close_fds=True,  # no worker holds another worker's pipes open
                    start_new_session=True,  # the terminal's Ctrl-C goes to us, not them
                )
            except BaseException as exc:  # handed to the waiting caller
                future.set_exception(exc)
            else:
                future.set_result(proc)

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._requests.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)
