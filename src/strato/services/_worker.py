"""A runtime worker process: imports one handler once, then serves invocations.

Started by ``ProcessRuntime`` as ``python -m strato.services._worker FUNCTION HANDLER
PARENT_PID`` with pipes on stdin/stdout that carry JSON frames (``_frames``):

    worker -> parent  {"op": "ready"}                 handler imported (end of cold start)
                      {"op": "init_error", ...}       handler could not be imported
    parent -> worker  {"op": "invoke", "id", "event", "timeout_s"}
    worker -> parent  {"op": "result", "id", "ok": true, "result"}
                      {"op": "result", "id", "ok": false, "type", "message", "traceback"}
                      {"op": "invoke_async", "name", "event"}   (nested, from ctx)
    parent -> worker  {"op": "ack", "ok": true} | {"op": "ack", "ok": false, "type", "message"}

The worker exits when its stdin hits EOF, and dies with its parent (PR_SET_PDEATHSIG
on Linux, plus a watchdog that notices being re-parented), so no worker outlives the
run that started it. The parent's death is a SIGTERM, not a SIGKILL: the worker's
shared-memory guard unlinks the segments it made before it dies, so a run killed
outright (or a SIGTERM to all of its processes at once, as a service manager sends)
leaves nothing in /dev/shm; the watchdog's exit unlinks them too.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from strato.services import _frames
from strato.services._shm_lifetime import unlink_created

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still catches the parent's death

    def watchdog() -> None:
        # PDEATHSIG fires when the *thread* that spawned us exits and is Linux-only;
        # being re-parented is the portable sign that the parent is gone.
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        unlink_created()
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watchdog, name="strato-parent-watchdog", daemon=True).start()


class _Channel:
    """The protocol pipes, moved off fds 0/1 so handler prints and reads cannot touch them."""

    def __init__(self) -> None:
        self.out_fd = os.dup(1)
        self.reader = _frames.FrameReader(os.dup(0))
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # a handler reading stdin sees EOF, never the protocol
        os.close(devnull)
        os.dup2(2, 1)  # print() in a handler goes to the parent's stderr
        self.lock = threading.Lock()  # handler threads may call ctx.invoke_async at once

    def send(self, message: Any) -> None:
        _frames.write_frame(self.out_fd, _frames.encode(message))

    def receive(self) -> Any:
        return self.reader.read()


def _error_fields(exc: BaseException) -> dict[str, str]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


class WorkerContext:
    """The ``Context`` a handler receives (see ``strato.services.runtime.Context``)."""

    def __init__(
        self,
        channel: _Channel,
        function_name: str,
        invocation_id: str,
        cold: bool,
        timeout_s: float,
    ) -> None:
        self._channel = channel
        self.function_name = function_name
        self.invocation_id = invocation_id
        self.cold_start = cold
        self._deadline = time.monotonic() + timeout_s
        self._open = True

    def remaining_s(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def attach(self, ref: Mapping[str, Any]) -> memoryview:
        from strato.services import shm  # imported on first use: keeps cold starts lean

        return shm.attach(ref)

    def invoke_async(self, name: str, event: Mapping[str, Any],
                     node: str | None = None) -> None:  # one node here: ``node`` is moot
        from strato import errors

        with self._channel.lock:
            if not self._open:
                raise errors.StratoError(
                    f"context of invocation {self.invocation_id} used after it returned"
                )
            self._channel.send({"op": "invoke_async", "name": name, "event": event})
            ack = self._channel.receive()
        if not ack.get("ok"):
            kind = getattr(errors, str(ack.get("type")), errors.StratoError)
            if not (isinstance(kind, type) and issubclass(kind, errors.StratoError)):
                kind = errors.StratoError
            raise kind(ack.get("message", "nested invocation refused"))

    def close(self) -> None:
        with self._channel.lock:
            self._open = False


def _serve(channel: _Channel, function_name: str, handler: Callable[..., Any]) -> None:
    cold = True
    while True:
        try:
            request = channel.receive()
        except EOFError:
            return  # the parent closed our stdin: retire quietly
        ctx = WorkerContext(channel, function_name, request["id"], cold, request["timeout_s"])
        cold = False
        reply: dict[str, Any] = {"op": "result", "id": request["id"]}
        try:
            try:
                result = handler(request["event"], ctx)
            finally:
                ctx.close()
            frame = _result_frame(reply, result)
        except Exception as exc:
            frame = _frames.encode({**reply, "ok": False, **_error_fields(exc)})
        _frames.write_frame(channel.out_fd, frame)


def _result_frame(reply: dict[str, Any], result: Any) -> bytes:
    try:
        return _frames.encode({**reply, "ok": True, "result": result})
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the handler's result is not JSON-serialisable: {exc}") from None


def _load(handler_name: str) -> Callable[..., Any]:
    module_name, _, attr = handler_name.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{handler_name} is not callable")
    return target  # type: ignore[no-any-return]  # callable() narrowed it at runtime


def main(argv: list[str]) -> int:
    function_name, handler_name, parent_pid = argv[0], argv[1], int(argv[2])
    # Ctrl-C belongs to the parent: it stops the workers itself (and we run in our own
    # session anyway, so the terminal's SIGINT does not reach us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    channel = _Channel()
    try:
        handler = _load(handler_name)
    except BaseException as exc:  # a handler module may even sys.exit()
        channel.send({"op": "init_error", **_error_fields(exc)})
        return 1
    channel.send({"op": "ready", "pid": os.getpid()})
    _serve(channel, function_name, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
