"""The embedded Runtime: functions run in pools of warm worker processes.

Each registered function has its own pool. An invocation takes a concurrency slot
(waiting while ``max_concurrency`` invocations run), then the most recently used idle
worker (warm) or a newly started one (a cold start: process start plus handler
import), and talks to it over JSON frames on its stdin/stdout (``_worker``). A reaper
thread retires workers idle longer than ``keep_alive_s``, so an idle function costs
no process at all. A worker that dies mid-invocation is disposed of and the
invocation retried on another worker; one that runs past ``timeout_s`` is SIGKILLed.

Accounting follows Lambda's metrics: ``invocations`` counts calls (not attempts),
``errors`` counts calls that failed for any reason (handler error, timeout, crash
after the last retry), ``crashes`` counts worker deaths, ``retries`` re-attempts,
``billed_s`` the duration of every attempt (cold-start imports are not billed).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from strato.errors import (
    ConfigError,
    FunctionError,
    InvocationTimeout,
    PayloadTooLarge,
    StratoError,
    UnknownFunction,
    WorkerCrashed,
)
from strato.services import _frames
from strato.services._process_worker import (
    Spawner,
    WorkerGone,
    WorkerInitFailed,
    WorkerProcess,
    retire_all,
    worker_env,
)
from strato.services.runtime import FunctionSpec, RuntimeStats

__all__ = ["ProcessRuntime", "RemoteFunctionError", "RuntimeClosed"]

_MIN_INIT_TIMEOUT_S = 10.0  # Lambda's init phase limit: a cold import may outlast timeout_s
_MAX_MESSAGE_CHARS = 500


class RuntimeClosed(StratoError):
    """The runtime was closed before or during the invocation."""


class RemoteFunctionError(FunctionError):
    """A handler raised. ``error_type`` and ``error_message`` are the handler's own;
    ``remote_traceback`` is the worker's formatted traceback."""

    def __init__(self, function: str, fields: Mapping[str, Any], *, during: str = "raised") -> None:
        self.function_name = function
        self.error_type = str(fields.get("type", "Exception"))
        self.error_message = str(fields.get("message", ""))
        self.remote_traceback = str(fields.get("traceback", ""))
        text = " ".join(self.error_message.split())  # one line, whatever the handler wrote
        if len(text) > _MAX_MESSAGE_CHARS:
            text = text[: _MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(f"function {function!r} {during} {self.error_type}: {text}")


class _Function:
    def __init__(self, spec: FunctionSpec, generation: int) -> None:
        self.spec = spec
        self.generation = generation  # bumped on re-register: older workers retire
        self.idle: list[WorkerProcess] = []  # LIFO, so the extras age out and get reaped
        self.busy: set[WorkerProcess] = set()
        self.running = 0
        # invocations waiting for a slot, first come first served: a freed slot is
        # handed to the oldest one alone (waking every waiter on every release made
        # dispatch quadratic in the number of queued invocations)
        self.waiters: deque[threading.Event] = deque()
        self.stats = RuntimeStats()


def _check_spec(spec: FunctionSpec) -> None:
    module, _, attr = spec.handler.partition(":")
    problems = [
        (not spec.name, "a function needs a name"),
        (
            not module or not attr,
            f"handler must be 'package.module:function', got {spec.handler!r}",
        ),
        (spec.timeout_s <= 0, f"timeout_s must be positive, got {spec.timeout_s}"),
        (spec.max_concurrency < 1, f"max_concurrency must be ≥ 1, got {spec.max_concurrency}"),
        (spec.keep_alive_s < 0, f"keep_alive_s must be ≥ 0, got {spec.keep_alive_s}"),
        (spec.retries < 0, f"retries must be ≥ 0, got {spec.retries}"),
        (spec.memory_mb < 1, f"memory_mb must be ≥ 1, got {spec.memory_mb}"),
        (spec.max_event_bytes < 1, f"max_event_bytes must be ≥ 1, got {spec.max_event_bytes}"),
        (spec.locality not in ("", "state", "node"),
         f"locality must be '', 'state' or 'node', got {spec.locality!r}"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(f"function {spec.name!r}: {message}")


class ProcessRuntime:
    """``Runtime`` on this machine; ``env`` is added to every worker's environment."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env: dict[str, str] = dict(env or {})
        self._lock = threading.Lock()
        self._functions: dict[str, _Function] = {}
        self._closed = False
        self._spawner = Spawner()
        self._reaper_wake = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="strato-reaper", daemon=True)
        self._reaper.start()
        _LIVE.add(self)

    # ---- the Runtime protocol ---------------------------------------------------------

    def register(self, spec: FunctionSpec) -> None:
        _check_spec(spec)
        with self._lock:
            self._ensure_open()
            fn = self._functions.get(spec.name)
            if fn is None:
                self._functions[spec.name] = _Function(spec, 0)
                return
            if fn.spec == spec:
                return
            fn.spec = spec  # new code or settings: running invocations finish on old workers
            fn.generation += 1
            stale, fn.idle = fn.idle, []
            self._grant(fn)  # max_concurrency may have grown
        retire_all(stale)

    def invoke(self, name: str, event: Mapping[str, Any]) -> Any:
        return self._run(name, self._encode(name, event))

    def invoke_async(self, name: str, event: Mapping[str, Any]) -> Future[Any]:
        body = self._encode(name, event)  # bad input fails here, as Lambda's Event call does
        future: Future[Any] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self._run(name, body))
            except BaseException as exc:  # delivered through the future
                future.set_exception(exc)

        # A daemon thread per call (not an executor): a pending invocation must never
        # hold up interpreter exit, and close() is what stops it.
        threading.Thread(target=run, name=f"strato-invoke-{name}", daemon=True).start()
        return future

    def stats(self, name: str | None = None) -> RuntimeStats:
        with self._lock:
            if name is not None:
                return self._stats_of(self._function(name))
            total = RuntimeStats()
            for fn in self._functions.values():
                one = self._stats_of(fn)
                for field in dataclasses.fields(RuntimeStats):
                    setattr(
                        total, field.name, getattr(total, field.name) + getattr(one, field.name)
                    )
            return total

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = [w for fn in self._functions.values() for w in fn.idle]
            busy = [w for fn in self._functions.values() for w in fn.busy]
            for fn in self._functions.values():
                fn.idle = []
                for waiter in fn.waiters:
                    waiter.set()  # it wakes, finds the runtime closed and raises
                fn.waiters.clear()
        self._reaper_wake.set()
        for worker in busy:
            worker.terminate()  # its invocation thread sees EOF and disposes of it
        retire_all(idle)
        self._spawner.stop()
        if threading.current_thread() is not self._reaper:
            self._reaper.join(timeout=5.0)
        _LIVE.discard(self)

    def __enter__(self) -> ProcessRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one invocation ---------------------------------------------------------------

    def _encode(self, name: str, event: Mapping[str, Any]) -> bytes:
        with self._lock:
            self._ensure_open()
            spec = self._function(name).spec
        try:
            body = json.dumps(event, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise StratoError(
                f"event for function {name!r} is not JSON-serialisable: {exc}"
            ) from None
        if len(body) > spec.max_event_bytes:
            raise PayloadTooLarge(
                f"event for function {name!r} is {len(body)} bytes, over its limit of "
                f"{spec.max_event_bytes}; pass large inputs by shared-memory reference"
            )
        return body

    def _run(self, name: str, body: bytes) -> Any:
        fn = self._take_slot(name)
        invocation_id = uuid.uuid4().hex
        attempt = 0
        try:
            while True:
                try:
                    return self._attempt(fn, invocation_id, body)
                except WorkerGone as died:
                    with self._lock:
                        self._ensure_open()  # closing kills workers: not a crash
                        fn.stats.crashes += 1
                        if attempt >= fn.spec.retries:
                            raise WorkerCrashed(
                                f"function {name!r}: {died}; gave up after {attempt} "
                                f"retr{'y' if attempt == 1 else 'ies'}"
                            ) from None
                        fn.stats.retries += 1
                    attempt += 1
        except (FunctionError, InvocationTimeout, WorkerCrashed):
            with self._lock:
                fn.stats.errors += 1
            raise
        finally:
            with self._lock:
                fn.running -= 1
                self._grant(fn)

    def _take_slot(self, name: str) -> _Function:
        """A slot of ``name``'s concurrency: at once if one is free and nobody waits,
        else in arrival order, handed over by the invocation that frees it."""
        with self._lock:
            self._ensure_open()
            fn = self._function(name)
            if fn.running < fn.spec.max_concurrency and not fn.waiters:
                fn.running += 1
                fn.stats.invocations += 1
                return fn
            turn = threading.Event()
            fn.waiters.append(turn)
        try:
            turn.wait()
        except BaseException:  # e.g. Ctrl-C in a synchronous invoke: give the turn back
            with self._lock:
                if turn in fn.waiters:
                    fn.waiters.remove(turn)
                elif not self._closed:  # the slot was already ours: pass it on
                    fn.running -= 1
                    self._grant(fn)
            raise
        with self._lock:
            self._ensure_open()
            fn.stats.invocations += 1  # the releaser counted the slot in fn.running
            return fn

    def _grant(self, fn: _Function) -> None:
        """Hand free slots to the oldest waiters (caller holds the lock)."""
        while fn.waiters and fn.running < fn.spec.max_concurrency:
            fn.running += 1
            fn.waiters.popleft().set()

    def _attempt(self, fn: _Function, invocation_id: str, body: bytes) -> Any:
        worker, spec = self._acquire_worker(fn)
        frame = _frames.frame_body(
            b'{"op":"invoke","id":"%s","timeout_s":%s,"event":%s}'
            % (invocation_id.encode(), json.dumps(spec.timeout_s).encode(), body)
        )
        started = time.monotonic()
        deadline = started + spec.timeout_s
        try:
            worker.send(frame)
            while (message := worker.receive(deadline)).get("op") == "invoke_async":
                worker.send(self._nested(message))
            if message.get("op") != "result" or message.get("id") != invocation_id:
                raise WorkerGone(f"worker {worker.pid} broke the protocol ({message.get('op')!r})")
        except TimeoutError:
            worker.dispose()
            with self._lock:
                fn.busy.discard(worker)
                fn.stats.timeouts += 1
            raise InvocationTimeout(
                f"function {spec.name!r} ran past its timeout of {spec.timeout_s:g} s "
                "and was stopped"
            ) from None
        except BaseException:  # died, or KeyboardInterrupt here: the worker is unusable
            self._discard(fn, worker)
            raise
        finally:
            billed = time.monotonic() - started
            with self._lock:
                fn.stats.billed_s += billed
                fn.stats.gb_s += billed * spec.memory_mb / 1024.0
        self._release_worker(fn, worker)
        if not message.get("ok"):
            raise RemoteFunctionError(spec.name, message)
        return message.get("result")

    def _nested(self, request: Mapping[str, Any]) -> bytes:
        """Start a handler's ``ctx.invoke_async`` and tell it whether that worked."""
        try:
            self.invoke_async(str(request.get("name")), request.get("event") or {})
        except StratoError as exc:
            return _frames.encode(
                {"op": "ack", "ok": False, "type": type(exc).__name__, "message": str(exc)}
            )
        return _frames.encode({"op": "ack", "ok": True})

    # ---- worker pool ------------------------------------------------------------------

    def _acquire_worker(self, fn: _Function) -> tuple[WorkerProcess, FunctionSpec]:
        """A warm idle worker, or a newly started one (a cold start). Marked busy."""
        with self._lock:
            self._ensure_open()
            spec, generation = fn.spec, fn.generation
            while fn.idle:
                worker = fn.idle.pop()
                if worker.alive():
                    fn.busy.add(worker)
                    return worker, spec
                worker.dispose()  # died while idle (killed from outside): not an invocation's crash
            fn.stats.cold_starts += 1
        argv = [sys.executable, "-m", "strato.services._worker", spec.name, spec.handler]
        spawned = time.monotonic()
        proc = self._spawner.spawn([*argv, str(os.getpid())], worker_env(self.env, spec.env))
        worker = WorkerProcess(proc, generation)
        with self._lock:
            fn.busy.add(worker)
            closed = self._closed
        if closed:
            self._discard(fn, worker)
            raise WorkerGone("the runtime is closed")
        try:
            worker.wait_ready(time.monotonic() + max(_MIN_INIT_TIMEOUT_S, spec.timeout_s))
            with self._lock:
                fn.stats.init_s += time.monotonic() - spawned
        except WorkerInitFailed as failed:
            self._discard(fn, worker)
            raise RemoteFunctionError(spec.name, failed.fields, during="failed to load:") from None
        except TimeoutError:
            self._discard(fn, worker)
            with self._lock:
                fn.stats.timeouts += 1
            raise InvocationTimeout(
                f"function {spec.name!r}: worker did not start in time"
            ) from None
        except BaseException:
            self._discard(fn, worker)
            raise
        return worker, spec

    def _discard(self, fn: _Function, worker: WorkerProcess) -> None:
        worker.dispose()
        with self._lock:
            fn.busy.discard(worker)

    def _release_worker(self, fn: _Function, worker: WorkerProcess) -> None:
        with self._lock:
            fn.busy.discard(worker)
            keep = not self._closed and worker.generation == fn.generation
            if keep:
                worker.fresh = False
                worker.last_used = time.monotonic()
                fn.idle.append(worker)
        if keep:
            self._reaper_wake.set()  # it may be the first idle worker: recompute the wake-up
        else:
            worker.dispose()

    def _reap_loop(self) -> None:
        while True:
            self._reaper_wake.wait(self._next_expiry_in())
            self._reaper_wake.clear()
            now = time.monotonic()
            expired: list[WorkerProcess] = []
            dead: list[WorkerProcess] = []
            with self._lock:
                if self._closed:
                    return
                for fn in self._functions.values():
                    keep = []
                    for worker in fn.idle:
                        if not worker.alive():
                            dead.append(worker)
                        elif now - worker.last_used >= fn.spec.keep_alive_s:
                            expired.append(worker)
                        else:
                            keep.append(worker)
                    fn.idle = keep
            for worker in dead:
                worker.dispose()
            retire_all(expired)

    def _next_expiry_in(self) -> float:
        with self._lock:
            expiries = [
                w.last_used + fn.spec.keep_alive_s
                for fn in self._functions.values()
                for w in fn.idle
            ]
        if not expiries:
            return 1.0  # also notices idle workers killed from outside
        return min(1.0, max(0.005, min(expiries) - time.monotonic()))

    # ---- helpers (caller holds the lock) ----------------------------------------------

    def _function(self, name: str) -> _Function:
        fn = self._functions.get(name)
        if fn is None:
            known = ", ".join(sorted(self._functions)) or "none"
            raise UnknownFunction(f"no function named {name!r} is registered (registered: {known})")
        return fn

    def _stats_of(self, fn: _Function) -> RuntimeStats:
        return dataclasses.replace(fn.stats, live_workers=len(fn.idle) + len(fn.busy))

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeClosed("the runtime is closed")


_LIVE: weakref.WeakSet[ProcessRuntime] = weakref.WeakSet()


@atexit.register
def _close_all_runtimes() -> None:
    for runtime in list(_LIVE):
        runtime.close()
