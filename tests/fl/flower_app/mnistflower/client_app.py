"""The ClientApp: train and evaluate on this node's partition; ``state`` counts rounds."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mnistflower.task import Net, load_data, test
from mnistflower.task import train as train_fn

app = ClientApp()


def _data(context: Context, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    limit = int(context.run_config["examples-per-node"]) if split == "train" else 0
    return load_data(int(context.node_config["partition-id"]),
                     int(context.node_config["num-partitions"]),
                     context.node_config.get("data-dir"), split, limit)  # type: ignore[arg-type]


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(context, "train")
    seen = context.state.get("seen", MetricRecord({"rounds": 0}))
    rounds = int(seen["rounds"]) + 1
    context.state["seen"] = MetricRecord({"rounds": rounds})  # kept between rounds
    loss = train_fn(model, x, y, int(context.run_config["local-epochs"]),
                    float(msg.content["config"]["lr"]), int(context.run_config["batch-size"]),
                    seed=rounds * 1000 + int(context.node_config["partition-id"]))
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y), "rounds-trained": rounds})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(context, "test")
    loss, acc = test(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
