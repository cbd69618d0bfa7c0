"""The interpreter loop of one execution, run by whoever holds the execution's lease.

Durability rule: the execution record (one Table item) is rewritten with a
compare-and-set on its version after every transition, and the write that says
"state X finished with output Y, the next state is Z" is the one that moves on, so a
state that completed never runs again after a resume. What is in flight is re-run by
the next driver (a Lambda task: at-least-once, as in Step Functions), except a
``.waitForTaskToken`` task whose token is recorded: the next driver keeps waiting on
that token. (If the first driver died before the function it invoked with the token
returned, the next one invokes it again with the *same* token, so a callback that
was already sent still counts and the execution cannot hang on a token nobody got.)

Every write carries the lease with a fresh heartbeat; a write that fails its
version check means another driver took over, and this one stops at once.

Time the execution spent with no driver because its process was down (killed: since
the dead driver's last heartbeat; stopped or crashed: since it handed the lease back,
``down_since``) does not count against a task token's deadline: the next driver moves
the deadline on by that long, so a run resumed after its round deadline gets the rest
of the round, not a round closed at once. A caller's own pause (``wait`` with a
timeout, in a live process) is not down time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from strato.errors import (
    ConditionFailed,
    FunctionError,
    InvocationTimeout,
    PayloadTooLarge,
    StratoError,
    UnknownFunction,
    WorkerCrashed,
)
from strato.services import asl
from strato.services.runtime import Runtime
from strato.services.table import Item, Table

__all__ = ["EXECUTIONS", "TOKENS", "Driver", "LostLease"]

EXECUTIONS = "wf_executions"
TOKENS = "wf_tokens"
TIMEOUT = "States.Timeout"


class LostLease(Exception):
    """Another driver took the execution over (it judged this one dead)."""


class _Paused(Exception):
    """The caller's wait timed out (or the workflow is closing): stop, keep the state."""


class _ExecutionTimedOut(Exception):
    """The execution ran past its top-level TimeoutSeconds."""


