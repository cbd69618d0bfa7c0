"""The job config: ``strato.toml`` in the app directory, overridden from the command line."""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from strato.errors import ConfigError

__all__ = ["JobConfig", "dataset_settings", "load_job_config"]

PARTITIONS = ("iid", "dirichlet", "shards")
ACCUMULATORS = ("float32", "float64")
PLACEMENTS = ("best-fit", "round-robin")
MODES = ("sync", "async")


@dataclass(frozen=True)
class JobConfig:
    rounds: int = 10
    clients: int = 10
    clients_per_round: int = 5
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    quorum: float = 1.0  # fraction of the round's clients whose updates close the round
    round_deadline_s: float = 120.0
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)  # handed to the app's train()
    client_concurrency: int = 2  # simulated clients training at once on this machine
    # the memory of one aggregator function: robust strategies shard the model so that
    # each shard's K × |θ|/M rows fit it
    function_memory_mb: int = 1024
    # the aggregators' sums: float64 (any arrival order and any tree give the same model,
    # so a rerun or a resumed run reproduces a run) or float32 (about half the memory
    # traffic per update; the model then depends on the arrival order, in its last bits,
    # and training can amplify that over rounds)
    accumulator: str = "float64"
    # where a backend with several nodes (Ray) runs the leaf that adds the updates lying
    # on a node: "best-fit" (control.placement: on that node, where it maps them in
    # place) or "round-robin" (nodes dealt in turn, whatever the updates' node: the
    # locality-blind comparison of benchmarks/ray_scale.py)
    placement: str = "best-fit"
    # how many rounds' update blobs and models a run keeps once a newer model supersedes
    # them (0: all; a long run keeps its disk bounded with a few)
    keep_rounds: int = 0
    # a norm bound against poisoned updates (0: none): an update farther from the
    # round's model than this many times the round's median distance is scaled back
    # to that distance; its distance is measured in the pass that adds it
    max_update_norm: float = 0.0
    # "sync": rounds with a barrier; "async": buffered aggregation without one
    # (control.asynchronous): ``concurrency`` clients train at once, every ``buffer``
    # updates make the next version, staleness-weighted; ``rounds`` counts versions
    mode: str = "sync"
    concurrency: int = 0  # 0: clients_per_round
    buffer: int = 0  # 0: clients_per_round (a version takes a round's work)
    staleness: str = "polynomial"  # constant | polynomial | hinge
    staleness_exponent: float = 0.5  # polynomial's a in (1 + s)^-a; hinge's slope
    staleness_hinge: int = 4  # hinge: the staleness up to which the weight stays 1
    max_staleness: int = 10  # staler updates are refused, with the reason
    # simulated heterogeneity: "" (none) or "lognormal:SIGMA": each client waits its
    # factor exp(SIGMA z) times its training time after training
    speed: str = ""

    def validate(self) -> JobConfig:
        self._check_types()

        def positive(name: str, value: float) -> None:
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")

        positive("rounds", self.rounds)
        positive("clients", self.clients)
        positive("clients_per_round", self.clients_per_round)
        positive("round_deadline_s", self.round_deadline_s)
        positive("client_concurrency", self.client_concurrency)
        positive("function_memory_mb", self.function_memory_mb)
        if self.max_update_norm < 0:
            raise ConfigError("max_update_norm must be 0 (no bound) or positive, "
                              f"got {self.max_update_norm}")
        if self.keep_rounds < 0:
            raise ConfigError(f"keep_rounds must be 0 (keep all) or more, got {self.keep_rounds}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, "
                              f"got {self.placement!r}")
        if self.accumulator not in ACCUMULATORS:
            raise ConfigError(f"accumulator must be one of {', '.join(ACCUMULATORS)}, "
                              f"got {self.accumulator!r}")
        if self.clients_per_round > self.clients and self.mode != "async":
            raise ConfigError(
                f"clients_per_round ({self.clients_per_round}) exceeds clients ({self.clients})"
            )
        if not 0 < self.quorum <= 1:
            raise ConfigError(f"quorum must be a fraction in (0, 1], got {self.quorum}")
        if self.partition not in PARTITIONS:
            raise ConfigError(
                f"unknown partition {self.partition!r} (choose from {', '.join(PARTITIONS)})"
            )
        positive("dirichlet_alpha", self.dirichlet_alpha)
        self._validate_async()
        return self

    def _validate_async(self) -> None:
        from strato.control.asynchronous import RULES, speed_factor

        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("concurrency", "buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} (in [async]) must be 0 (clients_per_round) or "
                                  f"more, got {getattr(self, name)}")
        if self.mode == "async" and self.async_concurrency > self.clients:
            raise ConfigError(f"concurrency ({self.async_concurrency}, in [async]) exceeds "
                              f"clients ({self.clients})")
        if self.max_staleness < 0 or self.staleness_hinge < 0:
            raise ConfigError("max_staleness and staleness_hinge (in [async]) must be 0 or "
                              "more")
        if self.staleness not in RULES:
            raise ConfigError(f"staleness (in [async]) must be one of {', '.join(RULES)}, "
                              f"got {self.staleness!r}")
        if not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            raise ConfigError("staleness_exponent (in [async]) must be 0 or more, "
                              f"got {self.staleness_exponent}")
        try:
            speed_factor(self.speed, 0, "check")
        except ValueError as exc:
            raise ConfigError(f"speed (in [clients]): {exc}") from None
        if self.mode == "async" and self.keep_rounds and self.keep_rounds <= self.max_staleness + 1:
            raise ConfigError(
                f"keep_rounds ({self.keep_rounds}) must exceed max_staleness + 1 "
                f"({self.max_staleness + 1}) in async mode: a stale update is measured against "
                "the model it started from")

    def _check_types(self) -> None:
        """Every setting's type, with a message that names the setting and where it is set
        (``rounds = "4"`` in strato.toml must not fail later, deep in the code)."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = str(f.type).split("[")[0]
            expected = _TYPES[kind]
            if isinstance(value, bool) or not isinstance(value, expected):
                where = _SECTION_OF.get(f.name, "")
                where = f" (in [{where}] of strato.toml)" if where else ""
                raise ConfigError(
                    f"setting {f.name!r}{where} must be {_TYPE_NAMES[kind]}, "
                    f"got {_describe(value)}"
                )

    @property
    def async_concurrency(self) -> int:
        """Async: clients training at once (``concurrency``, else clients_per_round)."""
        return self.concurrency or self.clients_per_round

    @property
    def async_buffer(self) -> int:
        """Async: updates a version takes (``buffer``, else clients_per_round)."""
        return self.buffer or self.clients_per_round

    @property
    def quorum_count(self) -> int:
        return max(1, math.ceil(self.quorum * self.clients_per_round - 1e-9))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown job setting(s): {', '.join(unknown)}")
        try:
            return cls(**data).validate()
        except TypeError as exc:
            raise ConfigError(f"bad job setting: {exc}") from None

    def override(self, **changes: Any) -> JobConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None}).validate()


_SECTIONS = {
    "job": ("rounds", "clients", "clients_per_round", "seed", "client_concurrency",
            "keep_rounds", "mode"),
    "async": ("concurrency", "buffer", "staleness", "staleness_exponent", "staleness_hinge",
              "max_staleness"),
    "clients": ("speed",),
    "round": ("quorum", "round_deadline_s"),
    "data": ("partition", "dirichlet_alpha"),
    "aggregation": ("function_memory_mb", "accumulator", "placement", "max_update_norm"),
}


_SECTION_OF = {key: section for section, keys in _SECTIONS.items() for key in keys}
_SECTION_OF.update(strategy="strategy", strategy_options="strategy", train="train")
_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int, "float": (int, float), "str": str, "dict": dict,
}
_TYPE_NAMES = {"int": "a whole number", "float": "a number", "str": "a string",
               "dict": "a table"}


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", str: "a string", int: "a whole number", float: "a number",
             dict: "a table", list: "a list"}
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})"


def load_job_config(path: Path, dataset: str | None = None) -> JobConfig:
    """Read ``strato.toml``: [job], [round], [data], [aggregation], [strategy] (name +
    options), [train], and ``[dataset.NAME]``: settings that apply when the run's data is
    the dataset NAME (any key of the sections above; ``train`` as a sub-table).

    The example app uses ``[dataset.digits]``: without MNIST its 100 clients would hold
    about 14 images each, too few to learn from."""
    doc = _read(path)
    flat = _flatten(path, doc)
    shapes = doc.get("dataset", {})
    if not isinstance(shapes, dict) or not all(isinstance(v, dict) for v in shapes.values()):
        raise ConfigError(f"{path}: [dataset] must hold tables, one per dataset: [dataset.NAME]")
    if dataset is not None and dataset in shapes:
        shape = dict(shapes[dataset])
        train = shape.pop("train", {})
        if not isinstance(train, dict):
            raise ConfigError(f"{path}: [dataset.{dataset}.train] must be a table")
        known = {k for keys in _SECTIONS.values() for k in keys}
        unknown = sorted(set(shape) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(map(repr, unknown))} "
                              f"in [dataset.{dataset}]")
        flat.update(shape)
        flat["train"] = {**flat["train"], **train}
    return JobConfig.from_dict(flat)


def dataset_settings(path: Path, dataset: str) -> dict[str, Any]:
    """What ``[dataset.NAME]`` of ``strato.toml`` sets for ``dataset`` (for the run's
    first lines: the user sees the job's shape change)."""
    shapes = _read(path).get("dataset", {})
    shape = shapes.get(dataset, {}) if isinstance(shapes, dict) else {}
    return dict(shape) if isinstance(shape, dict) else {}


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None


def _flatten(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, keys in _SECTIONS.items():
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        for key, value in table.items():
            if key not in keys:
                raise ConfigError(f"{path}: unknown setting {key!r} in [{section}]")
            flat[key] = value
    strategy = dict(doc.get("strategy", {}))
    if "name" in strategy:
        flat["strategy"] = strategy.pop("name")
    flat["strategy_options"] = strategy
    flat["train"] = dict(doc.get("train", {}))
    unknown = sorted(set(doc) - {*_SECTIONS, "strategy", "train", "dataset"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}")
    return flat
