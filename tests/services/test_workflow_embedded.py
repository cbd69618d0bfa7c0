"""The embedded Workflow's interpreter and leases, on an in-memory Table and a thread Runtime.

The conformance suite covers the same behaviour across processes on the real backend;
these tests pin the interpreter's own rules (what is persisted, what is re-run after a
resume, who may take a lease over) quickly and without any process machinery.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from strato.errors import (
    ConditionFailed,
    ConfigError,
    FunctionError,
    InvalidToken,
    InvocationTimeout,
    NotFound,
    UnknownFunction,
)
from strato.services import Item, RuntimeStats
from strato.services._workflow_embedded import EmbeddedWorkflow
from strato.services.asl import LAMBDA_INVOKE, LAMBDA_INVOKE_WAIT


class MemoryTable:
    """Just enough of the Table protocol: versioned items and compare-and-set."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], tuple[dict[str, Any], int]] = {}
        self.lock = threading.Lock()

    def create_table(self, table: str, *, stream: bool = True) -> None:
        pass

    def put(
        self,
        table: str,
        key: str,
        value: Mapping[str, Any],
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> int:
        with self.lock:
            old = self.items.get((table, key))
            if if_absent and old is not None:
                raise ConditionFailed(key)
            if if_version is not None and (old is None or old[1] != if_version):
                raise ConditionFailed(key)
            version = 1 if old is None else old[1] + 1
            self.items[(table, key)] = (dict(value), version)
            return version

    def get(self, table: str, key: str, *, consistent: bool = True) -> Item | None:
        with self.lock:
            found = self.items.get((table, key))
        return None if found is None else Item(key, dict(found[0]), found[1])

    def query(self, table: str, prefix: str = "") -> list[Item]:
        with self.lock:
            return [
                Item(k, dict(v), ver)
                for (t, k), (v, ver) in sorted(self.items.items())
                if t == table and k.startswith(prefix)
            ]

    def delete(self, table: str, key: str, *, if_version: int | None = None) -> None:
        with self.lock:
            self.items.pop((table, key), None)

    def read_stream(self, table: str, after: str | None = None, limit: int = 100) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class ThreadRuntime:
    """Functions are plain callables run on a thread pool; calls are counted by name."""

    def __init__(self, functions: dict[str, Callable[[Mapping[str, Any]], Any]]) -> None:
        self.functions = functions
        self.calls: dict[str, int] = {}
        self.pool = ThreadPoolExecutor(4)

    def register(self, spec: Any) -> None:
        raise NotImplementedError

    def invoke(self, name: str, event: Mapping[str, Any]) -> Any:
        return self.invoke_async(name, event).result()

    def invoke_async(self, name: str, event: Mapping[str, Any]) -> Future[Any]:
        if name == "bug":
            raise RuntimeError("a bug in the runtime")
        if name not in self.functions:
            raise UnknownFunction(f"no function named {name!r}")
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.pool.submit(self.functions[name], event)

    def stats(self, name: str | None = None) -> RuntimeStats:
        return RuntimeStats()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class Boom(FunctionError):
    error_type = "Boom"


@pytest.fixture
def table() -> MemoryTable:
    return MemoryTable()


@pytest.fixture
def tokens() -> list[str]:
    return []


@pytest.fixture
def runtime(tokens: list[str]) -> Iterator[ThreadRuntime]:
    failures = {"left": 0}

    def flaky(event: Mapping[str, Any]) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise Boom("Boom: not yet")
        return {"ok": event.get("n")}

    def slow(event: Mapping[str, Any]) -> Any:
        time.sleep(float(event["s"]))
        return {}

    def timeout(event: Mapping[str, Any]) -> Any:
        raise InvocationTimeout("ran past 1 s")

    runtime = ThreadRuntime(
        {
            "double": lambda e: {"n": e["n"] * 2},
            "flaky": flaky,
            "slow": slow,
            "timeout": timeout,
            "record_token": lambda e: tokens.append(e["token"]),
        }
    )
    runtime.functions["set_failures"] = lambda e: failures.update(left=e["n"])
    yield runtime
    runtime.close()


@pytest.fixture
def wf(table: MemoryTable, runtime: ThreadRuntime) -> Iterator[EmbeddedWorkflow]:
    workflow = EmbeddedWorkflow(table, lambda: runtime, poll_s=0.005, heartbeat_s=0.2)
    yield workflow
    workflow.close()


def invoke(fn: str, payload: Any = None, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"FunctionName": fn}
    params["Payload.$" if isinstance(payload, str) else "Payload"] = payload or {}
    return {"Type": "Task", "Resource": LAMBDA_INVOKE, "Parameters": params, **extra}


def callback(**extra: Any) -> dict[str, Any]:
    params = {"FunctionName": "record_token", "Payload": {"token.$": "$$.Task.Token"}}
    return {"Type": "Task", "Resource": LAMBDA_INVOKE_WAIT, "Parameters": params, **extra}


def run(wf: EmbeddedWorkflow, definition: dict[str, Any], data: Any = None) -> Any:
    wf.create_state_machine("m", definition)
    return wf.wait(wf.start("m", data or {}), timeout_s=30)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError("condition not met in time")


def test_a_lambda_task_result_is_shaped_like_step_functions(wf: EmbeddedWorkflow) -> None:
    definition = {
        "StartAt": "Double",
        "States": {"Double": invoke("double", "$", ResultPath="$.out", End=True)},
    }
    ex = run(wf, definition, {"n": 21})
    assert ex.status == "SUCCEEDED" and ex.state is None
    assert ex.output == {"n": 21, "out": {"Payload": {"n": 42}, "StatusCode": 200}}


def test_the_function_error_type_is_the_error_name_a_catcher_sees(
    wf: EmbeddedWorkflow, runtime: ThreadRuntime
) -> None:
    definition = {
        "StartAt": "Arm",
        "States": {
            "Arm": invoke("set_failures", {"n": 5}, ResultPath=None, Next="Try"),
            "Try": invoke(
                "flaky",
                Retry=[{"ErrorEquals": ["Other"], "MaxAttempts": 5}],
                Catch=[{"ErrorEquals": ["Boom"], "ResultPath": "$.caught", "Next": "Done"}],
                Next="Done",
            ),
            "Done": {"Type": "Succeed"},
        },
    }
    ex = run(wf, definition)
    assert ex.status == "SUCCEEDED"
    assert ex.output["caught"]["Error"] == "Boom"
    assert runtime.calls["flaky"] == 1  # the retrier did not match "Boom"


def test_retry_persists_its_attempts_and_backs_off(
    wf: EmbeddedWorkflow, runtime: ThreadRuntime
) -> None:
    retry = [
        {
            "ErrorEquals": ["States.TaskFailed"],
            "MaxAttempts": 2,
            "IntervalSeconds": 1,
            "BackoffRate": 1.0,
        }
    ]
    definition = {
        "StartAt": "Arm",
        "States": {
            "Arm": invoke("set_failures", {"n": 2}, ResultPath=None, Next="Try"),
            "Try": invoke("flaky", {"n": 7}, Retry=retry, End=True),
        },
    }
    began = time.monotonic()
    ex = run(wf, definition)
    assert ex.status == "SUCCEEDED" and ex.output["Payload"] == {"ok": 7}
    assert runtime.calls["flaky"] == 3
    assert time.monotonic() - began >= 2.0  # two back-offs of 1 s each
    definition["States"]["Arm"]["Parameters"]["Payload"] = {"n": 3}
    ex = run(wf, definition)
    assert (ex.status, ex.error) == ("FAILED", "Boom")


@pytest.mark.parametrize(
    ("fn", "error"),
    [("timeout", "States.Timeout"), ("missing", "Lambda.ResourceNotFoundException")],
)
def test_runtime_errors_have_step_functions_names(
    wf: EmbeddedWorkflow, fn: str, error: str
) -> None:
    ex = run(wf, {"StartAt": "T", "States": {"T": invoke(fn, End=True)}})
    assert (ex.status, ex.error) == ("FAILED", error)


def test_a_task_past_its_timeout_fails_with_states_timeout(wf: EmbeddedWorkflow) -> None:
    definition = {
        "StartAt": "T",
        "States": {"T": invoke("slow", {"s": 3}, TimeoutSeconds=1, End=True)},
    }
    began = time.monotonic()
    ex = run(wf, definition)
    assert (ex.status, ex.error) == ("FAILED", "States.Timeout")
    assert time.monotonic() - began < 2.9


def test_a_callback_completes_the_token_once(wf: EmbeddedWorkflow, tokens: list[str]) -> None:
    definition = {"StartAt": "Wait", "States": {"Wait": callback(ResultPath="$.cb", End=True)}}
    wf.create_state_machine("m", definition)
    ex_id = wf.start("m", {"x": 1})
    waiter = ThreadPoolExecutor(1)
    done = waiter.submit(wf.wait, ex_id, 30)
    token = wait_for(lambda: tokens and tokens[0])
    assert wf.describe(ex_id).state == "Wait"
    wf.send_task_success(token, {"answer": 42})
    ex = done.result()
    waiter.shutdown()
    assert ex.output == {"x": 1, "cb": {"answer": 42}}
    with pytest.raises(InvalidToken, match="no longer waiting"):
        wf.send_task_success(token, {})
    with pytest.raises(InvalidToken, match="unknown"):
        wf.send_task_failure("not-a-token", "E")


def test_a_token_failure_is_an_error_the_state_can_catch(
    wf: EmbeddedWorkflow, tokens: list[str]
) -> None:
    catch = [{"ErrorEquals": ["Rejected"], "Next": "Caught"}]
    definition = {
        "StartAt": "Wait",
        "States": {"Wait": callback(Catch=catch, End=True), "Caught": {"Type": "Succeed"}},
    }
    wf.create_state_machine("m", definition)
    ex_id = wf.start("m", {})
    threading.Thread(
        target=lambda: wf.send_task_failure(
            wait_for(lambda: tokens and tokens[0]), "Rejected", "no"
        )
    ).start()
    ex = wf.wait(ex_id, timeout_s=30)
    assert ex.status == "SUCCEEDED" and ex.output == {"Error": "Rejected", "Cause": "no"}


def test_a_paused_wait_resumes_on_the_same_token_without_invoking_again(
    table: MemoryTable, runtime: ThreadRuntime, wf: EmbeddedWorkflow, tokens: list[str]
) -> None:
    definition = {
        "StartAt": "Before",
        "States": {
            "Before": invoke("double", {"n": 1}, ResultPath="$.before", Next="Wait"),
            "Wait": callback(ResultPath="$.cb", End=True),
        },
    }
    wf.create_state_machine("m", definition)
    ex_id = wf.start("m", {})
    ex = wf.wait(ex_id, timeout_s=0.5)  # returns while waiting for the token
    assert (ex.status, ex.state) == ("RUNNING", "Wait")
    assert len(tokens) == 1 and runtime.calls == {"double": 1, "record_token": 1}
    other = EmbeddedWorkflow(table, lambda: runtime, poll_s=0.005)  # a fresh driver
    waiter = ThreadPoolExecutor(1)
    done = waiter.submit(other.wait, ex_id, 30)
    wait_for(lambda: table.get("wf_executions", ex_id).value["lease"])  # type: ignore[union-attr]
    time.sleep(0.2)  # the new driver is now polling the token
    wf.send_task_success(tokens[0], {"late": True})
    ex = done.result()
    waiter.shutdown()
    assert ex.output == {"before": {"Payload": {"n": 2}, "StatusCode": 200}, "cb": {"late": True}}
    assert runtime.calls == {"double": 1, "record_token": 1}


def test_token_timeout_and_execution_timeout(wf: EmbeddedWorkflow, tokens: list[str]) -> None:
    catch = [{"ErrorEquals": ["States.Timeout"], "ResultPath": "$.err", "Next": "Late"}]
    definition = {
        "StartAt": "Wait",
        "States": {
            "Wait": callback(TimeoutSeconds=1, Catch=catch, End=True),
            "Late": {"Type": "Pass", "Result": "late", "ResultPath": "$.verdict", "End": True},
        },
    }
    ex = run(wf, definition, {"a": 1})
    assert ex.status == "SUCCEEDED" and ex.output["verdict"] == "late"
    assert ex.output["err"]["Error"] == "States.Timeout"
    with pytest.raises(InvalidToken, match="timed out"):
        wf.send_task_success(tokens[-1], {})
    definition = {"StartAt": "Wait", "TimeoutSeconds": 1, "States": {"Wait": callback(End=True)}}
    ex = run(wf, definition)
    assert (ex.status, ex.error) == ("TIMED_OUT", "States.Timeout")
    with pytest.raises(InvalidToken):
        wf.send_task_success(tokens[-1], {})


def test_wait_state_is_durable(wf: EmbeddedWorkflow, table: MemoryTable) -> None:
    definition = {
        "StartAt": "Nap",
        "States": {
            "Nap": {"Type": "Wait", "SecondsPath": "$.s", "Next": "Done"},
            "Done": {"Type": "Succeed", "OutputPath": "$.s"},
        },
    }
    wf.create_state_machine("m", definition)
    ex_id = wf.start("m", {"s": 1})
    began = time.monotonic()
    assert wf.wait(ex_id, timeout_s=0.3).status == "RUNNING"
    ex = wf.wait(ex_id, timeout_s=30)  # continues the same nap, not a new one
    assert ex.output == 1
    assert 0.9 <= time.monotonic() - began < 1.8


def test_leases(wf: EmbeddedWorkflow, table: MemoryTable) -> None:
    wf.create_state_machine("m", {"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}})

    def held_by(pid: int, age_s: float = 0.0) -> str:
        ex_id = wf.start("m", {})
        item = table.get("wf_executions", ex_id)
        assert item is not None
        lease = {
            "id": "x",
            "pid": pid,
            "host": socket.gethostname(),
            "heartbeat": time.time() - age_s,
        }
        table.put("wf_executions", ex_id, {**item.value, "lease": lease})
        return ex_id

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert wf.wait(held_by(dead.pid), timeout_s=10).status == "SUCCEEDED"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert wf.wait(held_by(live.pid), timeout_s=0.3).status == "RUNNING"
        assert wf.wait(held_by(live.pid, age_s=60), timeout_s=10).status == "SUCCEEDED"
    finally:
        live.kill()
        live.wait()
    # held by this process, but by no driver in it (one that raised): free
    assert wf.wait(held_by(os.getpid()), timeout_s=10).status == "SUCCEEDED"


def test_start_is_idempotent_and_inputs_are_checked(wf: EmbeddedWorkflow) -> None:
    wf.create_state_machine("m", {"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}})
    assert wf.start("m", {"a": 1}, execution_id="e1") == "e1"
    assert wf.start("m", {"a": 2}, execution_id="e1") == "e1"
    assert wf.wait("e1", timeout_s=10).output == {"a": 1}
    wf.create_state_machine("n", {"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}})
    with pytest.raises(ConfigError, match="already exists"):
        wf.start("n", {}, execution_id="e1")
    with pytest.raises(NotFound):
        wf.start("nope", {})
    with pytest.raises(NotFound):
        wf.describe("nope")
    with pytest.raises(ConfigError, match="JSON"):
        wf.start("m", {"bad": object()})
    with pytest.raises(ConfigError, match="'Done'"):
        wf.create_state_machine("m", {"StartAt": "Done", "States": {"Done": {"Type": "Nope"}}})


def test_a_driver_that_crashes_hands_its_lease_back(
    wf: EmbeddedWorkflow, table: MemoryTable
) -> None:
    wf.create_state_machine("m", {"StartAt": "T", "States": {"T": invoke("bug", End=True)}})
    ex_id = wf.start("m", {})
    with pytest.raises(RuntimeError, match="a bug"):
        wf.wait(ex_id, timeout_s=10)
    item = table.get("wf_executions", ex_id)
    assert item is not None
    assert item.value["status"] == "RUNNING" and item.value["lease"] is None
    assert item.value["down_since"] <= time.time()  # down from then: deadlines wait


def test_time_the_run_was_down_does_not_count_against_a_token_deadline(
    wf: EmbeddedWorkflow, table: MemoryTable, tokens: list[str]
) -> None:
    """A run killed mid-round and resumed after its round deadline gets the rest of the
    round; a live caller's own pause is not down time."""
    wf.create_state_machine("m", {"StartAt": "Wait", "States": {"Wait": callback(
        TimeoutSeconds=600, End=True)}})  # fmt: skip
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def waiting(**changes: Any) -> str:
        ex_id = wf.start("m", {})
        assert wf.wait(ex_id, timeout_s=0.3).state == "Wait"  # the token is out
        item = table.get("wf_executions", ex_id)
        assert item is not None and item.value["lease"] is None
        table.put("wf_executions", ex_id, {**item.value, **changes})
        return ex_id

    # killed 30 s ago with 1.5 s of its round left: the deadline passed while it was down
    now = time.time()
    lease = {"id": "x", "pid": dead.pid, "host": socket.gethostname(), "heartbeat": now - 30}
    ex_id = waiting(lease=lease, token_deadline=now - 28.5)
    assert wf.wait(ex_id, timeout_s=0.5).status == "RUNNING"  # still open after takeover
    deadline = table.get("wf_executions", ex_id).value["token_deadline"]  # type: ignore[union-attr]
    assert 0.5 < deadline - time.time() <= 1.5
    ex = wf.wait(ex_id, timeout_s=30)  # ... and it still ends at the moved deadline
    assert (ex.status, ex.error) == ("FAILED", "States.Timeout")
    # stopped (Ctrl-C, or the workflow closed) 30 s ago with 1.5 s left: the same
    ex_id = waiting(down_since=now - 30, token_deadline=now - 28.5)
    assert wf.wait(ex_id, timeout_s=0.5).status == "RUNNING"
    assert wf.wait(ex_id, timeout_s=30).error == "States.Timeout"
    # a live caller's pause: the deadline is wall-clock, and it passed
    ex_id = waiting(token_deadline=now - 28.5)
    assert wf.wait(ex_id, timeout_s=5).error == "States.Timeout"