class Driver:
    def __init__(
        self,
        table: Table,
        runtime: Callable[[], Runtime],
        item: Item,
        lease: dict[str, Any],
        *,
        until: float | None,
        stopping: threading.Event,
        poll_s: float,
        heartbeat_s: float,
        down_since: float | None = None,
    ) -> None:
        self._table, self._runtime = table, runtime
        self.rec: dict[str, Any] = dict(item.value)
        self._version = item.version
        self._lease = lease
        self._until, self._stopping = until, stopping
        self._poll_s, self._heartbeat_s = poll_s, heartbeat_s
        self._beat_at = time.time()
        self._down_since = down_since

    # --- persistence ---------------------------------------------------------------------

    def _save(self, **changes: Any) -> None:
        """One compare-and-set write of the record; the lease rides along, renewed."""
        new = {**self.rec, "lease": {**self._lease, "heartbeat": time.time()}, **changes}
        try:
            self._version = self._table.put(
                EXECUTIONS, self.rec["id"], new, if_version=self._version
            )
        except ConditionFailed:
            raise LostLease(self.rec["id"]) from None
        self.rec = new
        self._beat_at = time.time()

    def _beat(self) -> None:
        if time.time() - self._beat_at >= self._heartbeat_s:
            self._save()

    def _goto(self, name: str, output: Any) -> None:
        self._save(
            state=name,
            state_input=output,
            entered_at=time.time(),
            step=self.rec["step"] + 1,
            retries={},
            not_before=None,
            token=None,
            token_deadline=None,
            invoked=False,
        )

    def _finish(
        self, status: str, output: Any = None, error: str | None = None, cause: str | None = None
    ) -> None:
        if self.rec.get("token"):
            _close_token(self._table, self.rec["token"])
        self._save(
            status=status,
            output=output,
            error=error,
            cause=cause,
            stopped_at=time.time(),
            lease=None,
        )

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Drive until the execution ends or the caller's ``until`` passes (then release)."""
        try:
            self._discount_down_time()
            while self.rec["status"] == "RUNNING":
                self._check_clock()
                try:
                    self._step(self.rec["definition"]["States"][self.rec["state"]])
                except asl.StatesError as exc:
                    self._on_error(exc)
        except _ExecutionTimedOut:
            self._finish(
                "TIMED_OUT", error=TIMEOUT, cause="the execution ran past its TimeoutSeconds"
            )
        except _Paused:  # the workflow closing is down time; the caller's own pause is not
            self._save(lease=None, down_since=time.time() if self._stopping.is_set() else None)
        except LostLease:
            raise
        except BaseException:
            # A bug, a broken table or Ctrl-C: hand the execution back at once, so the
            # next caller of wait() (in any process) need not wait for the lease to expire.
            with contextlib.suppress(Exception):
                self._save(lease=None, down_since=time.time())
            raise

    def _discount_down_time(self) -> None:
        """Move a token's deadline on by the time no driver ran (see the module's doc)."""
        deadline, since = self.rec.get("token_deadline"), self._down_since
        if since is None:
            return
        shift = max(0.0, time.time() - since)
        self._save(down_since=None,
                   token_deadline=None if deadline is None else deadline + shift)

    def _check_clock(self) -> None:
        now = time.time()
        deadline = self.rec.get("deadline")
        if deadline is not None and now >= deadline:
            raise _ExecutionTimedOut
        if self._stopping.is_set() or (self._until is not None and now >= self._until):
            raise _Paused

    def _sleep_until(self, wake_at: float) -> None:
        while True:
            self._check_clock()
            left = wake_at - time.time()
            if left <= 0:
                return
            self._beat()
            time.sleep(min(left, self._heartbeat_s, 0.2))

    def _context(self, token: str | None = None) -> dict[str, Any]:
        rec = self.rec
        return {
            "Execution": {
                "Id": rec["id"],
                "Name": rec["id"],
                "Input": rec["input"],
                "StartTime": _iso(rec["started_at"]),
            },
            "StateMachine": {"Id": rec["state_machine"], "Name": rec["state_machine"]},
            "State": {
                "Name": rec["state"],
                "EnteredTime": _iso(rec["entered_at"]),
                "RetryCount": sum(rec["retries"].values()),
            },
            "Task": {"Token": token},
        }

    def _step(self, state: Mapping[str, Any]) -> None:
        data, kind = self.rec["state_input"], state["Type"]
        if kind == "Pass":
            self._next(state, asl.pass_output(state, data, self._context()))
        elif kind == "Choice":
            chosen = asl.choose_next(state, asl.filter_input(state, data))
            self._goto(chosen, asl.filter_output(state, data))
        elif kind == "Succeed":
            self._finish("SUCCEEDED", output=asl.filter_output(state, data))
        elif kind == "Fail":
            self._finish("FAILED", error=state.get("Error"), cause=state.get("Cause"))
        elif kind == "Wait":
            if self.rec["not_before"] is None:
                self._save(not_before=asl.wait_until(state, data, time.time()))
            self._sleep_until(self.rec["not_before"])
            self._next(state, asl.filter_output(state, data))
        else:
            self._task(state, data)

    def _next(self, state: Mapping[str, Any], output: Any) -> None:
        if state.get("End"):
            self._finish("SUCCEEDED", output=output)
        else:
            self._goto(state["Next"], output)

    def _on_error(self, exc: asl.StatesError) -> None:
        state = self.rec["definition"]["States"][self.rec["state"]]
        if state["Type"] != "Task" or exc.error == asl.RUNTIME:
            self._finish("FAILED", error=exc.error, cause=exc.cause)
            return
        retriers = state.get("Retry", [])
        index = asl.find_retrier(retriers, exc.error)
        if index is not None:
            done = self.rec["retries"].get(str(index), 0)
            delay = asl.retry_delay(retriers[index], done)
            if delay is not None:
                self._save(
                    retries={**self.rec["retries"], str(index): done + 1},
                    not_before=time.time() + delay,
                    token=None,
                    token_deadline=None,
                    invoked=False,
                )
                return
        catcher = asl.find_catcher(state.get("Catch", []), exc.error)
        if catcher is None:
            self._finish("FAILED", error=exc.error, cause=exc.cause)
            return
        caught = {"Error": exc.error, "Cause": exc.cause}
        try:
            output = asl.set_result(self.rec["state_input"], caught, catcher.get("ResultPath", "$"))
        except asl.StatesError as bad:
            self._finish("FAILED", error=bad.error, cause=bad.cause)
            return
        self._goto(catcher["Next"], output)

    # --- Task states -------------------------------------------------------------------------

    def _task(self, state: Mapping[str, Any], data: Any) -> None:
        if self.rec["not_before"] is not None:  # a retry's back-off, durable across resumes
            self._sleep_until(self.rec["not_before"])
        if state["Resource"] == asl.LAMBDA_INVOKE_WAIT:
            result = self._wait_for_token(state, data)
        else:
            timeout = state.get("TimeoutSeconds")
            task_deadline = None if timeout is None else time.time() + timeout
            payload = asl.effective_input(state, data, self._context())
            future = self._invoke(payload)
            while not future.done():
                if task_deadline is not None and time.time() >= task_deadline:
                    future.cancel()
                    raise asl.StatesError(TIMEOUT, f"the task ran past {timeout} s")
                self._check_clock()
                self._beat()
                concurrent.futures.wait([future], timeout=self._poll_s * 5)
            result = {"Payload": self._result(future), "StatusCode": 200}
        self._next(state, asl.state_output(state, data, result, self._context()))

    def _invoke(self, parameters: Any) -> concurrent.futures.Future[Any]:
        name = parameters.get("FunctionName") if isinstance(parameters, Mapping) else None
        if not isinstance(name, str):
            raise asl.StatesError(asl.RUNTIME, "Parameters.FunctionName must be a string")
        event = parameters.get("Payload", {})
        if not isinstance(event, Mapping):
            raise asl.StatesError(asl.RUNTIME, "Parameters.Payload must be a JSON object")
        try:
            return self._runtime().invoke_async(name, event)
        except StratoError as exc:
            if self._stopping.is_set():
                raise _Paused from None
            raise task_error(exc) from None

    def _result(self, future: concurrent.futures.Future[Any]) -> Any:
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise asl.StatesError(TIMEOUT, "the invocation was cancelled") from None
        except StratoError as exc:
            if self._stopping.is_set():
                raise _Paused from None  # the runtime is closing under us: not the task's fault
            raise task_error(exc) from None

    def _wait_for_token(self, state: Mapping[str, Any], data: Any) -> Any:
        if self.rec["token"] is None:
            token = secrets.token_urlsafe(32)
            timeout = state.get("TimeoutSeconds")
            deadline = None if timeout is None else time.time() + timeout
            record = {
                "execution": self.rec["id"],
                "state": self.rec["state"],
                "status": "WAITING",
                "issued_at": time.time(),
                "deadline": deadline,
            }
            self._table.put(TOKENS, token, record, if_absent=True)
            self._save(token=token, token_deadline=deadline, invoked=False)
        token = self.rec["token"]
        future: concurrent.futures.Future[Any] | None = None
        while True:
            item = self._table.get(TOKENS, token)
            if item is None:
                raise asl.StatesError(asl.RUNTIME, f"the task token record {token} is gone")
            record = item.value
            status = record["status"]
            if status == "SUCCEEDED":
                return record.get("output")
            if status != "WAITING":
                raise asl.StatesError(record.get("error") or TIMEOUT, record.get("cause") or "")
            if not self.rec["invoked"]:
                if future is None:
                    payload = asl.effective_input(state, data, self._context(token))
                    try:
                        future = self._invoke(payload)
                    except asl.StatesError as exc:
                        _end_token(self._table, token, "FAILED", exc.error, exc.cause)
                        continue
                elif future.done():
                    try:
                        self._result(future)
                    except asl.StatesError as exc:
                        _end_token(self._table, token, "FAILED", exc.error, exc.cause)
                        continue
                    self._save(invoked=True)
            deadline = self.rec["token_deadline"]
            if deadline is not None and time.time() >= deadline:
                _end_token(
                    self._table,
                    token,
                    "TIMED_OUT",
                    TIMEOUT,
                    f"no callback within {state.get('TimeoutSeconds')} s",
                )
                continue  # re-read: a callback may have won the race
            self._check_clock()
            self._beat()
            time.sleep(self._poll_s)


