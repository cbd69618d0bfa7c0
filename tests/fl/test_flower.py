"""Flower apps run on Strato unchanged (``strato run DIR`` of a Flower app directory).

A numpy-only Flower app, written here, runs end to end in a few seconds: its ServerApp
drives FedAvg against ``StratoGrid``, its ClientApp runs in the ``flower_client``
function with a per-node ``Context.state`` kept in the Table. The MNIST app in
``tests/fl/flower_app`` (in the style of Flower's PyTorch quickstart) is the
acceptance run. Bad directories and options are refused in one line with exit 2.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="Flower apps need flwr: pip install 'strato[flower]'")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.common.serde import recorddict_from_proto  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from strato.cli import main  # noqa: E402
from strato.codec import decode, read_header  # noqa: E402
from strato.fl.flower import flower_app, parse_run_config  # noqa: E402
from strato.fl.flower_engine import EagerTrain  # noqa: E402
from strato.fl.flower_wire import STATE_TABLE, decode_message, encode_message  # noqa: E402
from strato.services import embedded  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "tests" / "fl" / "flower_app"

PYPROJECT = """\
[project]
name = "{name}"
version = "1.0.0"

[tool.flwr.app]
publisher = "strato-tests"

[tool.flwr.app.components]
serverapp = "{name}.server:app"
clientapp = "{name}.client:app"

[tool.flwr.app.config]
num-server-rounds = 3
fail-node = -1
slow-node = -1
timeout = 3600.0
strategy = "fedavg"

[tool.flwr.federations]
default = "local"

[tool.flwr.federations.local]
options.num-supernodes = 3
"""

CLIENT = '''\
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    part = int(context.node_config["partition-id"])
    if part == int(context.run_config["fail-node"]):
        raise RuntimeError("this node's data is gone")
    if part == int(context.run_config["slow-node"]) and "slept" not in context.state:
        context.state["slept"] = MetricRecord({"s": 30})
        time.sleep(30.0)  # its first train message: late for the whole run
    seen = context.state.get("seen", MetricRecord({"rounds": 0}))
    rounds = int(seen["rounds"]) + 1
    context.state["seen"] = MetricRecord({"rounds": rounds})
    w = msg.content["arrays"]["w"].numpy()
    new = ArrayRecord({"w": Array(w + (part + 1)), "b": Array(np.full(2, rounds, np.float32))})
    metrics = MetricRecord({"num-examples": part + 1, "rounds-trained": rounds})
    return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    part = int(context.node_config["partition-id"])
    metrics = MetricRecord({"accuracy": 0.5 + 0.1 * part, "num-examples": 10})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
'''

SERVER = '''\
import json

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    kinds = {"fedavg": FedAvg, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg,
             "krum": Krum}
    kind = kinds[str(context.run_config["strategy"])]
    strategy = kind(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    start = ArrayRecord({"w": Array(np.zeros(4, np.float32)),
                         "b": Array(np.zeros(2, np.float32))})
    result = strategy.start(grid=grid, initial_arrays=start,
                            num_rounds=int(context.run_config["num-server-rounds"]),
                            timeout=float(context.run_config["timeout"]))
    final = result.arrays["w"].numpy().tolist()
    with open("final.json", "w") as f:
        json.dump({"w": final}, f)
'''


def _numpy_app(tmp_path: Path, name: str = "npflower") -> Path:
    app = tmp_path / "app"
    (app / name).mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT.format(name=name))
    (app / name / "__init__.py").write_text("")
    (app / name / "client.py").write_text(CLIENT)
    (app / name / "server.py").write_text(SERVER)
    return app


def _strato(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "strato", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=env, stdin=subprocess.DEVNULL)


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _rows(out: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl, a dict per round."""
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _node_rounds(out: Path) -> list[int]:
    svc = embedded(out / "services")
    try:
        states = [recorddict_from_proto(ProtoRecordDict.FromString(
            base64.b64decode(item.value["state"]))) for item in svc.table.query(STATE_TABLE)]
    finally:
        svc.close()
    return sorted(int(s["seen"]["rounds"]) for s in states)


