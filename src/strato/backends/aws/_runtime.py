"""Runtime on AWS Lambda: a FunctionSpec becomes a Lambda function.

``register`` creates (or updates) a function whose handler is Strato's entry point
(``lambda_entry.handler``) with the spec in its environment: Timeout = ``timeout_s``
rounded up, MemorySize = ``memory_mb``, reserved concurrency = ``max_concurrency``,
async retries = ``min(retries, 2)``. The code package is ``lambda_code`` from the
config (an S3 zip holding strato and the app, or a container image ``{"ImageUri":
...}`` whose command becomes the entry point); against an emulator endpoint, a
placeholder zip (the emulator runs the locally installed code).

What Lambda does and what is counted here:
- warm reuse, keep-alive and scale to zero, timeouts and max concurrency are Lambda's
  own; a throttled call (TooManyRequests) waits and tries again, which is the
  "the rest wait" of the Protocol;
- a crashed execution environment (``Runtime.ExitError``) is retried here up to
  ``retries`` times (synchronous Lambda calls are not retried by Lambda itself);
- stats come from what Lambda reports per call (``LogType=Tail``): the REPORT line's
  Billed Duration and Memory Size give ``billed_s`` and ``gb_s``, an Init Duration
  marks a cold start. ``live_workers`` is not observable and stays 0.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re
import threading
import time
import warnings
import zipfile
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from strato.backends.aws._boto import ClientError, Clients, error_code, error_message, http_status
from strato.backends.aws._iam import lambda_role, while_role_propagates
from strato.backends.aws._names import physical
from strato.errors import (
    ConfigError,
    FunctionError,
    InvocationTimeout,
    PayloadTooLarge,
    StratoError,
    UnknownFunction,
    WorkerCrashed,
)
from strato.services.runtime import FunctionSpec, RuntimeStats

__all__ = ["ENTRY_POINT", "LambdaFunctionError", "LambdaRuntime", "lambda_environment"]

ENTRY_POINT = "strato.backends.aws.lambda_entry.handler"
_MAX_MESSAGE_CHARS = 500
_THROTTLE_WAIT_S = 900.0
_CRASH_TYPES = ("Runtime.ExitError", "Runtime.OutOfMemory")
_REPORT = {
    "billed_ms": re.compile(r"Billed Duration: ([\d.]+) ms"),
    "memory_mb": re.compile(r"Memory Size: (\d+) MB"),
    "init_ms": re.compile(r"Init Duration: ([\d.]+) ms"),
}


class LambdaFunctionError(FunctionError):
    """A handler raised in Lambda: ``error_type`` / ``error_message`` are its own."""

    def __init__(self, function: str, error: Mapping[str, Any]) -> None:
        self.function_name = function
        self.error_type = str(error.get("errorType") or "Exception")
        self.error_message = str(error.get("errorMessage") or "")
        self.remote_traceback = "".join(str(line) for line in error.get("stackTrace") or [])
        text = " ".join(self.error_message.split())
        if len(text) > _MAX_MESSAGE_CHARS:
            text = text[: _MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(f"function {function!r} raised {self.error_type}: {text}")


def _check_spec(spec: FunctionSpec) -> None:
    module, _, attr = spec.handler.partition(":")
    problems = [
        (not spec.name, "a function needs a name"),
        (not module or not attr, f"handler must be 'module:function', got {spec.handler!r}"),
        (not 0 < spec.timeout_s <= 900, f"timeout_s must be in (0, 900], got {spec.timeout_s}"),
        (spec.max_concurrency < 1, f"max_concurrency must be ≥ 1, got {spec.max_concurrency}"),
        (spec.keep_alive_s < 0, f"keep_alive_s must be ≥ 0, got {spec.keep_alive_s}"),
        (spec.retries < 0, f"retries must be ≥ 0, got {spec.retries}"),
        (not 128 <= spec.memory_mb <= 10240, f"memory_mb must be 128–10240, got {spec.memory_mb}"),
        (spec.max_event_bytes < 1, f"max_event_bytes must be ≥ 1, got {spec.max_event_bytes}"),
    ]  # fmt: skip
    for bad, message in problems:
        if bad:
            raise ConfigError(f"function {spec.name!r}: {message}")


def _spec_json(spec: FunctionSpec) -> str:
    fields = dataclasses.asdict(spec)
    fields.pop("env")
    return json.dumps(fields, separators=(",", ":"))


def lambda_environment(services: Mapping[str, Any], spec: FunctionSpec) -> dict[str, str]:
    """The environment of the Lambda function that runs ``spec``: the handler to call,
    the spec, and the Services config without credentials (Lambda gets its own from
    its role) rooted in Lambda's writable /tmp."""
    config = {k: v for k, v in services.items() if k != "credentials"}
    config["root"] = str(services.get("lambda_root", "/tmp/strato"))
    return {
        **{str(k): str(v) for k, v in spec.env.items()},
        "STRATO_HANDLER": spec.handler,
        "STRATO_FUNCTION": spec.name,
        "STRATO_SPEC": _spec_json(spec),
        "STRATO_SERVICES": json.dumps(config, separators=(",", ":")),
    }