def task_error(exc: StratoError) -> asl.StatesError:
    """A Runtime error as the error name a Step Functions ``lambda:invoke`` task reports."""
    if isinstance(exc, FunctionError):
        # Lambda reports a handler's exception class as the error and a JSON cause.
        kind = getattr(exc, "error_type", None) or "States.TaskFailed"
        message = getattr(exc, "error_message", None)
        cause = (
            str(exc)
            if message is None
            else json.dumps({"errorMessage": message, "errorType": kind})
        )
        return asl.StatesError(str(kind), cause)
    if isinstance(exc, InvocationTimeout):
        return asl.StatesError(TIMEOUT, str(exc))
    if isinstance(exc, UnknownFunction):
        return asl.StatesError("Lambda.ResourceNotFoundException", str(exc))
    if isinstance(exc, PayloadTooLarge):
        return asl.StatesError("Lambda.RequestTooLargeException", str(exc))
    if isinstance(exc, WorkerCrashed):
        return asl.StatesError("Lambda.ServiceException", str(exc))
    return asl.StatesError("States.TaskFailed", str(exc))


def _end_token(table: Table, token: str, status: str, error: str, cause: str) -> bool:
    """Move a WAITING token to a final status; False when it had already left WAITING."""
    while True:
        item = table.get(TOKENS, token)
        if item is None or item.value["status"] != "WAITING":
            return False
        value = {
            **item.value,
            "status": status,
            "error": error,
            "cause": cause,
            "done_at": time.time(),
        }
        try:
            table.put(TOKENS, token, value, if_version=item.version)
            return True
        except ConditionFailed:
            continue


def _close_token(table: Table, token: str) -> None:
    _end_token(table, token, "CLOSED", "States.Runtime", "the execution is no longer waiting")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")
