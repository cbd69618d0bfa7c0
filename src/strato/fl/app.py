"""The app a user writes: a model, a training function and an evaluation function.

An app directory holds ``app.py`` and an optional ``strato.toml``::

    from strato.fl import App
    app = App()

    @app.model
    def model(info):                 # info.input_shape, info.num_classes
        return MyNet(info.num_classes)

    @app.train
    def train(model, data, ctx):     # data.x, data.y; ctx.config, ctx.round, ctx.seed
        ...                          # train in place; return optional metrics dict

    @app.evaluate
    def evaluate(model, data):       # -> {"loss": ..., "accuracy": ...}
        ...

A Flower user will recognise ``fit`` and ``evaluate``; parameters never pass through
user code: Strato moves them in and out of the model as one flat buffer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.errors import ConfigError

__all__ = ["App", "DataInfo", "Dataset", "TrainContext", "load_app"]


@dataclass(frozen=True)
class DataInfo:
    name: str
    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class Dataset:
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    info: DataInfo

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class TrainContext:
    round: int
    client: str
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    global_model: Any = None  # a frozen copy of the received model (FedProx's anchor)
    proximal_mu: float = 0.0


ModelFn = Callable[[DataInfo], Any]
TrainFn = Callable[[Any, Dataset, TrainContext], "dict[str, float] | None"]
EvalFn = Callable[[Any, Dataset], "dict[str, float]"]


class App:
    def __init__(self) -> None:
        self.model_fn: ModelFn | None = None
        self.train_fn: TrainFn | None = None
        self.evaluate_fn: EvalFn | None = None
        self.directory: Path | None = None

    def model(self, fn: ModelFn) -> ModelFn:
        self.model_fn = fn
        return fn

    def train(self, fn: TrainFn) -> TrainFn:
        self.train_fn = fn
        return fn

    def evaluate(self, fn: EvalFn) -> EvalFn:
        self.evaluate_fn = fn
        return fn

    def check(self, where: str) -> App:
        for attr, deco in (
            ("model_fn", "model"),
            ("train_fn", "train"),
            ("evaluate_fn", "evaluate"),
        ):
            if getattr(self, attr) is None:
                raise ConfigError(
                    f"{where} defines no {deco} function (decorate one with @app.{deco})"
                )
        return self


_LOAD_LOCK = threading.Lock()  # a module is visible in sys.modules before it has run


def load_app(app_dir: str | Path) -> App:
    """Import ``APP_DIR/app.py`` and return its ``App``; one-line ConfigError otherwise."""
    with _LOAD_LOCK:
        return _load_app(app_dir)


def _load_app(app_dir: str | Path) -> App:
    directory = Path(app_dir).resolve()
    source = directory / "app.py"
    if not directory.is_dir():
        raise ConfigError(f"app directory {app_dir} does not exist")
    if not source.is_file():
        raise ConfigError(f"{app_dir} is neither a Strato app (it has no app.py) nor a "
                          "Flower app (a pyproject.toml with [tool.flwr.app.components])")
    name = "strato_app_" + hashlib.sha256(str(source).encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, source)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {source}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(directory))  # let the app import its own helpers
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ConfigError(f"{source}: {type(exc).__name__}: {exc}") from None
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if not apps:
        raise ConfigError(
            f"{source} defines no training function (create `app = App()` "
            "and decorate one with @app.train)"
        )
    app = apps[0].check(str(source))
    app.directory = directory
    return app