def _placeholder_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(
            "README.txt",
            "Placeholder package: the emulator this function was registered on runs the\n"
            "locally installed strato. On AWS, set 'lambda_code' in the Services config.\n",
        )
    return buf.getvalue()


class LambdaRuntime:
    """``Runtime`` on AWS Lambda (see the module doc)."""

    def __init__(self, clients: Clients) -> None:
        self._clients = clients
        self._config = clients.config
        # Synchronous calls may run for 15 minutes; botocore must not retry them.
        self._lambda = clients.client("lambda", read_timeout=910.0, max_attempts=1)
        self._admin = clients.client("lambda")
        self._specs: dict[str, FunctionSpec] = {}
        self._stats: dict[str, RuntimeStats] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(64, thread_name_prefix="strato-lambda")

    def _name(self, name: str) -> str:
        return physical("function", self._config.prefix, name)

    # --- registration -------------------------------------------------------------------

    def register(self, spec: FunctionSpec) -> None:
        _check_spec(spec)
        if self._config.lambda_code is not None:
            code: dict[str, Any] = dict(self._config.lambda_code)
        elif self._config.endpoint_url is not None:
            code = {"ZipFile": _placeholder_zip()}
        else:
            raise ConfigError(
                "registering a function on AWS needs 'lambda_code' in the Services config: "
                "an S3 object {'S3Bucket', 'S3Key'} holding strato and the app's code"
            )
        name = self._name(spec.name)
        settings: dict[str, Any] = {
            "FunctionName": name,
            "Role": lambda_role(self._clients),
            "Timeout": max(1, math.ceil(spec.timeout_s)),
            "MemorySize": spec.memory_mb,
            "Environment": {"Variables": lambda_environment(self._config.services, spec)},
        }
        if "ImageUri" in code:  # a container image: its command is the entry point
            settings["ImageConfig"] = {"Command": [ENTRY_POINT]}
        else:
            settings |= {"Runtime": self._config.lambda_runtime, "Handler": ENTRY_POINT}
        if self._config.lambda_layers:
            settings["Layers"] = list(self._config.lambda_layers)
        while_role_propagates(lambda: self._create_or_update(name, settings, code))
        self._settle(name)
        self._best_effort(
            "reserved concurrency",
            lambda: self._admin.put_function_concurrency(
                FunctionName=name, ReservedConcurrentExecutions=spec.max_concurrency
            ),
        )
        self._best_effort(
            "async retries",
            lambda: self._admin.put_function_event_invoke_config(
                FunctionName=name, MaximumRetryAttempts=min(2, spec.retries)
            ),
        )
        with self._lock:
            self._specs[spec.name] = spec
            self._stats.setdefault(spec.name, RuntimeStats())

    def _create_or_update(self, name: str, settings: dict[str, Any], code: dict[str, Any]) -> None:
        package = {"PackageType": "Image"} if "ImageUri" in code else {}
        try:
            self._admin.create_function(**settings, **package, Code=code, Publish=False)
            return
        except ClientError as exc:
            if error_code(exc) != "ResourceConflictException":
                raise
        self._settle(name)
        self._admin.update_function_configuration(**settings)
        self._settle(name)
        self._admin.update_function_code(FunctionName=name, **code)

    def _settle(self, name: str) -> None:
        """Wait until the function is Active with no update in progress."""
        deadline = time.monotonic() + 300.0
        while time.monotonic() < deadline:
            config = self._admin.get_function_configuration(FunctionName=name)
            if (
                config.get("State", "Active") != "Pending"
                and config.get("LastUpdateStatus", "Successful") != "InProgress"
            ):
                return
            time.sleep(1.0)
        raise ConfigError(f"Lambda function {name!r} did not become active in time")

    def _best_effort(self, what: str, action: Any) -> None:
        try:
            action()
        except ClientError as exc:
            warnings.warn(
                f"Lambda {what} not set ({error_code(exc)}: {error_message(exc)}); "
                "the function runs without it",
                RuntimeWarning,
                stacklevel=3,
            )

    def _spec(self, name: str) -> FunctionSpec:
        """The spec of a function registered here, or read back from the function."""
        with self._lock:
            spec = self._specs.get(name)
        if spec is not None:
            return spec
        try:
            config = self._admin.get_function_configuration(FunctionName=self._name(name))
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                raise UnknownFunction(f"no function named {name!r} is registered") from None
            raise
        variables = (config.get("Environment") or {}).get("Variables") or {}
        if "STRATO_SPEC" not in variables:
            raise UnknownFunction(f"Lambda function {self._name(name)!r} is not a Strato function")
        spec = FunctionSpec(**json.loads(variables["STRATO_SPEC"]))
        with self._lock:
            self._specs[name] = spec
            self._stats.setdefault(name, RuntimeStats())
        return spec

    # --- invocation ---------------------------------------------------------------------

    def _encode(self, name: str, event: Mapping[str, Any], spec: FunctionSpec) -> bytes:
        try:
            body = json.dumps(event, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise StratoError(f"the event for function {name!r} is not JSON: {exc}") from None
        if len(body) > spec.max_event_bytes:
            raise PayloadTooLarge(
                f"event of {len(body)} bytes is over function {name!r}'s limit of "
                f"{spec.max_event_bytes}"
            )
        return body

    def invoke(self, name: str, event: Mapping[str, Any]) -> Any:
        spec = self._spec(name)
        return self._run(name, spec, self._encode(name, event, spec))

    def invoke_async(self, name: str, event: Mapping[str, Any]) -> Future[Any]:
        spec = self._spec(name)  # unknown names and oversized events fail here, at once
        body = self._encode(name, event, spec)
        return self._pool.submit(self._run, name, spec, body)

    def invoke_event(self, name: str, event: Mapping[str, Any]) -> None:
        """Lambda's asynchronous ``Event`` invocation: queued by Lambda, no result."""
        spec = self._spec(name)
        self._call(name, self._encode(name, event, spec), "Event")

    def _run(self, name: str, spec: FunctionSpec, body: bytes) -> Any:
        stats = self._stats_for(name)
        with self._lock:
            stats.invocations += 1
        attempt = 0
        while True:
            reply, payload = self._call(name, body, "RequestResponse")
            self._account(stats, reply)
            error = reply.get("FunctionError")
            if not error:
                return json.loads(payload) if payload else None
            try:
                details = json.loads(payload)
            except ValueError:
                details = {"errorType": error, "errorMessage": payload.decode("utf-8", "replace")}
            if not isinstance(details, Mapping):
                details = {"errorType": error, "errorMessage": str(details)}
            kind = str(details.get("errorType") or "")
            message = str(details.get("errorMessage") or "")
            if kind == "Sandbox.Timedout" or "Task timed out" in message:
                with self._lock:
                    stats.errors += 1
                    stats.timeouts += 1
                raise InvocationTimeout(
                    f"function {name!r} ran past its {spec.timeout_s} s timeout"
                )
            if kind in _CRASH_TYPES:
                with self._lock:
                    stats.crashes += 1
                    if attempt < spec.retries:
                        stats.retries += 1
                if attempt < spec.retries:
                    attempt += 1
                    continue
                with self._lock:
                    stats.errors += 1
                raise WorkerCrashed(
                    f"function {name!r}: its execution environment died ({kind}: {message}) "
                    f"on every one of {attempt + 1} attempts"
                )
            with self._lock:
                stats.errors += 1
            raise LambdaFunctionError(name, details)

    def _call(self, name: str, body: bytes, kind: str) -> tuple[dict[str, Any], bytes]:
        """One Lambda Invoke; a throttled call waits for capacity (with back-off)."""
        give_up = time.monotonic() + _THROTTLE_WAIT_S
        pause = 0.05
        while True:
            try:
                reply = self._lambda.invoke(
                    FunctionName=self._name(name),
                    InvocationType=kind,
                    LogType="Tail" if kind == "RequestResponse" else "None",
                    Payload=body,
                )
            except ClientError as exc:
                code = error_code(exc)
                if code == "TooManyRequestsException" and time.monotonic() < give_up:
                    time.sleep(pause)
                    pause = min(1.0, pause * 1.5)
                    continue
                if code == "ResourceNotFoundException":
                    raise UnknownFunction(f"no function named {name!r} is registered") from None
                if code in ("RequestTooLargeException", "RequestEntityTooLargeException") or (
                    http_status(exc) == 413
                ):
                    raise PayloadTooLarge(
                        f"event of {len(body)} bytes is over Lambda's limit for function {name!r}"
                    ) from None
                raise
            stream = reply.get("Payload")
            return reply, (stream.read() if stream is not None else b"")

    def _stats_for(self, name: str) -> RuntimeStats:
        with self._lock:
            return self._stats.setdefault(name, RuntimeStats())

    def _account(self, stats: RuntimeStats, reply: Mapping[str, Any]) -> None:
        log = reply.get("LogResult")
        text = base64.b64decode(log).decode("utf-8", "replace") if log else ""
        found = {key: pattern.search(text) for key, pattern in _REPORT.items()}
        billed = float(found["billed_ms"].group(1)) / 1000 if found["billed_ms"] else 0.0
        memory = float(found["memory_mb"].group(1)) if found["memory_mb"] else 0.0
        with self._lock:
            stats.billed_s += billed
            stats.gb_s += billed * memory / 1024
            if found["init_ms"]:
                stats.cold_starts += 1

    def stats(self, name: str | None = None) -> RuntimeStats:
        if name is not None:
            self._spec(name)  # UnknownFunction unless Lambda has it
            return dataclasses.replace(self._stats_for(name))
        with self._lock:
            total = RuntimeStats()
            for one in self._stats.values():
                for field in dataclasses.fields(RuntimeStats):
                    setattr(
                        total, field.name, getattr(total, field.name) + getattr(one, field.name)
                    )
            return total

    def close(self) -> None:
        """Stop waiting for queued calls; Lambda itself has nothing of ours to stop."""
        self._pool.shutdown(wait=False, cancel_futures=True)
