"""Workflow conformance: the Step Functions semantics every backend keeps (services/workflow.py).

Machines are Amazon States Language; Task states invoke functions registered with the
same bundle's Runtime (handlers in ``wf_handlers.py``, which count their calls in the
bundle's Table). Callbacks come from other processes: a child that opens the bundle
with ``connect(services.config)``, and a function running inside a runtime worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from other_process import PRELUDE

from strato.errors import ConfigError, InvalidToken, NotFound
from strato.services import FunctionSpec, Services, Workflow

HANDLERS_DIR = str(Path(__file__).resolve().parent)  # holds wf_handlers.py
TABLE = "wf_conformance"  # where the handlers count their calls
LAMBDA = "arn:aws:states:::lambda:invoke"
LAMBDA_WAIT = "arn:aws:states:::lambda:invoke.waitForTaskToken"
HANDLERS = ("count", "hand_out_token", "call_back", "flaky")


def specs() -> list[FunctionSpec]:
    env = {"PYTHONPATH": HANDLERS_DIR}
    return [FunctionSpec(h, f"wf_handlers:{h}", timeout_s=30, env=env) for h in HANDLERS]


@pytest.fixture
def wf(services: Services) -> Workflow:
    workflow = services.workflow
    assert isinstance(workflow, Workflow)
    return workflow


@pytest.fixture
def tasks(services: Services) -> Services:
    """The bundle with the handlers registered (for machines that have Task states)."""
    services.table.create_table(TABLE)
    for spec in specs():
        services.runtime.register(spec)
    return services


def task(function: str, payload: Any, **fields: Any) -> dict[str, Any]:
    params = {"FunctionName": function, "Payload": payload}
    return {"Type": "Task", "Resource": LAMBDA, "Parameters": params, **fields}


def token_task(key: str, **fields: Any) -> dict[str, Any]:
    """A task that hands its token out through ``hand_out_token`` and waits for a callback."""
    params = {
        "FunctionName": "hand_out_token",
        "Payload": {"key": key, "token.$": "$$.Task.Token"},
    }
    return {"Type": "Task", "Resource": LAMBDA_WAIT, "Parameters": params, **fields}


def counter(services: Services, key: str) -> int:
    item = services.table.get(TABLE, key)
    return 0 if item is None else int(item.value["n"])


def wait_until(condition: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not true within {timeout_s} s")


def published_token(services: Services, key: str) -> str:
    item = wait_until(lambda: services.table.get(TABLE, f"token:{key}"))
    return str(item.value["token"])


def child(services: Services, script: str, *args: str) -> subprocess.Popen[str]:
    """A Python process that opens the same bundle as ``services`` (as ``svc``)."""
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + script, json.dumps(services.config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def background() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True)


# --- flows without tasks --------------------------------------------------------------------

CLASSIFY = {
    "Comment": "Pass, Choice, Succeed and Fail",
    "StartAt": "Start",
    "States": {
        "Start": {"Type": "Pass", "Parameters": {"n.$": "$.n", "trail": ["Start"]}, "Next": "Sort"},
        "Sort": {
            "Type": "Choice",
            "Choices": [
                {"Variable": "$.n", "NumericGreaterThanEquals": 10, "Next": "Big"},
                {
                    "And": [
                        {"Variable": "$.n", "IsNumeric": True},
                        {"Not": {"Variable": "$.n", "NumericGreaterThanEquals": 0}},
                    ],
                    "Next": "Negative",
                },
            ],
            "Default": "Small",
        },
        "Big": {"Type": "Pass", "Result": "big", "ResultPath": "$.size", "Next": "Done"},
        "Small": {"Type": "Pass", "Result": "small", "ResultPath": "$.size", "Next": "Done"},
        "Done": {"Type": "Succeed"},
        "Negative": {"Type": "Fail", "Error": "Negative", "Cause": "n must be >= 0"},
    },
}


def test_pass_choice_succeed_and_fail(wf: Workflow) -> None:
    wf.create_state_machine("classify", CLASSIFY)
    big, small, negative = (wf.start("classify", {"n": n, "extra": 1}) for n in (12, 3, -1))
    assert len({big, small, negative}) == 3
    ex = wf.wait(big, timeout_s=60)
    assert (ex.id, ex.state_machine, ex.status, ex.state) == (big, "classify", "SUCCEEDED", None)
    assert ex.output == {"n": 12, "trail": ["Start"], "size": "big"}
    assert wf.wait(small, timeout_s=60).output == {"n": 3, "trail": ["Start"], "size": "small"}
    ex = wf.wait(negative, timeout_s=60)
    assert (ex.status, ex.error, ex.cause) == ("FAILED", "Negative", "n must be >= 0")
    assert wf.describe(negative) == ex


def test_start_with_an_existing_id_does_not_start_twice(wf: Workflow) -> None:
    wf.create_state_machine("classify", CLASSIFY)
    assert wf.start("classify", {"n": 12}, execution_id="once") == "once"
    assert wf.start("classify", {"n": 3}, execution_id="once") == "once"
    assert wf.wait("once", timeout_s=60).output["size"] == "big"
    assert wf.start("classify", {"n": 3}, execution_id="once") == "once"
    assert wf.describe("once").output["size"] == "big"


def test_a_wait_state_waits(wf: Workflow) -> None:
    definition = {
        "StartAt": "Nap",
        "States": {"Nap": {"Type": "Wait", "Seconds": 1, "End": True}},
    }
    wf.create_state_machine("nap", definition)
    began = time.monotonic()
    ex = wf.wait(wf.start("nap", {"a": 1}), timeout_s=60)
    assert (ex.status, ex.output) == ("SUCCEEDED", {"a": 1})
    assert time.monotonic() - began >= 1.0


@pytest.mark.parametrize(
    "definition",
    [
        {"StartAt": "Missing", "States": {"Done": {"Type": "Succeed"}}},
        {"StartAt": "A", "States": {"A": {"Type": "Pass", "Next": "Nowhere"}}},
        {"StartAt": "A", "States": {"A": {"Type": "Pass"}}},
        {"StartAt": "A", "States": {"A": {"Type": "Teleport", "End": True}}},
        {"StartAt": "A", "States": {"A": {"Type": "Choice", "Choices": [], "Default": "A"}}},
        {"StartAt": "A", "States": {"A": {"Type": "Pass", "InputPath": "no-dollar", "End": True}}},
    ],
)
def test_an_invalid_definition_is_refused(wf: Workflow, definition: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        wf.create_state_machine("bad", definition)


def test_unknown_names_are_not_found(wf: Workflow) -> None:
    with pytest.raises(NotFound):
        wf.start("no-such-machine", {})
    with pytest.raises(NotFound):
        wf.describe("no-such-execution")


# --- Task states ----------------------------------------------------------------------------


def test_a_task_invokes_a_registered_function(tasks: Services, wf: Workflow) -> None:
    definition = {
        "StartAt": "Count",
        "States": {
            "Count": task("count", {"key": "k", "input.$": "$"}, ResultPath="$.res", End=True)
        },
    }
    wf.create_state_machine("count", definition)
    ex = wf.wait(wf.start("count", {"x": 1}), timeout_s=60)
    assert ex.status == "SUCCEEDED"
    payload = {"key": "k", "count": 1, "event": {"key": "k", "input": {"x": 1}}}
    assert ex.output == {"x": 1, "res": {"Payload": payload, "StatusCode": 200}}
    assert counter(tasks, "k") == 1


def test_a_failing_task_is_retried_then_caught(tasks: Services, wf: Workflow) -> None:
    retry = [{"ErrorEquals": ["Flaky"], "MaxAttempts": 2, "IntervalSeconds": 1, "BackoffRate": 1}]
    catch = [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Recovered"}]
    definition = {
        "StartAt": "Try",
        "States": {
            "Try": task(
                "flaky",
                {"key.$": "$.key", "fail.$": "$.fail"},
                ResultSelector={"attempt.$": "$.Payload.attempt"},
                Retry=retry,
                Catch=catch,
                End=True,
            ),
            "Recovered": {"Type": "Pass", "Result": True, "ResultPath": "$.recovered", "End": True},
        },
    }
    wf.create_state_machine("flaky", definition)
    began = time.monotonic()
    ex = wf.wait(wf.start("flaky", {"key": "twice", "fail": 2}), timeout_s=60)
    assert (ex.status, ex.output) == ("SUCCEEDED", {"attempt": 3})
    assert counter(tasks, "twice") == 3
    assert time.monotonic() - began >= 2.0  # two back-offs of IntervalSeconds
    ex = wf.wait(wf.start("flaky", {"key": "always", "fail": 9}), timeout_s=60)
    assert ex.status == "SUCCEEDED" and ex.output["recovered"] is True
    assert ex.output["error"]["Error"] == "Flaky"
    assert "failure 3 of 9" in ex.output["error"]["Cause"]
    assert counter(tasks, "always") == 3  # the first try and MaxAttempts retries


def test_token_callback_from_another_process(
    tasks: Services, wf: Workflow, background: ThreadPoolExecutor
) -> None:
    definition = {
        "StartAt": "Ask",
        "States": {"Ask": token_task("ask", ResultPath="$.answer", End=True)},
    }
    wf.create_state_machine("ask", definition)
    ex_id = wf.start("ask", {"q": "?"})
    done = background.submit(wf.wait, ex_id, 60)
    token = published_token(tasks, "ask")
    assert (wf.describe(ex_id).status, wf.describe(ex_id).state) == ("RUNNING", "Ask")
    proc = child(
        tasks,
        "svc.workflow.send_task_success(sys.argv[2], {'from': 'child', 'pid': os.getpid()})",
        token,
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    ex = done.result(timeout=60)
    assert ex.status == "SUCCEEDED"
    assert ex.output == {"q": "?", "answer": {"from": "child", "pid": proc.pid}}
    assert counter(tasks, "calls:ask") == 1
    with pytest.raises(InvalidToken):
        wf.send_task_success(token, {"again": True})
    with pytest.raises(InvalidToken):
        wf.send_task_failure(token, "Late")
    with pytest.raises(InvalidToken):
        wf.send_task_success("no-such-token", {})


def test_token_callback_from_inside_a_runtime_worker(tasks: Services, wf: Workflow) -> None:
    params = {"FunctionName": "call_back", "Payload": {"token.$": "$$.Task.Token"}}
    definition = {
        "StartAt": "Self",
        "States": {
            "Self": {"Type": "Task", "Resource": LAMBDA_WAIT, "Parameters": params, "End": True}
        },
    }
    wf.create_state_machine("self", definition)
    ex = wf.wait(wf.start("self", {}), timeout_s=60)
    assert ex.status == "SUCCEEDED"
    assert ex.output["from"] == "worker" and ex.output["pid"] != os.getpid()


def test_token_failure_fails_the_execution(
    tasks: Services, wf: Workflow, background: ThreadPoolExecutor
) -> None:
    wf.create_state_machine(
        "ask", {"StartAt": "Ask", "States": {"Ask": token_task("no", End=True)}}
    )
    done = background.submit(wf.wait, wf.start("ask", {}), 60)
    wf.send_task_failure(published_token(tasks, "no"), "Rejected", "not today")
    ex = done.result(timeout=60)
    assert (ex.status, ex.error, ex.cause) == ("FAILED", "Rejected", "not today")


def test_token_timeout_is_caught(tasks: Services, wf: Workflow) -> None:
    catch = [{"ErrorEquals": ["States.Timeout"], "ResultPath": "$.error", "Next": "TooLate"}]
    definition = {
        "StartAt": "Ask",
        "States": {
            "Ask": token_task("late", TimeoutSeconds=1, Catch=catch, End=True),
            "TooLate": {"Type": "Pass", "Result": "late", "ResultPath": "$.verdict", "End": True},
        },
    }
    wf.create_state_machine("late", definition)
    began = time.monotonic()
    ex = wf.wait(wf.start("late", {"q": 1}), timeout_s=60)
    assert time.monotonic() - began >= 1.0
    assert ex.status == "SUCCEEDED"
    assert ex.output["verdict"] == "late" and ex.output["error"]["Error"] == "States.Timeout"
    with pytest.raises(InvalidToken):
        wf.send_task_success(published_token(tasks, "late"), {"too": "late"})


def test_wait_returns_a_running_execution_at_its_timeout(tasks: Services, wf: Workflow) -> None:
    wf.create_state_machine("ask", {"StartAt": "Ask", "States": {"Ask": token_task("t", End=True)}})
    ex_id = wf.start("ask", {"a": 1})
    ex = wf.wait(ex_id, timeout_s=1.0)
    assert (ex.status, ex.state) == ("RUNNING", "Ask")
    wf.send_task_success(published_token(tasks, "t"), {"b": 2})
    assert wf.wait(ex_id, timeout_s=60).output == {"b": 2}
    assert counter(tasks, "calls:t") == 1


def test_an_execution_past_its_timeout_times_out(tasks: Services, wf: Workflow) -> None:
    definition = {
        "StartAt": "Ask",
        "TimeoutSeconds": 1,
        "States": {"Ask": token_task("x", End=True)},
    }
    wf.create_state_machine("slow", definition)
    ex = wf.wait(wf.start("slow", {}), timeout_s=60)
    assert ex.status == "TIMED_OUT"
    with pytest.raises(InvalidToken):
        wf.send_task_success(published_token(tasks, "x"), {})


# --- crash and resume -----------------------------------------------------------------------

DRIVE = """
for spec in json.loads(sys.argv[3]):
    svc.runtime.register(FunctionSpec(**spec))
