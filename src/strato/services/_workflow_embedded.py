"""The embedded Workflow: a table-backed ASL interpreter driven by whoever calls ``wait``.

Three tables hold everything, so any process that opens the same Table sees the same
workflows: ``wf_machines`` (name -> definition), ``wf_executions`` (one record per
execution: its current state and input, retry counters, the task token it waits on,
its outcome, and the lease of the process driving it) and ``wf_tokens`` (one record
per task token, moved once from WAITING to a final status by a compare-and-set, which
is why ``send_task_success`` works from any process and a token completes only once).

``start`` only records an execution; ``wait`` drives it. The driver holds a lease in
the execution record (owner pid, host, process start time, heartbeat). Another caller
of ``wait`` takes over when that owner is dead on this host (or its pid was reused),
or when the heartbeat is older than ``lease_ttl_s`` (an owner on another host);
meanwhile it polls the record. A lease held by this very process but by no live
driver in it (a driver that raised) is free as well.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from strato.errors import ConditionFailed, ConfigError, InvalidToken, NotFound
from strato.services import asl
from strato.services._workflow_driver import EXECUTIONS, TOKENS, Driver, LostLease
from strato.services.runtime import Runtime
from strato.services.table import Item, Table
from strato.services.workflow import Execution

__all__ = ["MACHINES", "EmbeddedWorkflow"]

MACHINES = "wf_machines"
_HOST = socket.gethostname()
_HAS_PROC = os.path.exists("/proc/self/stat")

# Lease ids of the drivers running in this process, over every EmbeddedWorkflow
# object in it: another object (another Services bundle) must not take them over.
_live_leases: set[str] = set()
_live_lock = threading.Lock()


class EmbeddedWorkflow:
    def __init__(
        self,
        table: Table,
        runtime: Callable[[], Runtime],
        *,
        poll_s: float = 0.02,
        heartbeat_s: float = 2.0,
        lease_ttl_s: float = 15.0,
    ) -> None:
        if not heartbeat_s < lease_ttl_s:
            raise ConfigError("the lease heartbeat must be shorter than the lease time-to-live")
        self._table = table
        self._runtime = runtime
        self._poll_s, self._heartbeat_s, self._lease_ttl_s = poll_s, heartbeat_s, lease_ttl_s
        self._stopping = threading.Event()
        for name in (MACHINES, EXECUTIONS, TOKENS):  # nobody reads their changes
            table.create_table(name, stream=False)

    # --- definitions and executions -----------------------------------------------------

    def create_state_machine(self, name: str, definition: Mapping[str, Any]) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError("a state machine needs a non-empty name")
        asl.validate(definition)
        self._table.put(MACHINES, name, {"definition": _json_copy(definition, "definition")})

    def start(self, name: str, input: Mapping[str, Any], execution_id: str | None = None) -> str:
        machine = self._table.get(MACHINES, name)
        if machine is None:
            raise NotFound(f"no state machine named {name!r}")
        execution_id = execution_id or f"{name}-{uuid.uuid4().hex}"
        data = _json_copy(input, "execution input")
        definition = machine.value["definition"]
        now = time.time()
        timeout = definition.get("TimeoutSeconds")
        record = {
            "id": execution_id,
            "state_machine": name,
            "definition": definition,
            "input": data,
            "status": "RUNNING",
            "state": definition["StartAt"],
            "state_input": data,
            "started_at": now,
            "entered_at": now,
            "deadline": None if timeout is None else now + timeout,
            "step": 0,
            "retries": {},
            "not_before": None,
            "token": None,
            "token_deadline": None,
            "invoked": False,
            "output": None,
            "error": None,
            "cause": None,
            "stopped_at": None,
            "lease": None,
        }
        try:
            self._table.put(EXECUTIONS, execution_id, record, if_absent=True)
        except ConditionFailed:
            existing = self._record(execution_id)
            if existing.value["state_machine"] != name:
                raise ConfigError(
                    f"execution {execution_id!r} already exists for state machine "
                    f"{existing.value['state_machine']!r}, not {name!r}"
                ) from None
        return execution_id

    def describe(self, execution_id: str) -> Execution:
        return _execution(self._record(execution_id).value)

    def wait(self, execution_id: str, timeout_s: float | None = None) -> Execution:
        until = None if timeout_s is None else time.time() + timeout_s
        while True:
            item = self._record(execution_id)
            rec = item.value
            if rec["status"] != "RUNNING" or self._stopping.is_set():
                return _execution(rec)
            if until is not None and time.time() >= until:
                return _execution(rec)
            if rec["lease"] is None or self._lease_is_free(rec["lease"]):
                self._drive(item, until)
            else:
                time.sleep(min(self._poll_s * 2.5, 0.1))

    def _drive(self, item: Item, until: float | None) -> None:
        before = item.value.get("lease")  # a dead owner's: down since its last heartbeat
        down_since = float(before["heartbeat"]) if before else item.value.get("down_since")
        lease: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "pid": os.getpid(),
            "host": _HOST,
            "pid_start": _process_start(os.getpid()),
            "heartbeat": time.time(),
        }
        try:
            version = self._table.put(
                EXECUTIONS, item.key, {**item.value, "lease": lease}, if_version=item.version
            )
        except ConditionFailed:
            return  # another caller took it first: the wait loop re-reads
        with _live_lock:
            _live_leases.add(lease["id"])
        try:
            driver = Driver(
                self._table,
                self._runtime,
                Item(item.key, {**item.value, "lease": lease}, version),
                lease,
                until=until,
                stopping=self._stopping,
                poll_s=self._poll_s,
                heartbeat_s=self._heartbeat_s,
                down_since=down_since,
            )
            driver.run()
        except LostLease:
            pass  # another process judged this driver dead and drives now; just wait
        finally:
            with _live_lock:
                _live_leases.discard(lease["id"])

    def _lease_is_free(self, lease: Mapping[str, Any]) -> bool:
        if time.time() - float(lease["heartbeat"]) > self._lease_ttl_s:
            return True
        if lease["host"] != _HOST:
            return False  # a pid on another host says nothing here: trust the heartbeat
        if lease["pid"] == os.getpid():
            with _live_lock:
                return lease["id"] not in _live_leases
        start = _process_start(int(lease["pid"]))
        return start is None or (lease.get("pid_start") is not None and start != lease["pid_start"])

    def _record(self, execution_id: str) -> Item:
        item = self._table.get(EXECUTIONS, execution_id)
        if item is None:
            raise NotFound(f"no workflow execution {execution_id!r}")
        return item

    # --- callbacks: these work from any process that opens the same Table ----------------

    def send_task_success(self, token: str, output: Mapping[str, Any]) -> None:
        self._complete(token, {"status": "SUCCEEDED", "output": _json_copy(output, "output")})

    def send_task_failure(self, token: str, error: str, cause: str = "") -> None:
        self._complete(token, {"status": "FAILED", "error": str(error), "cause": str(cause)})

    def _complete(self, token: str, outcome: dict[str, Any]) -> None:
        while True:
            item = self._table.get(TOKENS, token) if isinstance(token, str) and token else None
            if item is None:
                raise InvalidToken(f"unknown task token {str(token)[:16]!r}…")
            if item.value["status"] != "WAITING":
                status = item.value["status"].lower().replace("_", " ")
                raise InvalidToken(f"task token {token[:16]!r}… is no longer waiting ({status})")
            value = {**item.value, **outcome, "done_at": time.time()}
            try:
                self._table.put(TOKENS, token, value, if_version=item.version)
                return
            except ConditionFailed:
                continue  # changed under us (a callback or a timeout won): re-read

    def close(self) -> None:
        """Make drivers in this process stop at their next step (they keep their state)."""
        self._stopping.set()


def _execution(rec: Mapping[str, Any]) -> Execution:
    running = rec["status"] == "RUNNING"
    return Execution(
        id=rec["id"],
        state_machine=rec["state_machine"],
        status=rec["status"],
        state=rec["state"] if running else None,
        output=rec["output"],
        error=rec["error"],
        cause=rec["cause"],
    )


def _json_copy(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the {what} must be JSON: {exc}") from None


def _process_start(pid: int) -> int | None:
    """A live process's start time in clock ticks since boot (distinguishes a reused pid),
    0 where /proc is missing but the pid exists, None when there is no live process."""
    if not _HAS_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # it exists, it is only not ours
        return 0
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    if fields[0] in ("Z", "X"):  # a zombie is dead, only not yet reaped
        return None
    return int(fields[19])
