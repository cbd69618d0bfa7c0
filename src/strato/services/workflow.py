"""Workflow: durable state machines with task tokens (the Step Functions model).

A state machine is data: a small subset of Amazon States Language, so the AWS
backend hands the same definition to Step Functions. Supported states: ``Task``
(``arn:aws:states:::lambda:invoke`` and its ``.waitForTaskToken`` form, with
``Parameters``, ``ResultPath``, ``TimeoutSeconds``, ``Retry``, ``Catch``), ``Choice``,
``Pass``, ``Wait``, ``Succeed`` and ``Fail``. A ``.waitForTaskToken`` task waits until
someone calls ``send_task_success(token, output)`` or ``send_task_failure`` (or its
``TimeoutSeconds`` passes: ``States.Timeout``). Execution state is persisted after
every transition, so a driver that is killed is resumed by the next one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["Execution", "Workflow"]

Status = Literal["RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"]


@dataclass(frozen=True)
class Execution:
    id: str
    state_machine: str
    status: Status
    state: str | None  # the current state while RUNNING
    output: Any = None
    error: str | None = None
    cause: str | None = None


@runtime_checkable
class Workflow(Protocol):
    def create_state_machine(self, name: str, definition: Mapping[str, Any]) -> None:
        """Create or update a state machine from an ASL definition (validated)."""
        ...

    def start(self, name: str, input: Mapping[str, Any], execution_id: str | None = None) -> str:
        """Start an execution (idempotent for a given ``execution_id``); returns its id."""
        ...

    def describe(self, execution_id: str) -> Execution: ...

    def wait(self, execution_id: str, timeout_s: float | None = None) -> Execution:
        """Block until the execution ends (or the timeout passes) and describe it."""
        ...

    def send_task_success(self, token: str, output: Mapping[str, Any]) -> None: ...

    def send_task_failure(self, token: str, error: str, cause: str = "") -> None: ...
