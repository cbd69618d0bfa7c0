"""The example's job as a Flower app, run through Flower's own simulation (its Ray backend).

``python benchmarks/_vs_flower_app.py CONFIG.json`` is one Flower run of
benchmarks/vs_flower.py. Everything that decides the numbers is the example's or
Strato's, so the two systems train the same thing:

- model, local training and evaluation: ``examples/mnist/app.py`` (loaded as Strato
  loads it), with its ``[train]`` settings and per-(round, client) seeds
  (``strato.fl.client.client_seed``);
- data and partition: ``strato.data.load_dataset`` and ``strato.data.partition`` with
  the job's scheme and seed, client ``i`` holding partition ``i`` (id ``f"{i:04d}"``);
- the initial model: ``torch.manual_seed(seed)`` then the app's model, as ``strato run``;
- which clients train in round r: ``strato.fl.functions.select_clients`` (the server
  asks every node its partition-id once, before round 1, to map clients to nodes);
- aggregation: Flower's own message-API ``FedAvg`` (weighted by ``num-examples``); the
  global model is evaluated centrally on the test set after every round, as Strato's
  ``evaluate`` function does.

The server records per round when it started configuring the round and when
aggregation ended, the slowest selected client's training time and the array bytes
each way, and writes them to the config's ``out`` file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CONFIG: dict[str, Any] = {}
_cache: dict[str, Any] = {}


def _config() -> dict[str, Any]:
    if not CONFIG:
        CONFIG.update(json.loads(Path(os.environ["STRATO_VS_FLOWER_CONFIG"]).read_text()))
    return CONFIG


def _app() -> Any:
    if "app" not in _cache:
        from strato.fl.app import load_app

        _cache["app"] = load_app(Path(_config()["app_dir"]))
    return _cache["app"]


def _data() -> tuple[Any, list[Any]]:
    """(the dataset, every client's row indices), once per process."""
    if "data" not in _cache:
        from strato.data import load_dataset, partition

        cfg = _config()
        ds = load_dataset(cfg["data_dir"])
        parts = partition(ds.train_y, cfg["clients"], cfg["partition"], seed=cfg["seed"],
                          alpha=cfg["alpha"])
        _cache["data"] = (ds, parts)
    return _cache["data"]  # type: ignore[no-any-return]


def _info(ds: Any) -> Any:
    from strato.fl.app import DataInfo

    return DataInfo(ds.name, tuple(int(d) for d in ds.train_x.shape[1:]), int(ds.num_classes))


def _client_data(pid: int) -> Any:
    from strato.fl.app import Dataset

    ds, parts = _data()
    idx = np.asarray(parts[pid])
    return Dataset(ds.train_x[idx], ds.train_y[idx], _info(ds))


def _array_bytes(record: Any) -> int:
    return sum(len(a.data) for a in record.values())


def build() -> tuple[Any, Any]:
    """(server_app, client_app)."""
    import torch
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from strato.fl.app import Dataset, TrainContext
    from strato.fl.client import client_seed
    from strato.fl.functions import select_clients

    torch.set_num_threads(1)  # one core per client, as Strato's client workers
    client_app = ClientApp()

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"config": ConfigRecord({"partition-id": pid})}), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, app = _config(), _app()
        pid = int(context.node_config["partition-id"])
        cid = f"{pid:04d}"
        data = _client_data(pid)
        net = app.model_fn(data.info)
        received = msg.content["arrays"]
        net.load_state_dict(received.to_torch_state_dict())
        r = int(msg.content["config"]["server-round"])
        ctx = TrainContext(round=r, client=cid, seed=client_seed(cfg["seed"], r, cid),
                           config=dict(cfg["train"]), global_model=None, proximal_mu=0.0)
        started = time.perf_counter()
        app.train_fn(net, data, ctx)
        train_s = time.perf_counter() - started
        arrays = ArrayRecord(net.state_dict())
        metrics = MetricRecord({"num-examples": len(data), "train_s": train_s,
                                "bytes_down": _array_bytes(received),
                                "bytes_up": _array_bytes(arrays)})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    def train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
        ms = [next(iter(r.metric_records.values())) for r in records]
        return MetricRecord({
            "train_s_max": max(float(m["train_s"]) for m in ms),
            "train_s_sum": sum(float(m["train_s"]) for m in ms),
            "bytes_down": sum(int(m["bytes_down"]) for m in ms),
            "bytes_up": sum(int(m["bytes_up"]) for m in ms),
            "replies": len(ms),
        })

    class SameSchedule(FedAvg):
        """Flower's FedAvg with Strato's client schedule and round timestamps."""

        def __init__(self, node_of: dict[str, int], **kw: Any) -> None:
            super().__init__(**kw)
            self.node_of = node_of
            self.rounds: dict[int, dict[str, float]] = {}

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Any:
            self.rounds[server_round] = {"started_at": time.time()}
            cfg = _config()
            pool = sorted(self.node_of)
            chosen = select_clients(cfg["seed"], server_round, pool, cfg["clients_per_round"])
            config["server-round"] = server_round
            record = RecordDict({"arrays": arrays, "config": config})
            return self._construct_messages(record, [self.node_of[c] for c in chosen],
                                            MessageType.TRAIN)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            out = super().aggregate_train(server_round, replies)
            self.rounds[server_round]["aggregated_at"] = time.time()
            return out

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, app = _config(), _app()
        deadline = time.monotonic() + 600
        while len(list(grid.get_node_ids())) < cfg["clients"] and time.monotonic() < deadline:
            time.sleep(0.2)
        nodes = list(grid.get_node_ids())
        asks = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
        node_of = {}
        for reply in grid.send_and_receive(asks):
            pid = int(reply.content["config"]["partition-id"])
            node_of[f"{pid:04d}"] = reply.metadata.src_node_id
        ds, _ = _data()
        test = Dataset(ds.test_x, ds.test_y, _info(ds))
        torch.manual_seed(cfg["seed"])
        initial = app.model_fn(test.info)
        evaluated: dict[int, dict[str, float]] = {}

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            net = app.model_fn(test.info)
            net.load_state_dict(arrays.to_torch_state_dict())
            got = {k: float(v) for k, v in app.evaluate_fn(net, test).items()}
            evaluated[server_round] = got
            return MetricRecord(got)

        strategy = SameSchedule(node_of, fraction_train=0.0001, fraction_evaluate=0.0,
                                min_available_nodes=cfg["clients"],
                                train_metrics_aggr_fn=train_metrics)
        started = time.time()
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial.state_dict()),
                                num_rounds=cfg["rounds"], evaluate_fn=central)
        rounds = []
        for r in range(1, cfg["rounds"] + 1):
            m: Any = result.train_metrics_clientapp.get(r, {})
            t = strategy.rounds.get(r, {})
            rounds.append({
                "round": r, "round_s": t.get("aggregated_at", float("nan")) - t["started_at"],
                "train_s_max": float(m.get("train_s_max", float("nan"))),
                "train_s_sum": float(m.get("train_s_sum", float("nan"))),
                "bytes_down": int(m.get("bytes_down", 0)), "bytes_up": int(m.get("bytes_up", 0)),
                "replies": int(m.get("replies", 0)),
                "accuracy": evaluated.get(r, {}).get("accuracy"),
            })
        Path(cfg["out"]).write_text(json.dumps({
            "rounds": rounds, "strategy_wall_s": time.time() - started,
            "initial_accuracy": evaluated.get(0, {}).get("accuracy"),
        }))

    return server_app, client_app


def main() -> int:
    from flwr.simulation import run_simulation

    os.environ["STRATO_VS_FLOWER_CONFIG"] = str(Path(sys.argv[1]).resolve())
    # Build the apps from this file imported as a module, not as __main__: Ray then
    # pickles their functions by reference, and each actor imports the module afresh
    # (with its own empty caches) from PYTHONPATH, which must hold this directory.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _vs_flower_app as module

    cfg = module._config()
    server_app, client_app = module.build()
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=cfg["clients"],
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": cfg["concurrency"], "num_gpus": 0,
                                      "include_dashboard": False}},
    )
    return 0 if Path(cfg["out"]).is_file() else 1


if __name__ == "__main__":
    sys.exit(main())