def test_a_flower_app_runs_with_its_state_kept_per_node(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _strato("run", str(_numpy_app(tmp_path)), "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("round")]
    assert len(lines) == 3 and lines[0].startswith("round   1/3  acc 0.6000"), done.stdout
    # FedAvg weighted by num-examples 1, 2, 3: each round adds (1·1 + 2·2 + 3·3) / 6.
    assert _json(out / "final.json")["w"] == pytest.approx([14 / 6 * 3] * 4)
    assert _node_rounds(out) == [3, 3, 3]  # Context.state survived between rounds
    summary = _json(out / "summary.json")
    assert summary["rounds"] == 3 and summary["final_accuracy"] == pytest.approx(0.6)
    assert summary["failed_replies"] == 0 and summary["invocations"] == 18
    assert summary["train_batches_averaged_by_engine"] == 3  # eagerly, by Strato's engine
    assert summary["train_batches_averaged_by_flower"] == 0
    rows = _rows(out)
    assert [r["train_replies"] for r in rows] == [3, 3, 3]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    assert not list((out / "services").rglob("flower/messages/*"))  # nothing left behind


def test_a_node_whose_clientapp_raises_answers_with_an_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _strato("run", str(_numpy_app(tmp_path, "npfail")), "--out", str(out),
                   "--run-config", "fail-node=2 num-server-rounds=2")
    assert done.returncode == 0, done.stderr
    # Nodes 0 and 1 train (weights 1 and 2); node 2's error is left out by FedAvg.
    assert _json(out / "final.json")["w"] == pytest.approx([10 / 3] * 4)
    rows = _rows(out)
    assert [(r["train_replies"], r["failed"]) for r in rows] == [(2, 1), (2, 1)]
    # the user is told why, once: the ClientApp's own words
    told = [ln for ln in done.stdout.splitlines() if "failed:" in ln]
    assert told == ["round 1: partition 2 (train) failed: RuntimeError: this node's data is "
                    "gone"], done.stdout


def test_a_node_that_misses_the_serverapps_timeout_is_left_out(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _strato("run", str(_numpy_app(tmp_path, "npslow")), "--out", str(out),
                   "--run-config", "slow-node=2 timeout=3.0 num-server-rounds=2")
    assert done.returncode == 0, done.stderr
    # Nodes 0 and 1 answer in time (weights 1, 2). Node 2 is still on its first message:
    # its next ones wait behind it, as on a SuperNode, and are left out at the timeout.
    assert _json(out / "final.json")["w"] == pytest.approx([10 / 3] * 4)
    rows = _rows(out)
    assert [(r["train_replies"], r["evaluate_replies"], r["failed"]) for r in rows] == [
        (2, 2, 2), (2, 2, 2)]
    told = [ln for ln in done.stdout.splitlines() if "failed:" in ln]
    assert told == ["round 1: partition 2 (train) failed: no reply before the ServerApp's "
                    "timeout"], done.stdout
    summary = _json(out / "summary.json")
    assert summary["train_batches_averaged_by_engine"] == 2


@pytest.mark.parametrize(("strategy", "finals", "by_engine"), [
    ("fedmedian", {6.0}, 3),  # the median of w+1, w+2, w+3: on the engine's shards
    # One node's update a round (here every score ties: the pick goes by arrival order).
    ("krum", {3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0}, 3),
])
def test_robust_strategies_on_the_engine_or_flowers_own_code(
        tmp_path: Path, strategy: str, finals: set[float], by_engine: int) -> None:
    out = tmp_path / "run"
    done = _strato("run", str(_numpy_app(tmp_path, "np" + strategy)), "--out", str(out),
                   "--run-config", f"strategy='{strategy}'")
    assert done.returncode == 0, done.stderr
    w = _json(out / "final.json")["w"]
    assert len(set(w)) == 1 and w[0] in finals, w
    summary = _json(out / "summary.json")
    assert summary["train_batches_averaged_by_engine"] == by_engine
    assert summary["train_batches_averaged_by_flower"] == 3 - by_engine


def test_the_engines_shards_give_flowers_median_trimmed_mean_and_krum(tmp_path: Path) -> None:
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
    from flwr.serverapp.strategy.multikrum import select_multikrum
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    def krum(contents: list[RecordDict], m: int) -> tuple[ArrayRecord, list[int]]:
        picked = select_multikrum(contents, num_malicious_nodes=1, num_nodes_to_select=m)
        ids = [id(c) for c in picked]
        return aggregate_arrayrecords(picked, "num-examples"), sorted(
            i for i, c in enumerate(contents) if id(c) in ids)

    svc = embedded(tmp_path / "services")
    engine = EagerTrain(svc.runtime)
    rng = np.random.default_rng(3)
    replies = [{"w": rng.normal(size=(5, 7)).astype(np.float32),
                "b": rng.normal(size=7).astype(np.float32)} for _ in range(6)]
    replies[4] = {k: v * 50 for k, v in replies[4].items()}  # an attacker, for Krum
    try:
        for rule, options in (("fedmedian", {}), ("trimmedmean", {"beta": 0.2}),
                              ("krum", {"f": 1, "m": 1}), ("krum", {"f": 1, "m": 3})):
            engine.expect(rule, options)
            contents = _added(engine, replies)
            stack = {n: np.stack([r[n] for r in replies]) for n in ("w", "b")}
            if rule == "krum":
                want, chosen = krum(contents, options["m"])
            else:
                chosen = list(range(len(replies)))
                reduce = (lambda x: np.median(x, axis=0)) if rule == "fedmedian" else (
                    lambda x: trim_mean(x, 0.2))
                want = ArrayRecord({n: Array(reduce(stack[n])) for n in stack})
            ours, ours_chosen = engine.robust(contents)
            assert [contents.index(c) for c in ours_chosen] == chosen, rule
            assert 4 not in chosen or rule != "krum"
            for name in ("w", "b"):
                diff = np.abs(ours[name].numpy() - want[name].numpy()).max()
                assert diff <= 1e-6, (rule, options, name)
        assert engine.engine_rounds == 4
    finally:
        engine.close()
        svc.close()


@pytest.mark.slow
def test_the_quickstart_style_app_learns_mnist(tmp_path: Path) -> None:
    data = os.environ.get("STRATO_DATA_DIR")
    if not data or not (Path(data) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs MNIST: STRATO_DATA_DIR (CI sets it)")
    out = tmp_path / "run"
    done = _strato("run", str(QUICKSTART), "--data-dir", data, "--out", str(out),
                   "--run-config", "examples-per-node=2000")
    assert done.returncode == 0, done.stderr
    summary = _json(out / "summary.json")
    assert summary["rounds"] == 3 and summary["final_accuracy"] >= 0.85, summary
    assert summary["train_batches_averaged_by_engine"] == 3
    assert _node_rounds(out) == [3, 3, 3, 3]
    assert (out / "final_model.pt").stat().st_size > 0  # the ServerApp's file, in the run


def test_a_message_travels_in_stratos_frame_with_no_npy_inside() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                          "n": Array(np.array([3], np.int64)),
                          "c": Array(np.array([1 + 2j], np.complex64))})
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1}),
                              "metrics": MetricRecord({"k": 2})}), 42, "train")
    msg.metadata.__dict__["_message_id"] = "m1"
    frame = encode_message(msg)
    shell = base64.b64decode(read_header(frame)[1]["flower"])  # Flower's protobuf, inside
    assert shell.count(b"NUMPY") == 1  # only the complex array, which the codec cannot name
    assert sorted(decode(frame)) == ["0.0", "0.1"]  # w and n: tensors of the frame
    back = decode_message(frame)
    assert back.metadata.message_id == "m1" and back.metadata.dst_node_id == 42
    for name in ("w", "n", "c"):
        assert np.array_equal(back.content["arrays"][name].numpy(), arrays[name].numpy())
    assert back.content["config"]["lr"] == 0.1 and back.content["metrics"]["k"] == 2


