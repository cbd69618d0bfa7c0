"""One local Lambda execution environment:
``python -m strato.backends.aws.emulator._lambda_worker``.

Started by ``_local_lambda`` with the function's environment (``_HANDLER`` names the
``module.function`` to call, as in Lambda's Python runtime). It imports the handler
once (the init phase), then runs invocations one at a time, each read as one JSON
line from the parent and answered with one JSON line. The protocol uses the original
stdin/stdout file descriptors; the handler's own stdin is /dev/null and its stdout
goes to stderr, so a handler that prints cannot break the protocol.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import signal
import sys
import time
import traceback
from typing import Any, BinaryIO

_PR_SET_PDEATHSIG = 1


class _LambdaContext:
    """The context object Lambda's Python runtime passes to a handler."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.invoked_function_arn = str(request.get("arn", ""))
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        self.aws_request_id = str(request["id"])
        self.log_group_name = f"/aws/lambda/{self.function_name}"
        self.log_stream_name = "local"
        self._deadline_ms = float(request["deadline_ms"])

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int(self._deadline_ms - time.time() * 1000))


def _error(exc: BaseException, kind: str | None = None) -> dict[str, Any]:
    return {
        "errorMessage": str(exc),
        "errorType": kind or type(exc).__name__,
        "stackTrace": traceback.format_tb(exc.__traceback__),
    }


def _send(out: BinaryIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode("utf-8") + b"\n")
    out.flush()


def main() -> None:
    # Die with the parent (the local front), whatever way it goes.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        return
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - same

    started = time.perf_counter()
    module_name, _, attr = os.environ.get("_HANDLER", "").rpartition(".")
    try:
        if not module_name:
            raise ValueError(f"bad handler {os.environ.get('_HANDLER')!r}: want module.function")
        function = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:
        _send(proto_out, {"op": "ready", "error": _error(exc, "Runtime.ImportModuleError")})
        return
    _send(proto_out, {"op": "ready", "init_ms": (time.perf_counter() - started) * 1000})

    for line in proto_in:
        request = json.loads(line)
        started = time.perf_counter()
        reply: dict[str, Any] = {"op": "done", "id": request["id"]}
        try:
            payload = request.get("payload") or "{}"
            result = function(json.loads(payload), _LambdaContext(request))
        except Exception as exc:
            reply["error"] = _error(exc)
        else:
            try:
                reply["payload"] = json.dumps(result)
            except (TypeError, ValueError) as exc:
                reply["error"] = _error(exc, "Runtime.MarshalError")
        reply["duration_ms"] = (time.perf_counter() - started) * 1000
        reply["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        sys.stdout.flush()
        _send(proto_out, reply)


if __name__ == "__main__":
    main()
