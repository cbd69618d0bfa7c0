"""The five serverless primitives: Bus, BlobStore, Table, Runtime, Workflow.

Each is a ``Protocol`` with the semantics of the AWS service it mirrors, and an
embedded implementation that runs on one machine with nothing but the standard
library and numpy. ``connect(config)`` builds the bundle a run (or a function
running inside a worker) uses; the config is plain JSON so it can travel in an
environment variable to worker processes.

Backends plug in from above: a backend package calls ``register_backend(name,
Backend(...))`` when it is imported, and whoever picks the backend (the ``strato``
command, a test, the backend's own function entry point) imports it first; a backend
not imported yet is looked up among the installed ``strato.backends`` entry points.
Nothing here names a backend but the embedded one. Beside its five parts, a
backend may say how an application's run is set up on it (``open_run``: e.g. deploy
the ``AppResources`` first), what delivers a ``StreamSource`` (``start_trigger``) and
how its functions' usage is counted and billed (``meter``); the defaults are the
embedded backend's.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from strato.errors import ConfigError
from strato.services.blobs import BlobStore
from strato.services.bus import Bus, Message, TopicSchema
from strato.services.runtime import Context, FunctionSpec, Runtime, RuntimeStats
from strato.services.table import Change, Item, Table
from strato.services.triggers import StreamSource, StreamTrigger
from strato.services.workflow import Execution, Workflow

__all__ = [
    "ENV_VAR",
    "AppResources",
    "Backend",
    "BlobStore",
    "Bus",
    "Change",
    "Context",
    "Execution",
    "FunctionSpec",
    "Item",
    "Message",
    "Meter",
    "Runtime",
    "RuntimeStats",
    "Services",
    "StreamSource",
    "Table",
    "TopicSchema",
    "Trigger",
    "Workflow",
    "backend_names",
    "connect",
    "connect_from_env",
    "embedded",
    "open_run",
    "register_backend",
    "worker_services",
]

ENV_VAR = "STRATO_SERVICES"


@dataclass(frozen=True)
class AppResources:
    """What an application runs on the services, as plain data.

    A backend that provisions ahead of time (AWS: one CloudFormation stack) makes these
    from it; the embedded backend makes each on first use. ``name`` names the
    deployment (the stack ``<prefix>-<name>``), ``description`` says what it is (one
    line, for the console); ``queues`` are patterns (``client-*``)
    of the queues subscribers make at run time, which the functions receive from;
    ``invoked`` are the functions that functions invoke.
    """

    name: str
    description: str
    tables: tuple[str, ...] = ()
    topics: Mapping[str, TopicSchema] = field(default_factory=dict)
    functions: tuple[FunctionSpec, ...] = ()
    state_machines: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    triggers: tuple[StreamSource, ...] = ()
    queues: tuple[str, ...] = ()
    invoked: tuple[str, ...] = ()
    # Prefixes of blobs the application can make again (a simulated client's update: it
    # trains again). A backend with several nodes may keep them on the node that wrote
    # them (Ray), where that node's functions map them in place; one lost with its
    # node is gone (``BlobStore.home`` names the node, ``alive`` says whether it is).
    node_local_blobs: tuple[str, ...] = ()
    # Prefixes of blobs written once and read once soon after, which the application
    # can make again (a leaf's partial: the root hands its updates over again). A backend
    # with several nodes may hand them from writer to reader in memory (Ray: an object
    # in the writer's object store, pulled once by the reader), lost with the writer.
    handoff_blobs: tuple[str, ...] = ()


class Trigger(Protocol):
    """What delivers a ``StreamSource`` while a run goes on."""

    def stop(self) -> None: ...


class Meter(Protocol):
    """A run's view of what its functions used."""

    def stats(self) -> RuntimeStats:
        """Invocations, cold starts, billed and GB-seconds of the run's functions."""
        ...

    def usage(self, machine: str, execution: str) -> dict[str, Any] | None:
        """The billable usage since this meter was made, priced (the workflow execution
        ``machine``/``execution`` counts too); None where nothing is billed."""
        ...


@dataclass(frozen=True)
class Backend:
    """A backend of the five primitives, as it registers itself (see the module doc).

    ``open_part(name, services)`` opens one primitive; ``open_run(config, resources)``
    returns the Services of a run once what ``resources`` names exists (default:
    ``connect(config)``); ``start_trigger(services, source)`` starts what delivers a
    stream source (default: a ``StreamTrigger`` polling in this process);
    ``meter(services)`` counts the functions' usage (default: the runtime's stats).
    ``local_workers``: the runtime's workers are children of this process (they die
    with it); False where the functions run in the cloud.
    """

    open_part: Callable[[str, Services], Any]
    open_run: Callable[[Mapping[str, Any], AppResources], Services] | None = None
    start_trigger: Callable[[Services, StreamSource], Trigger] | None = None
    meter: Callable[[Services], Meter] | None = None
    local_workers: bool = True


def _open_embedded(name: str, services: Services) -> Any:
    root = services.root
    if name == "bus":
        from strato.services._bus_sqlite import SqliteBus

        return SqliteBus(root / "bus.sqlite")
    if name == "table":
        from strato.services._table_sqlite import SqliteTable

        return SqliteTable(root / "table.sqlite")
    if name == "blobs":
        from strato.services._blobs_local import LocalBlobStore

        return LocalBlobStore(root / "blobs")
    if name == "runtime":
        from strato.services._runtime_process import ProcessRuntime

        env = {ENV_VAR: json.dumps(services.config)}
        return ProcessRuntime(env=env)
    if name == "workflow":
        from strato.services._workflow_embedded import EmbeddedWorkflow

        return EmbeddedWorkflow(services.table, lambda: services.runtime)
    raise AssertionError(name)


