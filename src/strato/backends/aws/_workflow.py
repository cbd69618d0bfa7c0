"""Workflow on AWS Step Functions: the embedded backend's ASL, handed to Step Functions.

``create_state_machine`` validates the definition with ``strato.services.asl`` (the
very check the embedded interpreter makes), then rewrites one thing: a ``lambda:invoke``
task's ``Parameters.FunctionName`` (a Strato function name) becomes the ARN of the
Lambda function ``LambdaRuntime.register`` made for it. Everything else — Choice,
Pass, Wait, Retry/Catch, ``.waitForTaskToken`` with ``$$.Task.Token`` and
``TimeoutSeconds`` — is Step Functions' own, and task outputs have its shape
(``{"Payload": ..., "StatusCode": 200, ...}``), which the embedded backend mirrors.

Execution ids: Step Functions names an execution within its state machine; Strato
ids are global. ``start`` keeps that: an id already used by another machine of this
prefix is a ``ConfigError``; the same id on the same machine returns it unchanged.
``describe``/``wait`` find an execution's machine from this process's cache or, for
an id started elsewhere, by looking at each machine of the prefix.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

from strato.backends.aws._boto import ClientError, Clients, error_code, error_message
from strato.backends.aws._iam import states_role, while_role_propagates
from strato.backends.aws._names import physical
from strato.errors import ConfigError, InvalidToken, NotFound
from strato.services import asl
from strato.services.workflow import Execution, Status

__all__ = ["StepFunctionsWorkflow", "to_step_functions"]

_STATUSES = {"RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"}
_MACHINE_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}")
_TOKEN_ERRORS = ("TaskDoesNotExist", "InvalidToken", "TaskTimedOut")


def to_step_functions(definition: Mapping[str, Any], function_arn: Any) -> dict[str, Any]:
    """The definition with each ``lambda:invoke`` task's FunctionName as a Lambda ARN
    (names that already are ARNs, and ``FunctionName.$`` paths, stay as they are)."""
    out = copy.deepcopy(dict(definition))
    for state in out.get("States", {}).values():
        if state.get("Type") != "Task" or state.get("Resource") not in asl.SUPPORTED_RESOURCES:
            continue
        params = state.get("Parameters")
        if isinstance(params, dict) and isinstance(params.get("FunctionName"), str):
            name = params["FunctionName"]
            if not name.startswith("arn:"):
                params["FunctionName"] = function_arn(name)
    return out


class StepFunctionsWorkflow:
    """``Workflow`` on Step Functions (see the module doc)."""

    def __init__(self, clients: Clients, *, poll_s: float = 0.1) -> None:
        self._clients = clients
        self._prefix = clients.config.prefix
        self._sfn = clients.client("stepfunctions")
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._executions: dict[str, tuple[str, str]] = {}  # id -> (machine, execution ARN)

    # --- names ------------------------------------------------------------------------

    def _machine_name(self, name: str) -> str:
        if not isinstance(name, str) or not _MACHINE_NAME.fullmatch(name):
            raise ConfigError(f"state machine name {name!r}: on AWS use 1-80 of A-Z a-z 0-9 - _")
        return physical("state machine", self._prefix, name)

    def _machine_arn(self, name: str) -> str:
        return self._clients.arn("states", f"stateMachine:{self._machine_name(name)}")

    def _execution_arn(self, machine: str, execution_id: str) -> str:
        return self._clients.arn(
            "states",
            f"execution:{self._machine_name(machine)}:{physical('execution', '', execution_id)}",
        )

    def _function_arn(self, name: str) -> str:
        return self._clients.arn("lambda", f"function:{physical('function', self._prefix, name)}")

    # --- state machines and executions ------------------------------------------------

    def create_state_machine(self, name: str, definition: Mapping[str, Any]) -> None:
        physical_name = self._machine_name(name)
        asl.validate(definition)
        document = json.dumps(to_step_functions(definition, self._function_arn))
        role = states_role(self._clients)
        arn = self._machine_arn(name)
        try:
            self._sfn.describe_state_machine(stateMachineArn=arn)
        except ClientError as exc:
            if error_code(exc) != "StateMachineDoesNotExist":
                raise
            try:
                while_role_propagates(
                    lambda: self._sfn.create_state_machine(
                        name=physical_name, definition=document, roleArn=role, type="STANDARD"
                    )
                )
                return
            except ClientError as again:
                if error_code(again) != "StateMachineAlreadyExists":
                    raise self._definition_error(name, again) from None
        try:
            while_role_propagates(
                lambda: self._sfn.update_state_machine(
                    stateMachineArn=arn, definition=document, roleArn=role
                )
            )
        except ClientError as exc:
            raise self._definition_error(name, exc) from None

    def _definition_error(self, name: str, exc: BaseException) -> Exception:
        if error_code(exc) in ("InvalidDefinition", "InvalidArn", "ValidationException"):
            return ConfigError(f"state machine {name!r}: Step Functions says {error_message(exc)}")
        return exc if isinstance(exc, Exception) else RuntimeError(str(exc))

    def start(self, name: str, input: Mapping[str, Any], execution_id: str | None = None) -> str:
        machine_arn = self._machine_arn(name)
        try:
            document = json.dumps(input, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the execution input must be JSON: {exc}") from None
        if execution_id is not None:
            found = self._find(execution_id)
            if found is not None:
                machine, _ = found
                if machine != name:
                    raise ConfigError(
                        f"execution {execution_id!r} already exists for state machine "
                        f"{machine!r}, not {name!r}"
                    )
                return execution_id
        execution_id = execution_id or f"{name}-{uuid.uuid4().hex}"
        try:
            reply = self._sfn.start_execution(
                stateMachineArn=machine_arn,
                name=physical("execution", "", execution_id),
                input=document,
            )
        except ClientError as exc:
            code = error_code(exc)
            if code == "StateMachineDoesNotExist":
                raise NotFound(f"no state machine named {name!r}") from None
            if code != "ExecutionAlreadyExists":
                raise
            arn = self._execution_arn(name, execution_id)  # a racing start with this id won
        else:
            arn = str(reply["executionArn"])
        with self._lock:
            self._executions[execution_id] = (name, arn)
        return execution_id

    def _find(self, execution_id: str) -> tuple[str, str] | None:
        """(machine, execution ARN) of an execution id, or None."""
        with self._lock:
            cached = self._executions.get(execution_id)
        if cached is not None:
            return cached
        for page in self._sfn.get_paginator("list_state_machines").paginate():
            for machine in page.get("stateMachines", []):
                physical_name = str(machine["name"])
                if not physical_name.startswith(self._prefix):
                    continue
                logical = physical_name[len(self._prefix) :]
                arn = self._execution_arn(logical, execution_id)
                try:
                    self._sfn.describe_execution(executionArn=arn)
                except ClientError as exc:
                    if error_code(exc) in ("ExecutionDoesNotExist", "InvalidArn"):
                        continue
                    raise
                with self._lock:
                    self._executions[execution_id] = (logical, arn)
                return logical, arn
        return None

    def _located(self, execution_id: str) -> tuple[str, str]:
        found = self._find(execution_id)
        if found is None:
            raise NotFound(f"no workflow execution {execution_id!r}")
        return found

    def describe(self, execution_id: str) -> Execution:
        machine, arn = self._located(execution_id)
        return self._describe(execution_id, machine, arn)

    def _describe(self, execution_id: str, machine: str, arn: str) -> Execution:
        raw = self._sfn.describe_execution(executionArn=arn)
        status = str(raw["status"])
        if status not in _STATUSES:  # PENDING_REDRIVE: failed, may be redriven
            status = "FAILED"
        output = json.loads(raw["output"]) if raw.get("output") else None
        return Execution(
            id=execution_id,
            state_machine=machine,
            status=cast(Status, status),
            state=self._current_state(arn) if status == "RUNNING" else None,
            output=output,
            error=raw.get("error"),
            cause=raw.get("cause"),
        )

    def _current_state(self, arn: str) -> str | None:
        """The state the execution last entered: the newest StateEntered event (by id,
        because moto ignores ``reverseOrder`` where Step Functions honours it)."""
        reply = self._sfn.get_execution_history(executionArn=arn, reverseOrder=True, maxResults=100)
        entered = [
            event
            for event in reply.get("events", [])
            if event.get("stateEnteredEventDetails")
            and str(event.get("type", "")).endswith("StateEntered")
        ]
        if not entered:
            return None
        newest = max(entered, key=lambda event: int(event.get("id", 0)))
        return str(newest["stateEnteredEventDetails"]["name"])

    def wait(self, execution_id: str, timeout_s: float | None = None) -> Execution:
        machine, arn = self._located(execution_id)
        until = None if timeout_s is None else time.monotonic() + timeout_s
        pause = min(0.05, self._poll_s)
        while True:
            status = str(self._sfn.describe_execution(executionArn=arn)["status"])
            if status != "RUNNING" or (until is not None and time.monotonic() >= until):
                return self._describe(execution_id, machine, arn)
            left = None if until is None else until - time.monotonic()
            time.sleep(pause if left is None else max(0.0, min(pause, left)))
            pause = min(self._poll_s * 5, pause * 1.5)

    # --- callbacks --------------------------------------------------------------------

    def send_task_success(self, token: str, output: Mapping[str, Any]) -> None:
        try:
            document = json.dumps(output, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the task output must be JSON: {exc}") from None
        self._callback(token, lambda: self._sfn.send_task_success(taskToken=token, output=document))

    def send_task_failure(self, token: str, error: str, cause: str = "") -> None:
        self._callback(
            token,
            lambda: self._sfn.send_task_failure(
                taskToken=token, error=str(error)[:256], cause=str(cause)[:32768]
            ),
        )

    def _callback(self, token: str, call: Any) -> None:
        if not isinstance(token, str) or not token:
            raise InvalidToken(f"unknown task token {str(token)[:16]!r}…")
        try:
            call()
        except ClientError as exc:
            code = error_code(exc)
            if code in _TOKEN_ERRORS or code == "ValidationException":
                state = {
                    "TaskTimedOut": "its task timed out",
                    "TaskDoesNotExist": "its task is no longer waiting",
                }.get(code, "unknown token")
                raise InvalidToken(f"task token {token[:16]!r}…: {state}") from None
            raise

    def close(self) -> None:
        """Nothing runs here: Step Functions drives the executions."""
