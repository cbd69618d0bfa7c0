"""The five serverless primitives: Bus, BlobStore, Table, Runtime, Workflow.

Each is a ``Protocol`` with the semantics of the AWS service it mirrors, and an
embedded implementation that runs on one machine with nothing but the standard
library and numpy. ``connect(config)`` builds the bundle a run (or a function
running inside a worker) uses; the config is plain JSON so it can travel in an
environment variable to worker processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strato.errors import ConfigError
from strato.services.blobs import BlobStore
from strato.services.bus import Bus, Message, TopicSchema
from strato.services.runtime import Context, FunctionSpec, Runtime, RuntimeStats
from strato.services.table import Change, Item, Table
from strato.services.workflow import Execution, Workflow

__all__ = [
    "ENV_VAR",
    "BlobStore",
    "Bus",
    "Change",
    "Context",
    "Execution",
    "FunctionSpec",
    "Item",
    "Message",
    "Runtime",
    "RuntimeStats",
    "Services",
    "Table",
    "TopicSchema",
    "Workflow",
    "connect",
    "connect_from_env",
    "embedded",
]

ENV_VAR = "STRATO_SERVICES"

# Backends other than the embedded one live in a module with
# ``open_part(name, services) -> part`` for name in bus/table/blobs/runtime/workflow.
BACKENDS: dict[str, str] = {
    "embedded": "strato.services",
    "aws": "strato.backends.aws",
}


class Services:
    """A bundle of the five primitives, built lazily from a JSON config.

    Only the parts a caller touches are opened: a function inside a worker that uses
    the table and the blobs never starts a runtime of its own.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        backend = config.get("backend", "embedded")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r} (available: {', '.join(BACKENDS)})")
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
        if self.backend != "embedded":
            import importlib

            module = importlib.import_module(BACKENDS[self.backend])
            return module.open_part(name, self)
        if name == "bus":
            from strato.services._bus_sqlite import SqliteBus

            return SqliteBus(self.root / "bus.sqlite")
        if name == "table":
            from strato.services._table_sqlite import SqliteTable

            return SqliteTable(self.root / "table.sqlite")
        if name == "blobs":
            from strato.services._blobs_local import LocalBlobStore

            return LocalBlobStore(self.root / "blobs")
        if name == "runtime":
            from strato.services._runtime_process import ProcessRuntime

            env = {ENV_VAR: json.dumps(self.config)}
            return ProcessRuntime(env=env)
        if name == "workflow":
            from strato.services._workflow_embedded import EmbeddedWorkflow

            return EmbeddedWorkflow(self.table, lambda: self.runtime)
        raise AssertionError(name)

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


def embedded(root: str | os.PathLike[str]) -> Services:
    """The embedded backend rooted at a directory (created if needed)."""
    return Services({"backend": "embedded", "root": str(Path(root).resolve())})


def connect_from_env() -> Services:
    """The bundle of the run that started this worker process."""
    raw = os.environ.get(ENV_VAR)
    if not raw:
        raise ConfigError(f"{ENV_VAR} is not set: this code must run inside a Strato function")
    return Services(json.loads(raw))
