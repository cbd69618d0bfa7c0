"""Federated learning on the aws backend, end to end against the local AWS (moto + front).

The run's rounds are a Step Functions execution of the FL state machine; start_round,
the simulated clients, the aggregator and evaluate run as Lambda functions (locally,
in the front's workers); the aggregator is woken by the updates stream's event source
mapping. Checked: the execution SUCCEEDED, a global model per round is in S3, the
final model equals the embedded backend's for the same seed and data, a stream record
delivered twice does not change it, the run's billable requests are counted, remote
clients register and a client that stops answering does not fail the rounds.

Data: scikit-learn's digits, always (3 clients of ~480 images): these tests are about
the backend, not accuracy, and MNIST's 3,000-image clients made them several times slower.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fltools import MNIST_APP
from strato.fl import state

pytestmark = pytest.mark.slow

ROUNDS = 3


def job_toml(clients: int, quorum: float = 1.0) -> str:
    return f"""
[job]
rounds = {ROUNDS}
clients = {clients}
clients_per_round = 3
seed = 3
client_concurrency = 1

[round]
quorum = {quorum}
round_deadline_s = 300  # generous: a loaded machine cold-starts slowly; rounds close on quorum

[train]
epochs = 1
batch_size = 16
lr = 0.05
"""


@pytest.fixture(autouse=True, scope="module")
def _digits() -> Iterator[None]:
    """Runs here (and their Lambda workers, which load what the job recorded) use the
    digits, whatever $STRATO_DATA_DIR says."""
    saved = os.environ.pop("STRATO_DATA_DIR", None)
    yield
    if saved is not None:
        os.environ["STRATO_DATA_DIR"] = saved


def make_app(root: Path, quorum: float = 1.0) -> Path:
    app = root / "app"
    app.mkdir(parents=True)
    (app / "app.py").write_text((MNIST_APP / "app.py").read_text())
    (app / "strato.toml").write_text(job_toml(3, quorum))  # the digits: 3 of ~480 images
    return app


def run(app: Path, out: Path, services: dict[str, Any] | None, **options: Any) -> dict[str, Any]:
    from strato.fl.config import load_job_config
    from strato.fl.run import RunOptions, run_job

    cfg = load_job_config(app / "strato.toml")
    return run_job(
        RunOptions(app_dir=app, out=out, config=cfg, services=services, quiet=True, **options)
    )


class Duplicator(threading.Thread):
    """Delivers every INSERT of the updates stream to the aggregator once more, as the
    event source mapping's at-least-once delivery may. It reads the stream from moto
    directly, so the run's usage counters see only its extra invocations."""

    def __init__(self, local: Any, prefix: str) -> None:
        super().__init__(daemon=True)
        from strato.backends.aws._boto import clients_for

        self.moto = clients_for({**local.config("/tmp", prefix), "endpoint_url": local.moto_url})
        self.front = clients_for(local.config("/tmp", prefix))
        self.prefix = prefix
        self.stop = threading.Event()
        self.delivered = 0
        self.results: list[dict[str, int]] = []
        self.errors: list[str] = []

    def _stream(self) -> str | None:
        try:
            table = self.moto.client("dynamodb").describe_table(TableName=f"{self.prefix}updates")
        except Exception:
            return None
        return str(table["Table"].get("LatestStreamArn") or "") or None

    def run(self) -> None:
        from strato.backends.aws._stream import StreamReader
        from strato.backends.aws.emulator._local_esm import _lambda_record

        try:
            while (arn := self._stream()) is None and not self.stop.wait(0.2):
                pass
            reader: StreamReader[tuple[Any, str]] = StreamReader(
                self.moto.client("dynamodbstreams")
            )
            lam = self.front.client("lambda", max_attempts=1)
            cursor = None
            while arn and not self.stop.is_set():
                batch = reader.read(arn, "updates", cursor, 100, lambda r, c: (r, c))
                records = [_lambda_record(r, arn) for r, _ in batch if r["eventName"] == "INSERT"]
                records = [r for r in records if "value" in r["dynamodb"].get("NewImage", {})]
                if records:
                    self.results.append(self._invoke(lam, records))
                    self.delivered += len(records)
                if batch:
                    cursor = batch[-1][1]
                else:
                    self.stop.wait(0.25)
        except Exception as exc:  # reported by the test
            self.errors.append(repr(exc))

    def _invoke(self, lam: Any, records: list[dict[str, Any]]) -> dict[str, int]:
        payload = json.dumps({"Records": records}).encode()
        while True:
            try:
                reply = lam.invoke(FunctionName=f"{self.prefix}aggregate", Payload=payload)
            except lam.exceptions.TooManyRequestsException:
                time.sleep(0.05)  # the aggregator runs one batch at a time
                continue
            body = json.loads(reply["Payload"].read())
            if reply.get("FunctionError"):
                raise AssertionError(f"aggregate failed on a duplicate: {body}")
            return dict(body)


