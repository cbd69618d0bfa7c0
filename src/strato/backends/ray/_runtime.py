"""Runtime on Ray: each warm function worker is a Ray actor (one process of its own).

- **Pool.** Per function, idle actors are reused LIFO (a warm invocation); a new one is
  a cold start, its init (process start, handler import) billed apart as ``init_s``.
  A reaper kills actors idle longer than ``keep_alive_s``: scale to zero.
- **Limits.** At most ``max_concurrency`` invocations of a function run at once, the
  rest wait in arrival order. An invocation past ``timeout_s`` is stopped by killing
  its actor (``InvocationTimeout``, not retried); an actor that dies mid-invocation is
  replaced and the invocation retried up to ``retries`` times (``WorkerCrashed``).
- **Where.** Actors take no CPU reservation (``num_cpus=0``): Strato's autoscaler and
  placement decide how much runs where. New actors go to the alive nodes in turn
  (node affinity; a node gone meanwhile: anywhere); a spec with
  ``locality="state"`` (the aggregator's root) goes to the state host's node; one
  with ``locality="node"`` (a leaf) has a pool per node and runs on the node the
  invocation names; ``place(name, node_id)`` pins a function's new actors to a node.
  ``placement()`` says where each function ran and how many bytes crossed nodes.
- **Wire.** Events and results cross as JSON text (the event size is checked against
  ``max_event_bytes`` before any worker starts); nothing of ours is pickled.
- **Nested calls.** A handler's ``ctx.invoke_async`` checks the call against the specs
  ``register`` records with the state host, then posts it to the inbox (a bus topic
  and queue of its own) of the runtime that started the worker, which invokes it and
  counts it like any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from strato.backends.ray._cluster import FUNCTION_ENV, ensure_ray, state_client
from strato.errors import (
    FunctionError,
    InvocationTimeout,
    PayloadTooLarge,
    StratoError,
    UnknownFunction,
    WorkerCrashed,
)
from strato.services import ENV_VAR, FunctionSpec, RuntimeStats

__all__ = ["RayRuntime"]

# Environment variables that libraries read once, when they load: a spec that sets one
# gets a worker process started with it. Others are set in the worker's own environment
# before the handler is imported, on a worker Ray may have started ahead of time.
# (PYTHONPATH is not one of them: the worker puts its entries on sys.path itself.)
_READ_AT_LOAD = ("OMP_", "MKL_", "OPENBLAS_", "NUMBA_", "NUMEXPR_", "LD_")


def _read_at_load(name: str) -> bool:
    return name.startswith(_READ_AT_LOAD) or (name.startswith("PYTHON") and name != "PYTHONPATH")
REGISTRY = "strato_ray_functions"  # the state host's table of registered specs
INBOX_ENV = "STRATO_RAY_INBOX"  # the bus topic of the runtime that started a worker
_MAX_MESSAGE_CHARS = 2000


class _Worker:
    """The actor body: imports the handler once, then serves invocations."""

    def __init__(self, name: str, handler: str, env: dict[str, str]) -> None:
        started = time.perf_counter()
        os.environ.update(env)
        os.environ[FUNCTION_ENV] = name  # the state host counts bytes per function too
        for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
            if entry and entry not in sys.path:
                sys.path.insert(0, entry)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # a handler reading stdin sees EOF
        os.close(devnull)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - fd 0 stays open
        self.name = name
        self.cold = True
        self.error: dict[str, str] | None = None
        try:
            from strato.services._worker import _load

            self.handler = _load(handler)
        except Exception as exc:  # reported by the first invocation, as Lambda does
            self.error = _fields(exc)
        self.init_s = time.perf_counter() - started

    def exit(self) -> None:
        """Leave now, as a process exits: shared memory this worker made is unlinked."""
        import ray

        ray.actor.exit_actor()  # type: ignore[no-untyped-call]

    def ready(self) -> tuple[int, float, str]:
        import ray

        return os.getpid(), self.init_s, str(ray.get_runtime_context().get_node_id())

    def invoke(self, invocation_id: str, event: str, timeout_s: float) -> str:
        if self.error is not None:
            return json.dumps({"ok": False, **self.error})
        ctx = _Context(self.name, invocation_id, self.cold, timeout_s)
        self.cold = False
        try:
            result = self.handler(json.loads(event), ctx)
            return json.dumps({"ok": True, "result": result})
        except Exception as exc:
            return json.dumps({"ok": False, **_fields(exc)})


def _fields(exc: BaseException) -> dict[str, str]:
    import traceback

    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc))}


class _Context:
    def __init__(self, name: str, invocation_id: str, cold: bool, timeout_s: float) -> None:
        self.function_name = name
        self.invocation_id = invocation_id
        self.cold_start = cold
        self._deadline = time.monotonic() + timeout_s

    def remaining_s(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def attach(self, ref: Mapping[str, Any]) -> memoryview:
        from strato.services import shm

        return shm.attach(ref)

    def invoke_async(self, name: str, event: Mapping[str, Any],
                     node: str | None = None) -> None:
        """Hand the call to the runtime that started this worker (its inbox on the bus),
        after the checks a direct call makes: the function exists, the event fits."""
        from strato.services import connect_from_env

        if "services" not in _NESTED:
            _NESTED["services"] = connect_from_env()
        svc = _NESTED["services"]
        got = svc.table.get(REGISTRY, name)
        if got is None:
            raise UnknownFunction(f"no function named {name!r} is registered")
        body = json.dumps({"name": name, "event": event}, separators=(",", ":"))
        limit = int(got.value.get("max_event_bytes", 0)) or None
        if limit is not None and len(body.encode()) > limit:
            raise PayloadTooLarge(f"event for function {name!r} is over its limit of {limit}")
        if node is not None:
            body = body[:-1] + "," + json.dumps({"node": node})[1:]
        svc.bus.publish(os.environ[INBOX_ENV], body)


_NESTED: dict[str, Any] = {}


@dataclass
class _Function:
    spec: FunctionSpec
    idle: list[tuple[Any, float]] = field(default_factory=list)  # (actor, idle since)
    busy: int = 0
    running: int = 0
    waiters: deque[threading.Event] = field(default_factory=deque)
    stats: RuntimeStats = field(default_factory=RuntimeStats)
    node: str | None = None  # pinned by place(), or the node of a per-node pool
    turn: int = -1  # round robin of its new actors over the alive nodes
    # locality="node": a pool of its own per node (its max_concurrency per node)
    per_node: dict[str, _Function] = field(default_factory=dict)

    def pools(self) -> list[_Function]:
        """This pool and its per-node pools."""
        return [self, *self.per_node.values()]


class RayRuntime:
    """``Runtime`` on Ray (see the module doc); ``config`` is the run's Services config."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self._ray = ensure_ray(config)
        self._state = state_client(config)
        self._lock = threading.Lock()
        self._functions: dict[str, _Function] = {}
        self._closed = False
        self._busy_actors: set[Any] = set()
        self._node_of: dict[Any, str] = {}  # actor -> the Ray node it runs on
        self._pid_of: dict[Any, int] = {}  # actor -> its process id there
        self._ran: dict[str, dict[str, int]] = {}  # node -> function -> invocations
        self._wake = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="strato-ray-reaper", daemon=True)
        self._reaper.start()
        self._inbox = f"strato-ray-inbox-{uuid.uuid4().hex[:12]}"
        self._inbox_thread: threading.Thread | None = None

    # ---- the Runtime protocol ---------------------------------------------------------

    def register(self, spec: FunctionSpec) -> None:
        from strato.services._runtime_process import _check_spec

        _check_spec(spec)
        record = {**dataclasses.asdict(spec), "env": dict(spec.env)}
        self._state.call("table", "create_table", REGISTRY, stream=False)
        self._state.call("table", "put", REGISTRY, spec.name, record)
        self._start_inbox()
        with self._lock:
            self._open()
            fn = self._functions.get(spec.name)
            if fn is None:
                self._functions[spec.name] = _Function(spec)
                return
            stale: list[tuple[Any, float]] = []
            if fn.spec != spec:
                for pool in fn.pools():
                    pool.spec, stale, pool.idle = spec, stale + pool.idle, []
                    self._grant(pool)
        for actor, _ in stale:
            self._retire(actor, graceful=True)

    def invoke(self, name: str, event: Mapping[str, Any], node: str | None = None) -> Any:
        """``node``: where a function of ``locality="node"`` runs (default: the head)."""
        body = self._encode(name, event)
        return self._run(name, body, self._await_turn(*self._queue(name, node)))

    def invoke_async(self, name: str, event: Mapping[str, Any],
                     node: str | None = None) -> Future[Any]:
        """Calls take their place in line here, in the order they are made: calls of a
        function that runs one at a time (a node's leaf) start in that order."""
        body = self._encode(name, event)
        future: Future[Any] = Future()
        try:
            place = self._queue(name, node)
        except BaseException as exc:  # delivered through the future
            future.set_exception(exc)
            return future

        def run() -> None:
            try:
                fn = self._await_turn(*place)
            except BaseException as exc:
                future.set_exception(exc)
                return
            if not future.set_running_or_notify_cancel():
                self._leave(fn)
                return
            try:
                future.set_result(self._run(name, body, fn))
            except BaseException as exc:  # delivered through the future
                future.set_exception(exc)

        threading.Thread(target=run, name=f"strato-invoke-{name}", daemon=True).start()
        return future

    def stats(self, name: str | None = None) -> RuntimeStats:
        with self._lock:
            if name is not None:
                return self._stats_of(self._function(name))
            return _sum_stats(self._stats_of(fn) for fn in self._functions.values())

    def placement(self) -> dict[str, Any]:
        """Where this run's functions ran and what crossed nodes: per Ray node, the
        invocations of each function there; the bytes each node exchanged with the
        state host (on the head), and their sum over the other nodes."""
        with self._lock:
            ran = {node: dict(fns) for node, fns in self._ran.items()}
        self._state.counted()  # (what this process read across, counted first)
        host = self._ray.get(self._state.actor().where.remote())
        by_node = host["bytes_by_caller_node"]
        reads = host.get("remote_read_bytes_by_node", {})
        head = host["node"]
        # bytes that crossed nodes per function: to or from the state host from another
        # node, and node-local blobs read on another node
        crossed: dict[str, int] = {}
        for kind, nodes in host.get("bytes_by_node_function", {}).items():
            for node, fns in nodes.items():
                if kind == "read" or node != head:
                    for fn, n in fns.items():
                        crossed[fn or "-"] = crossed.get(fn or "-", 0) + n
        return {
            "head_node": head,
            "invocations_by_node": ran,
            "state_bytes_by_node": by_node,
            "remote_read_bytes_by_node": reads,
            "cross_node_bytes": sum(n for node, n in by_node.items() if node != head)
            + sum(reads.values()),
            "cross_node_bytes_by_function": crossed,
        }

    def place(self, name: str, node_id: str | None) -> None:
        """Start ``name``'s new actors on Ray node ``node_id`` (None: anywhere)."""
        with self._lock:
            self._function(name).node = node_id

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pools = [p for fn in self._functions.values() for p in fn.pools()]
            actors = [a for fn in pools for a, _ in fn.idle]
            for fn in pools:
                fn.idle = []
                for waiter in fn.waiters:
                    waiter.set()
                fn.waiters.clear()
            busy = list(self._busy_actors)
        self._wake.set()
        sweeps = [self._retire(actor, graceful=True) for actor in actors]
        sweeps += [self._retire(actor, graceful=False) for actor in busy]
        sweeps += self._remove_node_dirs()
        # the sweeps finish before close returns: nothing is left in /dev/shm after it
        with contextlib.suppress(Exception):
            self._ray.wait([r for r in sweeps if r is not None],
                           num_returns=len([r for r in sweeps if r is not None]), timeout=15)
        if self._inbox_thread is not None:
            self._inbox_thread.join(timeout=5.0)
            with contextlib.suppress(StratoError):
                self._state.call("bus", "delete_queue", self._inbox)
        self._state.release()

    # ---- nested invocations -----------------------------------------------------------

    def _start_inbox(self) -> None:
        with self._lock:
            if self._inbox_thread is not None:
                return
            self._state.call("bus", "create_topic", self._inbox)
            self._state.call("bus", "subscribe", self._inbox, self._inbox)
            self._inbox_thread = threading.Thread(target=self._serve_inbox, daemon=True,
                                                  name="strato-ray-inbox")
            self._inbox_thread.start()

    def _serve_inbox(self) -> None:
        from strato.backends.ray._parts import RayBus

        bus = RayBus(self._state)
        while not self._closed:
            try:
                got = bus.receive(self._inbox, max_messages=10, wait_s=1.0)
            except Exception:  # the state host is away (the run is ending, or it restarts)
                time.sleep(0.5)
                continue
            for message in got:
                call = json.loads(message.body)
                # checked by the caller already; a closing runtime refuses
                with contextlib.suppress(StratoError):
                    future = self.invoke_async(str(call["name"]), call.get("event") or {},
                                               node=call.get("node"))
                    future.add_done_callback(
                        _report_failure(str(call["name"]), lambda: self._closed))
                bus.ack(self._inbox, message.receipt)

    # ---- one invocation ---------------------------------------------------------------

    def _open(self) -> None:
        if self._closed:
            raise StratoError("the runtime is closed")

    def _function_spec(self, name: str) -> FunctionSpec:
        with self._lock:
            self._open()
            return self._function(name).spec

    def _function(self, name: str) -> _Function:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._lookup(name)
        return fn

    def _lookup(self, name: str) -> _Function:
        """A function another runtime of this run registered (nested calls)."""
        try:
            got, _ = self._state.call("table", "get", REGISTRY, name)
        except StratoError:
            got = None
        if got is None:
            raise UnknownFunction(f"no function named {name!r} is registered")
        record = dict(got["value"])
        fn = _Function(FunctionSpec(**record))
        self._functions[name] = fn
        return fn

    def _stats_of(self, fn: _Function) -> RuntimeStats:
        """A function's counts, its per-node pools' included."""
        return _sum_stats(dataclasses.replace(p.stats, live_workers=len(p.idle) + p.busy)
                          for p in fn.pools())

    def _encode(self, name: str, event: Mapping[str, Any]) -> str:
        with self._lock:
            self._open()
            spec = self._function(name).spec
        try:
            body = json.dumps(event, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise StratoError(f"event for function {name!r} is not JSON-serialisable: {exc}"
                              ) from None
        if len(body.encode()) > spec.max_event_bytes:
            raise PayloadTooLarge(
                f"event for function {name!r} is {len(body.encode())} bytes, over its limit of "
                f"{spec.max_event_bytes}; pass large inputs by shared-memory reference"
            )
        return body

    def _run(self, name: str, body: str, fn: _Function) -> Any:
        """One invocation, in the slot of ``fn`` it holds (given back at the end)."""
        invocation_id = uuid.uuid4().hex
        attempt = 0
        try:
            while True:
                try:
                    return self._attempt(fn, invocation_id, body)
                except _Died as died:
                    with self._lock:
                        self._open()
                        fn.stats.crashes += 1
                        if attempt >= fn.spec.retries:
                            raise WorkerCrashed(
                                f"function {name!r}: {died}; gave up after {attempt} "
                                f"retr{'y' if attempt == 1 else 'ies'}") from None
                        fn.stats.retries += 1
                    attempt += 1
        except (FunctionError, InvocationTimeout, WorkerCrashed):
            with self._lock:
                fn.stats.errors += 1
            raise
        finally:
            self._leave(fn)

    def _leave(self, fn: _Function) -> None:
        with self._lock:
            fn.running -= 1
            self._grant(fn)

    def _queue(self, name: str, node: str | None) -> tuple[_Function, threading.Event | None]:
        """A slot of ``name``'s pool (of ``node``'s, for ``locality="node"``), or a place
        in its line: the event is set when the slot is this caller's."""
        if node is None and self._function_spec(name).locality == "node":
            node = self._state.host_node()
        with self._lock:
            self._open()
            fn = self._function(name)
            if fn.spec.locality == "node":
                assert node is not None
                pool = fn.per_node.get(node)
                if pool is None:
                    pool = fn.per_node[node] = _Function(fn.spec, node=node)
                fn = pool
            if fn.running < fn.spec.max_concurrency and not fn.waiters:
                fn.running += 1
                fn.stats.invocations += 1
                return fn, None
            turn = threading.Event()
            fn.waiters.append(turn)
            return fn, turn

    def _await_turn(self, fn: _Function, turn: threading.Event | None) -> _Function:
        if turn is None:
            return fn
        turn.wait()
        with self._lock:
            self._open()
            fn.stats.invocations += 1
            return fn

    def _grant(self, fn: _Function) -> None:
        while fn.waiters and fn.running < fn.spec.max_concurrency:
            fn.running += 1
            fn.waiters.popleft().set()

    def _attempt(self, fn: _Function, invocation_id: str, body: str) -> Any:
        ray = self._ray
        actor, spec = self._acquire(fn)
        started = time.monotonic()
        with self._lock:
            where = self._ran.setdefault(self._node_of.get(actor, "?"), {})
            where[spec.name] = where.get(spec.name, 0) + 1
        try:
            ref = actor.invoke.remote(invocation_id, body, spec.timeout_s)
            try:
                reply = json.loads(ray.get(ref, timeout=spec.timeout_s))
            except ray.exceptions.GetTimeoutError:
                self._retire(actor, graceful=False)
                with self._lock:
                    fn.busy -= 1
                    self._busy_actors.discard(actor)
                    fn.stats.timeouts += 1
                raise InvocationTimeout(
                    f"function {spec.name!r} ran past its timeout of {spec.timeout_s:g} s "
                    "and was stopped") from None
            except ray.exceptions.RayActorError as exc:
                self._discard(fn, actor)
                raise _Died(f"its worker died ({type(exc).__name__})") from None
        finally:
            billed = time.monotonic() - started
            with self._lock:
                fn.stats.billed_s += billed
                fn.stats.gb_s += billed * spec.memory_mb / 1024.0
        with self._lock:
            fn.busy -= 1
            self._busy_actors.discard(actor)
            if not self._closed and fn.spec == spec:
                fn.idle.append((actor, time.monotonic()))
                actor = None
        if actor is not None:
            self._retire(actor, graceful=True)
        if not reply.get("ok"):
            from strato.services._runtime_process import RemoteFunctionError

            raise RemoteFunctionError(spec.name, reply)
        return reply.get("result")

    def _acquire(self, fn: _Function) -> tuple[Any, FunctionSpec]:
        with self._lock:
            self._open()
            spec = fn.spec
            if fn.idle:
                actor, _ = fn.idle.pop()
                fn.busy += 1
                self._busy_actors.add(actor)
                return actor, spec
            fn.busy += 1  # counted live from now: its start is under way
            fn.stats.cold_starts += 1
            node = fn.node
        try:
            actor = self._start(spec, node)
        except BaseException:
            with self._lock:
                fn.busy -= 1
            raise
        with self._lock:
            self._busy_actors.add(actor)
        return actor, spec

    def _start(self, spec: FunctionSpec, node: str | None) -> Any:
        env = {**{k: str(v) for k, v in spec.env.items()}, ENV_VAR: json.dumps(self.config),
               INBOX_ENV: self._inbox}
        options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 1}
        if any(_read_at_load(k) for k in spec.env):
            # read when a library loads (numpy's BLAS is loaded before our code runs):
            # only a fresh worker process started with them obeys them (~1 s slower)
            options["runtime_env"] = {"env_vars": env}
        # pinned, next to the durable state, or the next alive node in turn (simulated
        # clients use the whole cluster)
        if node is None and spec.locality == "state":
            node = self._state.host_node()
        target = node if node is not None else self._next_node(self._functions[spec.name])
        if spec.locality == "node" and target not in self._alive_nodes():
            raise _Died(f"node {target} is gone")  # its pool's work is there, or nowhere
        try:
            return self._start_on(spec, env, options, target)
        except _Died:
            if target is None or spec.locality == "node":
                raise
            return self._start_on(spec, env, options, None)  # that node went: anywhere

    def _start_on(self, spec: FunctionSpec, env: dict[str, str], options: dict[str, Any],
                  target: str | None) -> Any:
        ray = self._ray
        if target is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # hard affinity: Ray's soft affinity does not hold for actors that reserve
            # no CPU (measured: they land elsewhere); a node gone meanwhile fails the
            # start, and the caller starts the actor anywhere instead
            options = {**options,
                       "scheduling_strategy": NodeAffinitySchedulingStrategy(target, soft=False)}
        actor = ray.remote(_Worker).options(**options).remote(spec.name, spec.handler, env)
        try:
            _pid, init_s, node_id = ray.get(actor.ready.remote(),
                                            timeout=max(60.0, spec.timeout_s))
        except Exception as exc:
            ray.kill(actor)
            raise _Died(f"its worker did not start ({type(exc).__name__}: {exc})") from None
        with self._lock:
            self._functions[spec.name].stats.init_s += init_s
            self._node_of[actor] = node_id
            self._pid_of[actor] = _pid
        return actor

    def _remove_node_dirs(self) -> list[Any]:
        """Tasks removing this run's node directories on every alive node: its node-local
        blobs (blobs the run can make again) and its cache of the state host's large
        blobs; the run is over."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from strato.backends.ray._parts import node_dir

        refs = []
        for node in self._alive_nodes():
            with contextlib.suppress(Exception):
                refs.append(self._ray.remote(_remove_tree).options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                ).remote(str(node_dir(str(self.config["root"]), node).parent)))
        return refs

    def _alive_nodes(self) -> list[str]:
        return sorted(str(n["NodeID"]) for n in self._ray.nodes() if n.get("Alive"))

    def _next_node(self, fn: _Function) -> str | None:
        """The alive node after the one this function's last new actor went to."""
        alive = self._alive_nodes()
        if not alive:
            return None
        with self._lock:
            if fn.turn < 0:  # functions start at different nodes: the run spreads out
                fn.turn = zlib.crc32(fn.spec.name.encode())
            else:
                fn.turn += 1
            return alive[fn.turn % len(alive)]

    def _retire(self, actor: Any, *, graceful: bool) -> Any:
        """Stop an actor: let it exit (its shared memory unlinked on the way out), or
        kill it; then a task on its node unlinks what a killed worker left in
        ``/dev/shm`` (a SIGKILLed process cleans nothing up itself)."""
        with self._lock:
            pid = self._pid_of.pop(actor, None)
            node = self._node_of.pop(actor, None)
        try:
            if graceful:
                actor.exit.remote()
            else:
                self._ray.kill(actor)
        except Exception:  # already gone
            pass
        if pid is None or node is None:
            return None
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        try:  # the sweep's ObjectRef; the node itself may be gone
            return self._ray.remote(_sweep_after).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(pid)
        except Exception:
            return None

    def _discard(self, fn: _Function, actor: Any) -> None:
        with self._lock:
            fn.busy -= 1
            self._busy_actors.discard(actor)
        self._retire(actor, graceful=False)

    def _reap(self) -> None:
        while not self._wake.wait(0.2):
            now = time.monotonic()
            gone = []
            with self._lock:
                for fn in [p for f in self._functions.values() for p in f.pools()]:
                    keep = [(a, t) for a, t in fn.idle if now - t < fn.spec.keep_alive_s]
                    gone += [a for a, t in fn.idle if now - t >= fn.spec.keep_alive_s]
                    fn.idle = keep
            for actor in gone:
                self._retire(actor, graceful=True)


def _sum_stats(parts: Iterable[RuntimeStats]) -> RuntimeStats:
    total = RuntimeStats()
    for one in parts:
        for f in dataclasses.fields(RuntimeStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(one, f.name))
    return total


def _report_failure(name: str, closing: Callable[[], bool]) -> Any:
    """A nested invocation has no caller waiting for it: its failure is said here, unless
    the runtime closed under it (the run ended: e.g. an async run's clients in flight)."""

    def report(future: Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None and not closing():
            print(f"strato: {name} (started by another function) failed: "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  file=sys.stderr, flush=True)

    return report


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _sweep_after(pid: int, wait_s: float = 10.0) -> int:
    """On the node of a worker just stopped: once its process is gone, unlink the
    shared-memory segments it left; returns how many."""
    from strato.services import _shm_lifetime

    deadline = time.monotonic() + wait_s
    while _shm_lifetime.owner_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(_shm_lifetime.sweep_orphans(owners=[pid]))


class _Died(Exception):
    """The invocation's actor died (or never started)."""
