"""Runtime conformance: the Lambda semantics every backend keeps (see services/runtime.py)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from strato.errors import (
    ConfigError,
    FunctionError,
    InvocationTimeout,
    PayloadTooLarge,
    UnknownFunction,
    WorkerCrashed,
)
from strato.services import FunctionSpec, Runtime, Services

HANDLERS_DIR = str(Path(__file__).resolve().parent)  # holds runtime_handlers.py


def spec(name: str, handler: str, **settings: Any) -> FunctionSpec:
    env = {"PYTHONPATH": HANDLERS_DIR, **settings.pop("env", {})}
    return FunctionSpec(name, f"runtime_handlers:{handler}", env=env, **settings)


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in (b"Z", b"X")  # a zombie has exited already


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def runtime(services: Services) -> Runtime:
    rt = services.runtime
    assert isinstance(rt, Runtime)
    return rt


@pytest.fixture
def local_runtime(local_services: Services) -> Runtime:
    """A runtime whose worker processes this client owns (see conftest)."""
    return local_services.runtime


def test_invoke_returns_result(runtime: Runtime) -> None:
    runtime.register(spec("echo", "echo", timeout_s=30))
    out = runtime.invoke("echo", {"x": [1, 2.5, "three"], "nested": {"ok": True}})
    assert out["event"] == {"x": [1, 2.5, "three"], "nested": {"ok": True}}
    assert out["function_name"] == "echo"
    assert out["invocation_id"]
    assert 0 < out["remaining_s"] <= 30
    assert out["pid"] != os.getpid()  # ran in a worker, not in the caller


def test_invoke_async_returns_a_future(runtime: Runtime) -> None:
    runtime.register(spec("echo", "echo"))
    futures = [runtime.invoke_async("echo", {"i": i}) for i in range(3)]
    assert sorted(f.result(timeout=30)["event"]["i"] for f in futures) == [0, 1, 2]


def test_warm_reuse_keeps_the_worker_and_its_module_state(local_runtime: Runtime) -> None:
    local_runtime.register(spec("echo", "echo"))
    first = local_runtime.invoke("echo", {})
    second = local_runtime.invoke("echo", {})
    assert first["cold_start"] is True
    assert second["cold_start"] is False
    assert second["pid"] == first["pid"]
    assert (first["calls"], second["calls"]) == (1, 2)
    stats = local_runtime.stats("echo")
    assert (stats.invocations, stats.cold_starts, stats.live_workers) == (2, 1, 1)


def test_scale_to_zero_after_keep_alive(local_runtime: Runtime) -> None:
    local_runtime.register(spec("echo", "echo", keep_alive_s=0.3))
    pid = local_runtime.invoke("echo", {})["pid"]
    assert wait_until(lambda: not process_alive(pid)), "idle worker outlived its keep-alive"
    assert local_runtime.stats("echo").live_workers == 0
    again = local_runtime.invoke("echo", {})
    assert again["cold_start"] is True
    assert again["pid"] != pid
    assert local_runtime.stats("echo").cold_starts == 2


def test_max_concurrency_makes_extra_invocations_wait(runtime: Runtime) -> None:
    runtime.register(spec("nap", "nap", max_concurrency=2))
    nap_s = 0.5
    started = time.monotonic()
    futures = [runtime.invoke_async("nap", {"seconds": nap_s}) for _ in range(4)]
    runs = [f.result(timeout=60) for f in futures]
    elapsed = time.monotonic() - started
    edges = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    assert peak <= 2
    assert len({r["pid"] for r in runs}) <= 2
    assert elapsed >= 2 * nap_s  # four naps through two slots take two rounds at least
    assert runtime.stats("nap").live_workers <= 2


def test_calls_of_a_function_that_runs_one_at_a_time_start_in_the_order_made(
        local_runtime: Runtime) -> None:
    """(A node's leaf aggregator relies on it: its calls add updates, then write.)"""
    local_runtime.register(spec("one-by-one", "nap", max_concurrency=1))
    futures = [local_runtime.invoke_async("one-by-one", {"seconds": 0.01, "n": n})
               for n in range(16)]
    starts = [f.result(timeout=120)["start"] for f in futures]
    assert starts == sorted(starts), "calls started out of the order they were made in"


def test_retry_after_the_worker_kills_itself(runtime: Runtime, tmp_path: Path) -> None:
    runtime.register(spec("die-once", "die_once", retries=2))
    out = runtime.invoke("die-once", {"marker": str(tmp_path / "marker")})
    assert out["pid"] != out["killed_pid"]
    assert not process_alive(out["killed_pid"])
    stats = runtime.stats("die-once")
    assert (stats.invocations, stats.crashes, stats.retries, stats.errors) == (1, 1, 1, 0)


def test_retry_after_sigkill_from_outside(runtime: Runtime, tmp_path: Path) -> None:
    runtime.register(spec("victim", "wait_for_kill", retries=1, timeout_s=60))
    pid_file = tmp_path / "pid"
    future = runtime.invoke_async("victim", {"pid_file": str(pid_file)})
    assert wait_until(lambda: pid_file.exists() and pid_file.read_text() != "")
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    out = future.result(timeout=60)
    assert out["killed_pid"] == int(pid_file.read_text()) != out["pid"]
    assert runtime.stats("victim").crashes == 1


def test_crash_beyond_the_retry_budget_raises(runtime: Runtime) -> None:
    runtime.register(spec("doomed", "die_always", retries=1))
    with pytest.raises(WorkerCrashed):
        runtime.invoke("doomed", {})
    stats = runtime.stats("doomed")
    assert (stats.crashes, stats.retries, stats.errors, stats.live_workers) == (2, 1, 1, 0)
    runtime.register(spec("echo", "echo"))
    assert runtime.invoke("echo", {"after": "crash"})["event"] == {"after": "crash"}


def test_timeout_stops_the_invocation(runtime: Runtime, tmp_path: Path) -> None:
    runtime.register(spec("nap", "nap", timeout_s=0.5, retries=2))
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(InvocationTimeout):
        runtime.invoke("nap", {"seconds": 30, "pid_file": str(pid_file)})
    assert time.monotonic() - started < 20  # stopped, not slept out (generous: busy CI)
    assert wait_until(lambda: not process_alive(int(pid_file.read_text())))
    stats = runtime.stats("nap")
    assert (stats.timeouts, stats.errors, stats.retries) == (1, 1, 0)  # a timeout is not retried
    assert runtime.invoke("nap", {"seconds": 0})["pid"] != int(pid_file.read_text())


def test_unknown_function(runtime: Runtime) -> None:
    with pytest.raises(UnknownFunction, match="no-such"):
        runtime.invoke("no-such", {})
    with pytest.raises(UnknownFunction):
        runtime.invoke_async("no-such", {})
    with pytest.raises(UnknownFunction):
        runtime.stats("no-such")


def test_oversize_payload_is_refused_before_any_worker_starts(runtime: Runtime) -> None:
    runtime.register(spec("echo", "echo", max_event_bytes=1000))
    with pytest.raises(PayloadTooLarge, match="1000"):
        runtime.invoke("echo", {"blob": "x" * 2000})
    with pytest.raises(PayloadTooLarge):
        runtime.invoke_async("echo", {"blob": "x" * 2000})
    assert runtime.stats("echo").cold_starts == 0
    assert runtime.invoke("echo", {"blob": "x" * 100})["event"]["blob"] == "x" * 100


def test_handler_exception_becomes_function_error(runtime: Runtime) -> None:
    runtime.register(spec("fail", "fail"))
    with pytest.raises(FunctionError) as caught:
        runtime.invoke("fail", {"message": "the input was bad"})
    text = str(caught.value)
    assert "ValueError" in text and "the input was bad" in text
    assert "\n" not in text
    assert runtime.stats("fail").errors == 1
    with pytest.raises(FunctionError):  # the worker survived its handler's exception
        runtime.invoke("fail", {"message": "again"})
    assert runtime.stats("fail").cold_starts == 1


def test_handler_that_cannot_be_imported(runtime: Runtime) -> None:
    runtime.register(
        FunctionSpec("ghost", "strato_no_such_module:handler", env={"PYTHONPATH": HANDLERS_DIR})
    )
    with pytest.raises(FunctionError, match="ModuleNotFoundError"):
        runtime.invoke("ghost", {})
    with pytest.raises(ConfigError):
        runtime.register(FunctionSpec("bad", "no_colon_here"))


def test_stats_per_function_and_totals(local_runtime: Runtime) -> None:
    local_runtime.register(spec("nap", "nap", memory_mb=2048))
    local_runtime.register(spec("fail", "fail", memory_mb=512))
    local_runtime.invoke("nap", {"seconds": 0.05})
    local_runtime.invoke("nap", {"seconds": 0.05})
    with pytest.raises(FunctionError):
        local_runtime.invoke("fail", {"message": "m"})
    nap, fail, total = (
        local_runtime.stats("nap"),
        local_runtime.stats("fail"),
        local_runtime.stats(),
    )
    assert (nap.invocations, nap.cold_starts, nap.errors) == (2, 1, 0)
    assert (fail.invocations, fail.errors) == (1, 1)
    assert nap.billed_s >= 0.1
    assert nap.gb_s == pytest.approx(2 * nap.billed_s)
    assert fail.gb_s == pytest.approx(0.5 * fail.billed_s)
    assert total.invocations == 3 and total.errors == 1 and total.cold_starts == 2
    assert total.billed_s == pytest.approx(nap.billed_s + fail.billed_s)
    assert total.live_workers == nap.live_workers + fail.live_workers == 2
    assert set(total.to_dict()) >= {"invocations", "cold_starts", "billed_s", "gb_s"}


def test_spec_env_reaches_the_worker_and_stdio_is_isolated(runtime: Runtime) -> None:
    runtime.register(spec("env", "environment", env={"STRATO_TEST_SETTING": "on"}))
    out = runtime.invoke("env", {"variable": "STRATO_TEST_SETTING"})
    assert out == {"value": "on", "stdin": ""}  # prints went to stderr, stdin is empty


def test_nested_invoke_async_from_a_handler(local_runtime: Runtime, tmp_path: Path) -> None:
    local_runtime.register(spec("leaf", "leaf"))
    local_runtime.register(spec("root", "fan_out"))
    out = local_runtime.invoke("root", {"count": 3, "leaf": "leaf", "dir": str(tmp_path)})
    assert out["refused"] == "UnknownFunction"
    paths = [tmp_path / f"leaf-{i}" for i in range(3)]
    assert wait_until(lambda: all(p.exists() and p.read_text() for p in paths), 30)
    assert [p.read_text() for p in paths] == ["0", "1", "2"]
    assert wait_until(lambda: local_runtime.stats("leaf").invocations == 3)


def test_close_leaves_no_worker(local_services: Services) -> None:
    runtime = local_services.runtime
    runtime.register(spec("echo", "echo"))
    pid = runtime.invoke("echo", {})["pid"]
    runtime.close()
    assert wait_until(lambda: not process_alive(pid), 5)
