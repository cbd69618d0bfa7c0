"""Flower apps on Strato, unchanged: ``strato run DIR`` where DIR is a Flower app.

A Flower app directory has a ``pyproject.toml`` with ``[tool.flwr.app.components]``
(``serverapp``, ``clientapp``) and ``[tool.flwr.app.config]``. Strato runs it as
Flower's own runtime would, without a SuperLink or SuperNodes that wait:

- the **ServerApp** runs in the run process against ``StratoGrid``, Flower's ``Grid``
  on Strato's services: each message pushed is written to the BlobStore and starts
  the ``flower_client`` function for its node (the Runtime: a warm worker, or a cold
  one, retired when idle); its reply comes back the same way;
- the **ClientApp** runs inside that function (``strato.fl._flower_client``) with a
  ``Context`` per node: ``node_config`` ``partition-id``/``num-partitions`` (and
  ``data-dir`` when the run has one), the fused ``run_config``, and ``state``, kept
  per node in the Table between invocations, since functions keep nothing.

Messages travel in Strato's message frame (``strato.fl.flower_wire``): the arrays in
the dense codec, the rest as Flower's protobuf; no pickle. Flower is imported only
here and in the function, from the ``flower`` extra.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import tomllib
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strato.errors import ConfigError, StratoError
from strato.fl.flower_wire import FUNCTION, JOB_TABLE, STATE_TABLE
from strato.services import FunctionSpec

MESSAGE_TTL_S = 43_200.0  # Flower's default time-to-live of a message: a ClientApp may take it

__all__ = [
    "FlowerApp",
    "FlowerRun",
    "check_flower_flags",
    "flower_app",
    "flower_resume_refusal",
    "parse_run_config",
    "run_flower",
]



@dataclass(frozen=True)
class FlowerApp:
    directory: Path
    serverapp: str
    clientapp: str
    config: dict[str, Any]  # [tool.flwr.app.config], flattened ("a.b" keys)
    nodes: int | None  # options.num-supernodes of the default federation, when it says


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flower_app(directory: str | Path) -> FlowerApp | None:
    """The Flower app in ``directory``; None when its ``pyproject.toml`` names no
    Flower components (or there is none); a one-line ConfigError when it is broken."""
    directory = Path(directory).resolve()
    path = directory / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} does not parse: {exc}") from None
    app = data.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components") if isinstance(app, Mapping) else None
    if components is None:
        return None
    refs = {}
    for name in ("serverapp", "clientapp"):
        ref = components.get(name) if isinstance(components, Mapping) else None
        module, _, attr = str(ref or "").partition(":")
        if not module or not attr:
            raise ConfigError(f"{path}: [tool.flwr.app.components] {name} must be "
                              f"'module:attribute', got {ref!r}")
        refs[name] = str(ref)
    config = app.get("config", {})
    if not isinstance(config, Mapping):
        raise ConfigError(f"{path}: [tool.flwr.app.config] must be a table")
    federations = data["tool"]["flwr"].get("federations", {})
    nodes = None
    if isinstance(federations, Mapping):
        default = federations.get(str(federations.get("default", "")), {})
        options = default.get("options", {}) if isinstance(default, Mapping) else {}
        if isinstance(options, Mapping) and isinstance(options.get("num-supernodes"), int):
            nodes = int(options["num-supernodes"])
    return FlowerApp(directory, refs["serverapp"], refs["clientapp"], _flatten(config), nodes)


def parse_run_config(text: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``--run-config 'key=value ...'`` over the app's config, as ``flwr run`` takes it:
    TOML values, keys the app's config names (a misspelt key is an error, not ignored)."""
    fused = dict(defaults)
    if not text:
        return fused
    import shlex

    for pair in shlex.split(text):
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise ConfigError(f"--run-config: {pair!r} is not key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: a string, as flwr takes it
        if key not in fused:
            known = ", ".join(sorted(fused)) or "none"
            raise ConfigError(f"--run-config: the app's config has no {key!r} (it has: {known})")
        if isinstance(fused[key], bool) != isinstance(value, bool) or (
                isinstance(fused[key], (int, float)) and not isinstance(value, (int, float))):
            raise ConfigError(f"--run-config: {key} must be like {fused[key]!r}, got {raw!r}")
        fused[key] = value
    return fused


# Settings of a Strato app's job that a Flower app's ServerApp makes for itself.
_STRATO_ONLY = ("--clients-per-round", "--mode", "--keep-rounds", "--max-update-norm",
                "--strategy", "--sparsity", "--eta", "--bits", "--zstd", "--kept-rate",
                "--partition", "--seed", "--remote-clients")


def check_flower_flags(given: Mapping[str, Any], others: Iterable[str] = ()) -> None:
    """Refuse, in one line, the options of ``strato run`` a Flower app has no use for."""
    unused = [flag for flag in _STRATO_ONLY if given.get(flag) is not None] + list(others)
    if unused:
        raise ConfigError(f"{', '.join(unused)}: not for a Flower app, whose ServerApp "
                          "chooses its strategy and rounds (use --run-config for its config)")


def flower_resume_refusal(out: Path) -> None:
    """``--resume OUT`` of a Flower run: refused, since its ServerApp kept the rounds."""
    try:
        recorded = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(recorded, dict) and recorded.get("kind") == "flower":
        raise ConfigError(f"{out} is a Flower app's run, which cannot be resumed: its "
                          "ServerApp holds the rounds in memory; start it again with --out")


@dataclass
class FlowerRun:
    app: FlowerApp
    out: Path
    run_config: dict[str, Any]
    nodes: int
    data_dir: str | None = None
    concurrency: int = 2
    quiet: bool = False
    services: dict[str, Any] | None = None


def _node_ids(run_id: int, count: int) -> list[int]:
    """Stable 63-bit node ids, one per partition (Flower's ids are random uint64)."""
    return [int(hashlib.sha256(f"{run_id}:{i}".encode()).hexdigest()[:15], 16) + 2
            for i in range(count)]


def _load(ref: str, directory: Path, kind: str) -> Any:
    from flwr.supercore.object_ref import load_app

    try:
        return load_app(ref, ConfigError, directory)
    except ConfigError as exc:
        raise ConfigError(f"{directory}: the {kind} {ref}: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(f"{directory}: the {kind} {ref} does not import: "
                          f"{type(exc).__name__}: {exc}") from None


def _where_raised(exc: BaseException, directory: Path) -> str:
    """The innermost frame of the app's own code (file:line) an exception came from."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if str(directory) in str(f.filename)]
    return f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def run_flower(opts: FlowerRun) -> dict[str, Any]:
    """Run the Flower app's ServerApp to its end; returns the summary (also written)."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError(f"{opts.app.directory} is a Flower app, and Flower is not "
                          "installed: pip install 'strato[flower]'") from None
    from flwr.app import Context, RecordDict
    from flwr.serverapp import ServerApp
    from flwr.supercore.task_identity import TaskIdentity

    from strato.fl.flower_engine import EagerTrain, patched_strategies
    from strato.fl.flower_grid import StratoGrid
    from strato.services import connect

    logging.getLogger("flwr").setLevel(logging.WARNING)  # Strato's lines say the progress
    if opts.nodes < 1:
        raise ConfigError(f"a Flower run needs at least one node, got {opts.nodes}")
    out = opts.out.resolve()
    if (out / "run.json").exists() or (out / "services").exists():
        raise ConfigError(f"{out} holds a run already: give another --out")
    out.mkdir(parents=True, exist_ok=True)
    server_app = _load(opts.app.serverapp, opts.app.directory, "ServerApp")
    if not isinstance(server_app, ServerApp):
        raise ConfigError(f"{opts.app.directory}: {opts.app.serverapp} is not a flwr ServerApp")
    _load(opts.app.clientapp, opts.app.directory, "ClientApp")  # fails here, not in a node
    run_id = int(hashlib.sha256(str(out).encode()).hexdigest()[:12], 16)
    nodes = _node_ids(run_id, opts.nodes)
    config = dict(opts.services or {"backend": "embedded"})
    config.setdefault("root", str(out / "services"))
    svc = connect(config)
    (out / "run.json").write_text(json.dumps({
        "kind": "flower", "app_dir": str(opts.app.directory), "nodes": opts.nodes,
        "run_config": opts.run_config, "data_dir": opts.data_dir,
        "services": opts.services}, indent=2) + "\n")
    try:
        for table in (JOB_TABLE, STATE_TABLE):
            svc.table.create_table(table, stream=False)
        svc.table.put(JOB_TABLE, "job", {
            "app_dir": str(opts.app.directory), "clientapp": opts.app.clientapp,
            "run_id": run_id, "run_config": opts.run_config, "nodes": nodes,
            "data_dir": str(Path(opts.data_dir).resolve()) if opts.data_dir else None,
        })
        svc.runtime.register(FunctionSpec(
            FUNCTION, "strato.fl._flower_client:handle", timeout_s=MESSAGE_TTL_S,
            max_concurrency=max(1, opts.concurrency), keep_alive_s=60,
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}))
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 1  # the SuperLink's: where a ServerApp's messages come from
        (out / "metrics.jsonl").write_text("")
        # robust rules' shards read replies from this machine's shared memory
        engine = EagerTrain(svc.runtime if svc.backend == "embedded" else None)
        grid = StratoGrid(svc, nodes, run_id, rounds=opts.run_config.get("num-server-rounds"),
                          say=None if opts.quiet else _print, out=out, engine=engine)
        context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                          run_config=dict(opts.run_config))
        _say(opts, f"Flower app {opts.app.directory.name}: ServerApp {opts.app.serverapp}, "
                   f"ClientApp {opts.app.clientapp} on {opts.nodes} nodes")
        started = time.monotonic()
        here = os.getcwd()
        os.chdir(out)  # what the ServerApp writes lands in the run directory
        try:
            with patched_strategies(engine):
                server_app(grid=grid, context=context)
        except (StratoError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise StratoError(f"the ServerApp raised {type(exc).__name__}: {exc}"
                              f"{_where_raised(exc, opts.app.directory)}") from None
        finally:
            os.chdir(here)
            engine.close()
        grid.drain()
        summary = grid.summary(time.monotonic() - started)
        summary.update(app=str(opts.app.directory), kind="flower", nodes=opts.nodes,
                       run_config=opts.run_config)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        acc = summary.get("final_accuracy")
        _say(opts, f"done: {summary['rounds']} rounds"
                   + (f", final accuracy {acc:.4f}" if isinstance(acc, float) else "")
                   + f", {summary['wall_s']:.1f} s; wrote {out / 'summary.json'}, metrics.jsonl")
        return summary
    finally:
        svc.close()


def _print(line: str) -> None:
    print(line, flush=True)


def _say(opts: FlowerRun, text: str) -> None:
    if not opts.quiet:
        _print(text)