@pytest.fixture(scope="module")
def fl_runs(local_aws: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One run on AWS (with a duplicator) and the same run on the embedded backend."""
    root = tmp_path_factory.mktemp("fl")
    app = make_app(root)
    # The embedded run goes on alongside, with its own copy of the app (two runs of one
    # process must not load one app module at the same time).
    twin = make_app(root / "twin")
    embedded: dict[str, Any] = {}

    def run_embedded() -> None:
        try:
            embedded["summary"] = run(twin, root / "embedded", None)
        except BaseException as exc:
            embedded["error"] = exc

    reference = threading.Thread(target=run_embedded, daemon=True)
    reference.start()
    # Its initial model first: both runs seed torch's one global generator to make theirs.
    deadline = time.monotonic() + 300
    while not (root / "embedded" / "run.json").exists() and reference.is_alive():
        assert time.monotonic() < deadline, "the embedded run did not start"
        time.sleep(0.1)
    prefix = f"fl{uuid.uuid4().hex[:8]}-"
    config = local_aws.config(root / "aws" / "services", prefix)
    duplicator = Duplicator(local_aws, prefix)
    duplicator.start()
    try:
        aws_summary = run(app, root / "aws", config)
    finally:
        time.sleep(0.5)  # let the duplicator catch the last round's records
        duplicator.stop.set()
        duplicator.join(30)
        reference.join(600)
    if "error" in embedded:
        raise embedded["error"]
    embedded_summary = embedded["summary"]
    yield {
        "root": root, "config": config, "prefix": prefix, "aws": aws_summary,
        "embedded": embedded_summary, "duplicator": duplicator,
    }  # fmt: skip
    teardown(local_aws, prefix, root)


def teardown(local_aws: Any, prefix: str, root: Path) -> None:
    from strato.backends.aws.deploy import DeployOptions, destroy
    from strato.fl.config import JobConfig
    from strato.fl.run import app_resources

    opts = DeployOptions(prefix=prefix, endpoint_url=local_aws.endpoint_url, root=root)
    destroy(opts, app_resources(JobConfig()))


def final_model(fl_runs: dict[str, Any], backend: str) -> Any:
    from strato.codec import decode
    from strato.services import connect, embedded

    key = state.model_key(ROUNDS)
    if backend == "aws":
        with connect(fl_runs["config"]) as svc:
            return np.array(decode(bytes(svc.blobs.get(key))).flat())
    with embedded(fl_runs["root"] / "embedded" / "services") as svc:
        return np.array(decode(bytes(svc.blobs.get(key))).flat())


def test_the_execution_succeeds_with_a_global_model_per_round_in_s3(
    fl_runs: dict[str, Any],
) -> None:
    from strato.backends.aws._boto import clients_for
    from strato.services import connect

    with connect(fl_runs["config"]) as svc:
        execution = svc.workflow.describe("run")
        models = svc.blobs.list("models/")
    assert execution.status == "SUCCEEDED"
    assert models == [state.model_key(r) for r in range(ROUNDS + 1)]  # initial + one per round
    clients = clients_for(fl_runs["config"])
    bucket = clients.client("s3").list_objects_v2(
        Bucket=f"{fl_runs['prefix']}blobs", Prefix="models/"
    )
    assert len(bucket["Contents"]) == ROUNDS + 1  # the blobs are S3 objects
    summary = fl_runs["aws"]
    assert summary["rounds"] == ROUNDS and summary["final_accuracy"] > 0.3
    assert [r["closed_by"] for r in summary["per_round"]] == ["quorum"] * ROUNDS


def test_the_final_model_equals_the_embedded_backends(fl_runs: dict[str, Any]) -> None:
    on_aws, embedded = final_model(fl_runs, "aws"), final_model(fl_runs, "embedded")
    assert on_aws.shape == embedded.shape and on_aws.size > 1000
    assert float(np.max(np.abs(on_aws - embedded))) <= 1e-4
    per_round = zip(fl_runs["aws"]["per_round"], fl_runs["embedded"]["per_round"], strict=True)
    for a, e in per_round:
        assert a["accuracy"] == pytest.approx(e["accuracy"], abs=1e-3)


def test_stream_records_delivered_twice_did_not_change_the_model(fl_runs: dict[str, Any]) -> None:
    duplicator = fl_runs["duplicator"]
    assert duplicator.errors == []
    assert duplicator.delivered == 3 * ROUNDS  # every update came a second time...
    accepted = sum(r["accepted"] for r in duplicator.results)
    ignored = sum(r["ignored"] for r in duplicator.results)
    assert accepted + ignored == duplicator.delivered
    assert sum(r["rejected"] for r in duplicator.results) == 0
    summary = fl_runs["aws"]
    # ...yet each counted once: nothing rejected as a duplicate, and the model is the
    # embedded backend's (previous test).
    assert summary["updates_accepted"] == 3 * ROUNDS and summary["updates_rejected"] == 0


def test_the_runs_billable_requests_are_counted(fl_runs: dict[str, Any]) -> None:
    usage = json.loads((fl_runs["root"] / "aws" / "aws-usage.json").read_text())
    q = usage["quantities"]
    assert usage["rounds"] == ROUNDS
    assert q["sfn_transitions"] == 4 * ROUNDS  # Round, Evaluate, More, Next (or Done)
    assert q["sns_requests"] >= 3 * ROUNDS  # one notice per selected client
    assert q["sqs_requests"] >= 2 * 3 * ROUNDS  # each notice received and deleted
    assert q["s3_put_requests"] >= 3 * ROUNDS + ROUNDS  # updates and global models
    assert q["s3_get_requests"] >= 3 * ROUNDS  # each client fetched its round's model
    assert q["dynamodb_write_units"] >= 3 * ROUNDS
    assert q["lambda_requests"] >= (3 + 2) * ROUNDS and q["lambda_gb_s"] > 0
    assert usage["usd"]["total"] == pytest.approx(sum(
        v for k, v in usage["usd"].items() if k != "total"))  # fmt: skip
    assert 0 < usage["usd_per_round"] < 0.05
    # The summary counts what Lambda ran (not only what the watching process invoked).
    summary = fl_runs["aws"]
    assert summary["invocations"] >= (3 + 2) * ROUNDS and summary["gb_seconds"] > 0
    assert summary["cold_starts"] >= 4  # start_round, client, aggregate, evaluate


def test_remote_clients_register_and_one_that_stops_answering_does_not_fail_rounds(
    local_aws: Any, tmp_path: Path
) -> None:
    from strato.fl.direct import DirectClientOptions, run_direct_client, wait_for_clients
    from strato.services import connect

    app = make_app(tmp_path, quorum=0.6)  # 2 of the 3 selected close a round
    prefix = f"rc{uuid.uuid4().hex[:8]}-"
    config = local_aws.config(tmp_path / "out" / "services", prefix)
    stop = threading.Event()
    outcomes: dict[str, Any] = {}

    def join(name: str, rounds_max: int | None) -> None:
        opts = DirectClientOptions(
            str(app), config, client_id=name, rounds_max=rounds_max, wait_s=2.0, quiet=True
        )
        try:
            outcomes[name] = run_direct_client(opts, stop)
        except Exception as exc:
            outcomes[name] = exc

    def join_by_cli() -> None:  # `strato client --backend aws`, in this process
        from strato.cli import main

        argv = ["client", str(app), "--backend", "aws", "--endpoint-url",
                local_aws.endpoint_url, "--prefix", prefix, "--client-id", "gamma",
                "--wait-s", "2", "--root", str(tmp_path / "c")]  # fmt: skip
        with contextlib.redirect_stdout(cli_out):
            outcomes["gamma"] = main(argv)

    cli_out = io.StringIO()
    # "dropout" trains one round and then stops answering, without a word.
    threads = [
        threading.Thread(target=join, args=args, daemon=True)
        for args in (("alpha", None), ("dropout", 1))
    ] + [threading.Thread(target=join_by_cli, daemon=True)]
    torch = pytest.importorskip("torch")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # three trainers share this process (Lambda's get one each)
    for t in threads:
        t.start()
    try:
        summary = run(
            app, tmp_path / "out", config, simulate=False,
            attach=wait_for_clients(3, timeout_s=120, quiet=True),
        )  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        torch.set_num_threads(threads_before)
    try:
        assert outcomes["gamma"] == 0
        assert "client gamma: registered" in cli_out.getvalue()
        assert "client gamma: done after training 3 round(s)" in cli_out.getvalue()
        assert not isinstance(outcomes["alpha"], Exception), outcomes["alpha"]
        assert outcomes["alpha"]["rounds"] == [1, 2, 3]
        (last,) = outcomes["dropout"]["rounds"]
        rows = summary["per_round"]
        assert [r["selected"] for r in rows] == [3, 3, 3]  # the dropout stays selected...
        assert [r["closed_by"] for r in rows] == ["quorum"] * ROUNDS  # ...and not waited for
        # Each round closed on its quorum; once the dropout is gone, with the other two.
        assert all(r["accepted"] >= 2 for r in rows)
        assert [r["accepted"] for r in rows[last:]] == [2] * (ROUNDS - last)
        with connect(config) as svc:
            assert svc.workflow.describe("run").status == "SUCCEEDED"
            registered = {i.key: i.value for i in svc.table.query(state.CLIENTS)}
            assert set(registered) == {"alpha", "dropout", "gamma"}
            assert sorted(v["partition_index"] for v in registered.values()) == [0, 1, 2]
            # It stopped answering: its queue still holds the later rounds' notices.
            left = svc.bus.receive(state.client_queue("dropout"), 10, wait_s=1)
            assert sorted(json.loads(m.body)["round"] for m in left) == list(
                range(last + 1, ROUNDS + 1)
            )
    finally:
        teardown(local_aws, prefix, tmp_path)
