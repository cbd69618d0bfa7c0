"""A local stand-in for the Lambda service's Invoke, for endpoints that cannot run code.

moto stores Lambda functions but runs their code only in Docker. This runs it in
local processes (``_lambda_worker``), one invocation at a time per process, exactly
as Lambda runs one per execution environment: the function's configuration (handler,
environment, timeout, memory, reserved concurrency, async retries) is read from the
emulator, so what runs is what was registered there. It answers in Lambda's own
wire format, so boto3 clients and Step Functions cannot tell the difference:

- a handler error: 200, ``X-Amz-Function-Error: Unhandled``, ``{errorType, errorMessage,
  stackTrace}``; past the timeout the process is killed and the error is
  ``Sandbox.Timedout``; a process that dies mid-call gives ``Runtime.ExitError``;
- more concurrent calls than the reserved concurrency: 429 ``TooManyRequestsException``;
- ``LogType=Tail``: the START/END/REPORT lines (Duration, Billed Duration, Memory
  Size, Max Memory Used, and Init Duration on a cold start) in ``X-Amz-Log-Result``;
- ``InvocationType=Event``: 202 at once; run later, retried on error up to the
  function's MaximumRetryAttempts (after 1 s, 2 s; Lambda waits minutes).

Workers idle longer than ``keep_alive_s`` are stopped; every worker dies with the
process that started it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from strato.backends.aws._boto import AwsConfig, ClientError, Clients, error_code

__all__ = ["LocalLambda", "Reply"]

SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024
EVENT_PAYLOAD_LIMIT = 256 * 1024
_INIT_TIMEOUT_S = 10.0  # Lambda's init phase limit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _error_reply(status: int, kind: str, message: str) -> Reply:
    body = json.dumps({"Type": "User", "Message": message, "message": message}).encode()
    return Reply(status, {"x-amzn-ErrorType": kind, "Content-Type": "application/json"}, body)


class _Spawner:
    """Starts every worker from one long-lived thread: a worker's PR_SET_PDEATHSIG
    fires when the *thread* that started it ends, and request threads come and go."""

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[dict[str, str], Future[subprocess.Popen[bytes]]]]
        self._requests = queue.Queue()
        threading.Thread(target=self._run, name="lambda-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            env, result = self._requests.get()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "strato.backends.aws.emulator._lambda_worker"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                )
            except BaseException as exc:
                result.set_exception(exc)
            else:
                result.set_result(proc)

    def spawn(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        result: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put((env, result))
        return result.result()


_SPAWNER = _Spawner()


class _Worker:
    def __init__(self, config: dict[str, Any], env: dict[str, str]) -> None:
        self.revision = str(config.get("RevisionId", ""))
        self.proc = _SPAWNER.spawn(env)
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.idle_since = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            for line in stdout:
                self.replies.put(json.loads(line))
        finally:
            stdout.close()
            self.replies.put(None)  # the process is gone

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):  # a broken pipe to a dead process
                self.proc.stdin.close()

    def exit_reason(self) -> str:
        code = self.proc.wait()
        return f"signal: {_signal_name(-code)}" if code < 0 else f"exit status {code}"


def _runtime_error(kind: str, message: str) -> dict[str, Any]:
    return {"errorType": kind, "errorMessage": message}


def _sent(worker: _Worker, message: dict[str, Any]) -> bool:
    try:
        worker.send(message)
    except OSError:
        return False
    return True


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name.removeprefix("SIG").lower()
    except ValueError:
        return str(number)


@dataclass
class _Function:
    idle: list[_Worker] = field(default_factory=list)
    running: int = 0


class LocalLambda:
    """Runs Invoke calls for the functions an emulator stores (see the module doc)."""

    def __init__(self, emulator_url: str, *, keep_alive_s: float = 30.0) -> None:
        self._emulator_url = emulator_url
        self._keep_alive_s = keep_alive_s
        self._clients: dict[str, Any] = {}
        self._functions: dict[str, _Function] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._usage: dict[str, dict[str, float]] = {}  # per function name: what Lambda bills
        threading.Thread(target=self._reap, daemon=True).start()

    def _lambda(self, region: str) -> Any:
        with self._lock:
            if region not in self._clients:
                config = AwsConfig.from_services(
                    {"endpoint_url": self._emulator_url, "region": region, "prefix": ""}
                )
                self._clients[region] = Clients(config).client("lambda", max_attempts=2)
            return self._clients[region]

    def function_config(self, region: str, function: str) -> dict[str, Any]:
        """The emulator's configuration of a function (by name or ARN)."""
        return dict(self._lambda(region).get_function_configuration(FunctionName=function))

    def usage(self) -> dict[str, dict[str, float]]:
        """Per function name: invocations, billed milliseconds, GB-seconds and cold starts
        of every invocation run here (synchronous, Event and event source mappings)."""
        with self._lock:
            return {name: dict(counts) for name, counts in self._usage.items()}

    def _count(self, config: dict[str, Any], duration_ms: float, cold: bool) -> None:
        billed = max(1, math.ceil(duration_ms))
        memory = int(config.get("MemorySize", 128))
        with self._lock:
            counts = self._usage.setdefault(
                str(config.get("FunctionName", "")),
                {"invocations": 0, "billed_ms": 0, "gb_s": 0.0, "cold_starts": 0},
            )
            counts["invocations"] += 1
            counts["billed_ms"] += billed
            counts["gb_s"] += billed / 1000 * memory / 1024
            counts["cold_starts"] += int(cold)

    # --- Invoke ---------------------------------------------------------------------------

    def invoke(
        self, region: str, function: str, payload: bytes, invocation_type: str, log_type: str
    ) -> Reply:
        client = self._lambda(region)
        try:
            config = client.get_function_configuration(FunctionName=function)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return _error_reply(
                    404, "ResourceNotFoundException", f"Function not found: {function}"
                )
            raise
        limit = EVENT_PAYLOAD_LIMIT if invocation_type == "Event" else SYNC_PAYLOAD_LIMIT
        if len(payload) > limit:
            return _error_reply(
                413,
                "RequestEntityTooLargeException",
                f"Request must be smaller than {limit} bytes for the InvokeFunction operation",
            )
        if invocation_type == "DryRun":
            return Reply(204, {}, b"")
        if invocation_type == "Event":
            threading.Thread(
                target=self._run_event, args=(client, config, payload), daemon=True
            ).start()
            return Reply(202, {}, b"")
        return self._invoke_now(client, config, payload, log_type == "Tail")

    def _reserved(self, client: Any, arn: str) -> int | None:
        try:
            value = client.get_function_concurrency(FunctionName=arn).get(
                "ReservedConcurrentExecutions"
            )
        except ClientError:
            return None
        return None if value is None else int(value)

    def _invoke_now(self, client: Any, config: dict[str, Any], payload: bytes, tail: bool) -> Reply:
        arn = str(config["FunctionArn"])
        reserved = self._reserved(client, arn)
        with self._lock:
            fn = self._functions.setdefault(arn, _Function())
            if reserved is not None and fn.running >= reserved:
                return _error_reply(429, "TooManyRequestsException", "Rate Exceeded.")
            fn.running += 1
        try:
            return self._run(fn, config, payload, tail)
        finally:
            with self._lock:
                fn.running -= 1

    def _run(self, fn: _Function, config: dict[str, Any], payload: bytes, tail: bool) -> Reply:
        request_id = str(uuid.uuid4())
        timeout = float(config.get("Timeout", 3))
        request = {
            "id": request_id,
            "arn": config["FunctionArn"],
            "payload": payload.decode("utf-8") if payload else "",
            "deadline_ms": time.time() * 1000 + timeout * 1000,
        }
        outcome, init_ms = self._execute(fn, config, request, timeout)
        # Lambda bills the init phase too (since August 2025), so a cold start counts it.
        duration = float(outcome.get("duration_ms", timeout * 1000))
        self._count(config, duration + (init_ms or 0.0), init_ms is not None)
        # No X-Amz-Executed-Version: Step Functions would copy it into every task result,
        # where the embedded backend (and the conformance suite) has Payload and StatusCode.
        headers = {"Content-Type": "application/json"}
        if tail:
            duration = float(outcome.get("duration_ms", timeout * 1000))
            report = (
                f"REPORT RequestId: {request_id}\tDuration: {duration:.2f} ms\t"
                f"Billed Duration: {math.ceil(duration)} ms\t"
                f"Memory Size: {int(config.get('MemorySize', 128))} MB\t"
                f"Max Memory Used: {int(outcome.get('max_rss_mb', 0))} MB\t"
            )
            if init_ms is not None:
                report += f"Init Duration: {init_ms:.2f} ms\t"
            log = f"START RequestId: {request_id} Version: $LATEST\nEND RequestId: {request_id}\n"
            headers["X-Amz-Log-Result"] = base64.b64encode((log + report + "\n").encode()).decode()
        if "error" in outcome:
            headers["X-Amz-Function-Error"] = "Unhandled"
            return Reply(200, headers, json.dumps(outcome["error"]).encode())
        return Reply(200, headers, str(outcome.get("payload", "null")).encode())

    def _execute(
        self, fn: _Function, config: dict[str, Any], request: dict[str, Any], timeout: float
    ) -> tuple[dict[str, Any], float | None]:
        """The worker's answer (``payload`` or ``error``, ``duration_ms``) and, for a cold
        start, the init duration. Lambda's own errors for a timeout or a dead runtime."""
        prefix = f"RequestId: {request['id']} Error:"
        worker: _Worker | None = None
        init_ms: float | None = None
        for _ in range(2):  # a warm worker may have died while idle: then start a fresh one
            worker, init_ms, error = self._worker(fn, config)
            if worker is None:
                return {"error": error}, init_ms
            if _sent(worker, request):
                break
            worker.kill()
            worker = None
        if worker is None:
            return {"error": _runtime_error("Runtime.ExitError", f"{prefix} Runtime exited")}, None
        try:
            reply = worker.replies.get(timeout=timeout)
        except queue.Empty:
            worker.kill()
            message = f"{prefix} Task timed out after {timeout:.2f} seconds"
            return {"error": _runtime_error("Sandbox.Timedout", message)}, init_ms
        if reply is None:
            reason = worker.exit_reason()
            worker.kill()
            message = f"{prefix} Runtime exited with error: {reason}"
            return {"error": _runtime_error("Runtime.ExitError", message)}, init_ms
        self._release(fn, worker)
        return reply, init_ms

    def _worker(
        self, fn: _Function, config: dict[str, Any]
    ) -> tuple[_Worker | None, float | None, dict[str, Any] | None]:
        """A warm worker of the current revision, or a new one: (worker, init_ms, error)."""
        revision = str(config.get("RevisionId", ""))
        stale: list[_Worker] = []
        with self._lock:
            stale = [w for w in fn.idle if w.revision != revision]
            fn.idle = [w for w in fn.idle if w.revision == revision]
            warm = fn.idle.pop() if fn.idle else None
        for worker in stale:
            worker.kill()
        if warm is not None:
            return warm, None, None
        worker = _Worker(config, self._environment(config))
        try:
            ready = worker.replies.get(timeout=_INIT_TIMEOUT_S)
        except queue.Empty:
            worker.kill()
            return (
                None,
                _INIT_TIMEOUT_S * 1000,
                {
                    "errorType": "Runtime.InitError",
                    "errorMessage": f"init ran past {_INIT_TIMEOUT_S} s",
                },
            )
        if ready is None or "error" in ready:
            reason = worker.exit_reason() if ready is None else ""
            worker.kill()
            error = (ready or {}).get("error") or {
                "errorType": "Runtime.ExitError",
                "errorMessage": f"Runtime exited during init: {reason}",
            }
            return None, None, error
        return worker, float(ready.get("init_ms", 0.0)), None

    def _environment(self, config: dict[str, Any]) -> dict[str, str]:
        arn = str(config["FunctionArn"])
        variables = (config.get("Environment") or {}).get("Variables") or {}
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in variables.items()})
        env.update(
            {
                "_HANDLER": str(config.get("Handler", "")),
                "AWS_LAMBDA_FUNCTION_NAME": str(config.get("FunctionName", "")),
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(config.get("MemorySize", 128)),
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_REGION": arn.split(":")[3],
                "AWS_DEFAULT_REGION": arn.split(":")[3],
            }
        )
        return env

    def _release(self, fn: _Function, worker: _Worker) -> None:
        worker.idle_since = time.monotonic()
        with self._lock:
            if not self._closed.is_set():
                fn.idle.append(worker)
                return
        worker.kill()

    # --- Event invocations ----------------------------------------------------------------

    def _run_event(self, client: Any, config: dict[str, Any], payload: bytes) -> None:
        try:
            retries = int(
                client.get_function_event_invoke_config(FunctionName=config["FunctionArn"]).get(
                    "MaximumRetryAttempts", 2
                )
            )
        except ClientError:
            retries = 2
        attempt = 0
        while not self._closed.is_set():
            reply = self._invoke_now(client, config, payload, tail=False)
            if reply.status == 429:
                time.sleep(0.1)  # queued by Lambda until there is capacity
                continue
            if "X-Amz-Function-Error" not in reply.headers or attempt >= retries:
                return
            attempt += 1
            time.sleep(float(attempt))

    # --- lifecycle ------------------------------------------------------------------------

    def _reap(self) -> None:
        while not self._closed.wait(0.5):
            now = time.monotonic()
            expired: list[_Worker] = []
            with self._lock:
                for fn in self._functions.values():
                    expired += [w for w in fn.idle if now - w.idle_since > self._keep_alive_s]
                    fn.idle = [w for w in fn.idle if now - w.idle_since <= self._keep_alive_s]
            for worker in expired:
                worker.kill()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            workers = [w for fn in self._functions.values() for w in fn.idle]
            for fn in self._functions.values():
                fn.idle = []
        for worker in workers:
            worker.kill()
