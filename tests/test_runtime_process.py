"""Embedded-runtime specifics beyond the conformance suite: worker lifetime and errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strato.errors import FunctionError
from strato.services import FunctionSpec
from strato.services._runtime_process import ProcessRuntime, RemoteFunctionError, RuntimeClosed

HANDLERS_DIR = str(Path(__file__).resolve().parent / "conformance")  # runtime_handlers.py


def spec(name: str, handler: str, **settings: Any) -> FunctionSpec:
    env = {"PYTHONPATH": HANDLERS_DIR}
    return FunctionSpec(name, f"runtime_handlers:{handler}", env=env, **settings)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


@pytest.fixture
def runtime() -> Iterator[ProcessRuntime]:
    rt = ProcessRuntime(env={"STRATO_RUNTIME_VAR": "from-runtime"})
    yield rt
    rt.close()


def test_function_error_keeps_the_remote_traceback(runtime: ProcessRuntime) -> None:
    runtime.register(spec("fail", "fail"))
    with pytest.raises(RemoteFunctionError) as caught:
        runtime.invoke("fail", {"message": "boom"})
    err = caught.value
    assert isinstance(err, FunctionError)
    assert err.error_type == "ValueError"
    assert err.error_message.startswith("boom\n")
    assert "runtime_handlers.py" in err.remote_traceback and "def fail" not in str(err)


def test_runtime_env_and_spec_env_layer(runtime: ProcessRuntime) -> None:
    runtime.register(spec("env", "environment"))
    assert runtime.invoke("env", {"variable": "STRATO_RUNTIME_VAR"})["value"] == "from-runtime"


def test_worker_started_from_a_finished_thread_survives(runtime: ProcessRuntime) -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits: workers must be forked
    # from a long-lived thread, or this worker would die with the short-lived one.
    runtime.register(spec("echo", "echo"))
    pids: list[int] = []
    thread = threading.Thread(target=lambda: pids.append(runtime.invoke("echo", {})["pid"]))
    thread.start()
    thread.join()
    time.sleep(0.3)
    assert alive(pids[0])
    assert runtime.invoke("echo", {})["pid"] == pids[0]


def test_workers_die_with_a_sigkilled_parent_and_leave_no_shared_memory(
    tmp_path: Path,
) -> None:
    """The busy worker holds a shared-memory segment: it unlinks it as it dies (the
    parent's death reaches it as a SIGTERM), before any later process could sweep it."""
    pid_file = tmp_path / "busy-pid"
    script = textwrap.dedent(
        f"""
        import sys
        from strato.services import FunctionSpec
        from strato.services._runtime_process import ProcessRuntime
        rt = ProcessRuntime()
        env = {{"PYTHONPATH": {HANDLERS_DIR!r}}}
        rt.register(FunctionSpec("echo", "runtime_handlers:echo", env=env))
        rt.register(FunctionSpec("nap", "runtime_handlers:nap", env=env))
        rt.invoke_async("nap", {{"seconds": 60, "pid_file": {str(pid_file)!r},
                                 "lease_bytes": 4096}})
        print(rt.invoke("echo", {{}})["pid"], flush=True)
        sys.stdin.read()  # wait to be killed
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    idle_pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    busy_pid = int(pid_file.read_text())
    assert alive(idle_pid) and alive(busy_pid)
    held = [n for n in os.listdir("/dev/shm") if n.startswith(f"strato-{busy_pid}-")]
    assert len(held) == 1
    parent.kill()
    parent.communicate(timeout=30)
    assert wait_gone(idle_pid), "an idle worker outlived its SIGKILLed parent"
    assert wait_gone(busy_pid), "a busy worker outlived its SIGKILLed parent"
    assert not os.path.exists(f"/dev/shm/{held[0]}"), "the dead worker's segment is left"


def test_closed_runtime_refuses_work(runtime: ProcessRuntime) -> None:
    runtime.register(spec("echo", "echo"))
    runtime.close()
    with pytest.raises(RuntimeClosed):
        runtime.invoke("echo", {})


def test_close_fails_invocations_in_flight(runtime: ProcessRuntime) -> None:
    runtime.register(spec("nap", "nap"))
    future = runtime.invoke_async("nap", {"seconds": 30})
    deadline = time.monotonic() + 20
    while runtime.stats("nap").live_workers == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    started = time.monotonic()
    runtime.close()
    with pytest.raises(RuntimeClosed):
        future.result(timeout=20)
    assert time.monotonic() - started < 15
    assert runtime.stats("nap").crashes == 0


def test_reregistering_retires_old_workers(runtime: ProcessRuntime) -> None:
    runtime.register(spec("f", "echo"))
    old = runtime.invoke("f", {})["pid"]
    runtime.register(spec("f", "echo", timeout_s=5))
    assert wait_gone(old)
    assert runtime.invoke("f", {})["cold_start"] is True
    assert os.getpid() != old


def test_cold_starts_report_their_init_time_apart_from_billed_time(
    runtime: ProcessRuntime,
) -> None:
    runtime.register(spec("echo", "echo"))
    runtime.invoke("echo", {"x": 1})  # a cold start
    cold = runtime.stats("echo")
    assert cold.cold_starts == 1 and cold.init_s > 0
    runtime.invoke("echo", {"x": 2})  # warm: no init to add
    warm = runtime.stats("echo")
    assert warm.cold_starts == 1 and warm.init_s == cold.init_s
    assert warm.billed_s > cold.billed_s
    assert runtime.stats().init_s == warm.init_s  # the total sums it like every field


def test_queued_invocations_take_freed_slots_first_come_first_served(
    runtime: ProcessRuntime,
) -> None:
    runtime.register(spec("nap", "nap", max_concurrency=1))
    fn = runtime._functions["nap"]
    holder = runtime.invoke_async("nap", {"seconds": 0.5})
    deadline = time.monotonic() + 10
    while fn.running == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    queued = []
    for i in range(12):  # each one queued (a waiter) before the next is submitted
        queued.append(runtime.invoke_async("nap", {"seconds": 0}))
        while len(fn.waiters) <= i and time.monotonic() < deadline:
            time.sleep(0.001)
    assert len(fn.waiters) == 12 and fn.running == 1
    holder.result(timeout=30)
    starts = [f.result(timeout=30)["start"] for f in queued]
    assert starts == sorted(starts)
    assert fn.running == 0 and not fn.waiters
    assert runtime.stats("nap").invocations == 13