svc.workflow.wait(sys.argv[2])
"""


def test_resume_after_the_driver_is_killed(
    tasks: Services, wf: Workflow, background: ThreadPoolExecutor
) -> None:
    count_into = {"count.$": "$.Payload.count"}
    definition = {
        "StartAt": "Before",
        "States": {
            "Before": task(
                "count",
                {"key": "before"},
                ResultSelector=count_into,
                ResultPath="$.before",
                Next="Mark",
            ),
            "Mark": {"Type": "Pass", "Result": "marked", "ResultPath": "$.mark", "Next": "Ask"},
            "Ask": token_task("resume", ResultPath="$.answer", Next="After"),
            "After": task(
                "count", {"key": "after"}, ResultSelector=count_into, ResultPath="$.after", End=True
            ),
        },
    }
    wf.create_state_machine("resume", definition)
    ex_id = wf.start("resume", {"run": 1}, execution_id="resume-1")
    driver = child(tasks, DRIVE, ex_id, json.dumps([dataclasses.asdict(s) for s in specs()]))
    try:
        token = published_token(tasks, "resume")
        time.sleep(1.5)  # the driver is now only waiting for the callback
        assert driver.poll() is None, driver.communicate()[1]
        assert (wf.describe(ex_id).status, wf.describe(ex_id).state) == ("RUNNING", "Ask")
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.communicate(timeout=60)
    assert wf.start("resume", {"run": 2}, execution_id="resume-1") == ex_id  # not a new run
    began = time.monotonic()
    done = background.submit(wf.wait, ex_id, 60)
    time.sleep(0.5)
    wf.send_task_success(token, {"ok": True})
    ex = done.result(timeout=60)
    # a dead driver's place is taken at once, not after some long lease expiry
    assert time.monotonic() - began < 12.0
    assert ex.status == "SUCCEEDED", (ex.error, ex.cause)
    assert ex.output == {
        "run": 1,
        "before": {"count": 1},
        "mark": "marked",
        "answer": {"ok": True},
        "after": {"count": 1},
    }
    # states that completed before the kill did not run again; the token was not re-issued
    assert counter(tasks, "before") == 1
    assert counter(tasks, "calls:resume") == 1
    assert counter(tasks, "after") == 1