def test_the_engine_averages_the_apps_replies_as_flowers_fedavg_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    monkeypatch.syspath_prepend(str(QUICKSTART))
    from mnistflower.task import Net

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    engine = EagerTrain()
    try:
        engine.begin(1, 5)
        contents = []
        for k in range(5):  # five nodes' replies: the app's model, each its own weights
            torch.manual_seed(k)
            content = RecordDict({"arrays": ArrayRecord(Net().state_dict()),
                                  "metrics": MetricRecord({"num-examples": 100 + 37 * k})})
            frame = encode_message(Message(content, 1 + k, "train"))
            reply = decode_message(frame)
            engine.add(str(k), frame, reply)
            contents.append(reply.content)
        ours = engine.average(contents, "num-examples")
        theirs = aggregate_arrayrecords(contents, "num-examples")
        assert list(ours) == list(theirs)
        for name in theirs:
            assert ours[name].numpy().dtype == theirs[name].numpy().dtype
            assert np.abs(ours[name].numpy() - theirs[name].numpy()).max() <= 1e-6, name
        assert engine.engine_rounds == 1
        # Replies the strategy picked out of those added (Krum does): Flower's own answers.
        engine.begin(2, 2)
        added = []
        for k in range(2):
            frame = encode_message(Message(contents[k], 1 + k, "train"))
            added.append(decode_message(frame))
            engine.add(str(k), frame, added[-1])
        assert engine.average([added[0].content], "num-examples") is None
        assert engine.flower_rounds == 1
    finally:
        engine.close()