_BACKENDS: dict[str, Backend] = {"embedded": Backend(_open_embedded)}


def register_backend(name: str, backend: Backend) -> None:
    """Make ``{"backend": name, ...}`` configs open ``backend`` (a backend package calls
    this when it is imported; registering the same name again replaces the entry)."""
    if name == "embedded":
        raise ConfigError("the embedded backend cannot be replaced")
    _BACKENDS[name] = backend


def backend_names() -> list[str]:
    """The backends registered in this process."""
    return list(_BACKENDS)


def _discover(name: str) -> None:
    """Load the backend ``name`` that an installed distribution declares as an entry
    point of the group ``strato.backends`` (a package that registers itself on import),
    so that a process given only a JSON config can open it."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="strato.backends", name=name):
        entry.load()


def _backend(name: str) -> Backend:
    if name not in _BACKENDS:
        _discover(name)
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown backend {name!r} (registered: {', '.join(_BACKENDS)}): a backend "
            "registers itself when its package (strato.backends.NAME) is imported"
        ) from None


class _RuntimeMeter:
    """The embedded meter: the runtime's own counters; nothing is billed."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def stats(self) -> RuntimeStats:
        return self.services.runtime.stats()

    def usage(self, machine: str, execution: str) -> dict[str, Any] | None:
        return None


class Services:
    """A bundle of the five primitives, built lazily from a JSON config.

    Only the parts a caller touches are opened: a function inside a worker that uses
    the table and the blobs never starts a runtime of its own.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        backend = str(config.get("backend", "embedded"))
        self._backend = _backend(backend)
        if "root" not in config:
            raise ConfigError("every backend needs a local 'root' directory for its run files")
        self.config: dict[str, Any] = dict(config)
        self.backend: str = backend
        self.root = Path(config["root"])
        self._parts: dict[str, Any] = {}

    def _part(self, name: str) -> Any:
        if name not in self._parts:
            self.root.mkdir(parents=True, exist_ok=True)
            self._parts[name] = self._open(name)
        return self._parts[name]

    def _open(self, name: str) -> Any:
        return self._backend.open_part(name, self)

    @property
    def local_workers(self) -> bool:
        """Whether the runtime's workers are children of this process (they die with it)."""
        return self._backend.local_workers

    def start_trigger(self, source: StreamSource) -> Trigger:
        """Start what delivers ``source`` (see ``Backend``); stop it with ``.stop()``."""
        if self._backend.start_trigger is not None:
            return self._backend.start_trigger(self, source)
        trigger = StreamTrigger(
            self.table,
            source.table,
            self.runtime,
            source.function,
            batch_size=source.batch_size,
            kinds=source.kinds,
            retain=source.retain,
        )
        return trigger.start()

    def meter(self) -> Meter:
        """A meter of the functions' usage from now on (see ``Meter``)."""
        if self._backend.meter is not None:
            return self._backend.meter(self)
        return _RuntimeMeter(self)

    @property
    def bus(self) -> Bus:
        return self._part("bus")  # type: ignore[no-any-return]

    @property
    def table(self) -> Table:
        return self._part("table")  # type: ignore[no-any-return]

    @property
    def blobs(self) -> BlobStore:
        return self._part("blobs")  # type: ignore[no-any-return]

    @property
    def runtime(self) -> Runtime:
        return self._part("runtime")  # type: ignore[no-any-return]

    @property
    def workflow(self) -> Workflow:
        return self._part("workflow")  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close every opened part, the runtime (and its workers) first."""
        for name in ("workflow", "runtime", "bus", "table", "blobs"):
            part = self._parts.pop(name, None)
            close = getattr(part, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(config: Mapping[str, Any]) -> Services:
    return Services(config)


def open_run(config: Mapping[str, Any], resources: AppResources) -> Services:
    """The Services of an application's run on the backend ``config`` names, with what
    ``resources`` lists in place where the backend provisions ahead of time."""
    backend = _backend(str(config.get("backend", "embedded")))
    if backend.open_run is not None:
        return backend.open_run(config, resources)
    return connect(config)


def embedded(root: str | os.PathLike[str]) -> Services:
    """The embedded backend rooted at a directory (created if needed)."""
    return Services({"backend": "embedded", "root": str(Path(root).resolve())})


def connect_from_env() -> Services:
    """The bundle of the run that started this worker process."""
    raw = os.environ.get(ENV_VAR)
    if not raw:
        raise ConfigError(f"{ENV_VAR} is not set: this code must run inside a Strato function")
    return Services(json.loads(raw))


_FROM_ENV: dict[str, Services] = {}
_FROM_ENV_LOCK = threading.Lock()


def worker_services() -> Services:
    """``connect_from_env()`` opened once per process and kept across warm invocations
    (one bundle per run configuration the environment names)."""
    raw = os.environ.get(ENV_VAR, "")
    with _FROM_ENV_LOCK:
        if raw not in _FROM_ENV:
            _FROM_ENV[raw] = connect_from_env()
        return _FROM_ENV[raw]