def _added(engine: EagerTrain, replies: list[dict[str, np.ndarray]]) -> list[RecordDict]:
    """Replies with these arrays (weights 1, 2, ...) added to a new batch of ``engine``."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    engine.begin(1, len(replies))
    contents = []
    for k, arrays in enumerate(replies):
        content = RecordDict({"arrays": ArrayRecord({n: Array(a) for n, a in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": k + 1})})
        frame = encode_message(Message(content, 1 + k, "train"))
        reply = decode_message(frame)
        engine.add(str(k), frame, reply)
        contents.append(reply.content)
    return contents


def test_replies_a_strategy_changed_or_named_otherwise_get_flowers_average() -> None:
    ones, twos = np.ones(3, np.float32), np.full(3, 2.0, np.float32)
    engine = EagerTrain()
    try:
        # Server-side DP clipping replaces each reply's ArrayRecord before averaging.
        contents = _added(engine, [{"w": ones}, {"w": twos}])
        contents[1]["arrays"] = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
        assert engine.average(contents, "num-examples") is None
        # Flower averages by name: the same shapes under other names are not the same.
        contents = _added(engine, [{"a": ones, "b": twos}, {"b": ones, "a": twos}])
        assert engine.average(contents, "num-examples") is None
        # A NaN: Flower's average carries it; the engine does not answer.
        contents = _added(engine, [{"w": ones}, {"w": np.full(3, np.nan, np.float32)}])
        assert engine.average(contents, "num-examples") is None
        assert (engine.engine_rounds, engine.flower_rounds) == (0, 3)
    finally:
        engine.close()


def test_round_one_of_the_quickstart_app_averages_as_flowers_fedavg(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's own round 1: its ClientApp trains on four MNIST partitions; the engine's
    average of those replies is Flower's FedAvg of them."""
    data = os.environ.get("STRATO_DATA_DIR")
    if not data or not (Path(data) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs MNIST: STRATO_DATA_DIR (CI sets it)")
    torch = pytest.importorskip("torch")
    from flwr.app import Context
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    monkeypatch.syspath_prepend(str(QUICKSTART))
    from mnistflower.client_app import app as client_app
    from mnistflower.task import Net

    flower = flower_app(QUICKSTART)
    assert flower is not None
    config = parse_run_config("examples-per-node=500", flower.config)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    torch.manual_seed(0)
    start = RecordDict({"arrays": ArrayRecord(Net().state_dict()),
                        "config": ConfigRecord({"lr": 0.05})})
    engine = EagerTrain()
    try:
        engine.begin(1, 4)
        contents = []
        for part in range(4):
            msg = decode_message(encode_message(Message(start, 10 + part, "train")))
            msg.metadata.__dict__["_message_id"] = f"m{part}"
            context = Context(run_id=7, node_id=10 + part, state=RecordDict(), run_config=config,
                              node_config={"partition-id": part, "num-partitions": 4,
                                           "data-dir": data})
            frame = encode_message(client_app(msg, context))
            reply = decode_message(frame)
            engine.add(str(part), frame, reply)
            contents.append(reply.content)
        ours = engine.average(contents, "num-examples")
        theirs = aggregate_arrayrecords(contents, "num-examples")
        assert list(ours) == list(theirs)
        for name in theirs:
            assert np.abs(ours[name].numpy() - theirs[name].numpy()).max() <= 1e-6, name
    finally:
        engine.close()


def test_run_config_overrides_as_flwr_run_takes_them() -> None:
    base = {"num-server-rounds": 3, "lr": 0.1, "name": "a", "flag": True}
    got = parse_run_config("num-server-rounds=5 lr=0.05 name='b c' flag=false", base)
    assert got == {"num-server-rounds": 5, "lr": 0.05, "name": "b c", "flag": False}
    for bad, why in (("rounds=5", "has no 'rounds'"), ("lr", "not key=value"),
                     ("flag=1", "must be like True")):
        with pytest.raises(Exception, match=why):
            parse_run_config(bad, base)


def test_the_quickstart_app_is_found_with_its_config() -> None:
    app = flower_app(QUICKSTART)
    assert app is not None and app.nodes == 4
    assert app.serverapp == "mnistflower.server_app:app"
    assert app.config["num-server-rounds"] == 3


@pytest.mark.parametrize("case", ["neither", "bad-toml", "no-import", "bad-key", "strato-flag",
                                  "serve"])
def test_a_bad_app_or_option_is_one_line_and_exit_2(
        tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    app = _numpy_app(tmp_path, "npbad" + case.replace("-", ""))
    extra: list[str] = []
    expect = {"neither": "neither a Strato app", "bad-toml": "does not parse",
              "no-import": "does not import", "bad-key": "has no 'epochs'",
              "strato-flag": "--strategy: not for a Flower app",
              "serve": "is a Flower app: `strato run` runs it"}[case]
    if case == "neither":
        (app / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    elif case == "bad-toml":
        (app / "pyproject.toml").write_text("[tool.flwr.app\n")
    elif case == "no-import":
        server = next(app.glob("*/server.py"))
        server.write_text("import no_such_module_here\n" + server.read_text())
    elif case == "bad-key":
        extra = ["--run-config", "epochs=2"]
    elif case == "strato-flag":
        extra = ["--strategy", "fedadam"]
    command = "serve" if case == "serve" else "run"
    code = main([command, str(app), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "out").exists()  # a refused command leaves nothing behind
