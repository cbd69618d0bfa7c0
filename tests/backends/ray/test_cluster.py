"""Strato on a 3-node Ray cluster on this machine (``strato.backends.ray.local``).

The same app as the embedded backend's, unchanged, with its functions spread over the
nodes; a worker node taken away mid-round loses no accepted update; and nothing of
Ray is left running afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the ray backend needs ray: pip install 'strato[ray]'")

from strato.backends.ray.local import LocalCluster  # noqa: E402
from strato.fl import state  # noqa: E402
from strato.fl.config import load_job_config  # noqa: E402
from strato.fl.run import RunOptions, run_job  # noqa: E402
from strato.services import connect  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "mnist"
pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    """The process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    if ray.is_initialized():  # another module's local Ray: this module has its own cluster
        ray.shutdown()
    shm_before = set(os.listdir("/dev/shm"))
    node_dirs = Path(tempfile.gettempdir()) / "strato-ray"
    dirs_before = set(node_dirs.glob("*/*"))
    with LocalCluster(nodes=3, cpus=1) as c:
        ours = c.processes()  # this cluster's GCS, raylets and the rest, by pid
        assert {"gcs_server", "raylet"} <= set(ours.values()), ours
        yield c
        ours |= c.processes()  # with the nodes added meanwhile
        workers = c.worker_pids()
        assert workers, "no worker of this cluster found in its logs"

    deadline = time.monotonic() + 10.0  # a killed node's processes take a moment to exit
    while (left := [f"{pid} ({kind})" for pid, kind in ours.items() if _alive(pid)]) and (
            time.monotonic() < deadline):
        time.sleep(0.1)
    assert not left, f"processes outlived the cluster: {left}"
    # the segments of this cluster's workers (another pytest worker's test may SIGKILL a
    # process of its own and leave its segments for a moment: not this cluster's)
    left = {n for n in set(os.listdir("/dev/shm")) - shm_before
            if _owner(n) in workers and not _alive(_owner(n))}
    assert not left, f"segments outlived the cluster: {sorted(left)}"
    # this cluster's nodes' directories (another pytest worker's runs have theirs)
    ids = {node[:16] for node in c.node_ids}
    left_dirs = {d for d in node_dirs.glob("*/*") if d.name in ids} - dirs_before
    assert not left_dirs, f"node directories outlived their runs: {sorted(left_dirs)}"


def _owner(name: str) -> int:
    """The pid that made a Strato segment (-1 for another file)."""
    parts = name.split("-")
    ours = name.startswith("strato-") and len(parts) > 1 and parts[1].isdigit()
    return int(parts[1]) if ours else -1


def _options(out: Path, address: str, **overrides: Any) -> RunOptions:
    config = load_job_config(EXAMPLE / "strato.toml").override(**overrides)
    services = None if address == "embedded" else {"backend": "ray", "address": address}
    return RunOptions(app_dir=EXAMPLE, out=out, config=config, quiet=True, services=services)


def test_the_example_runs_unchanged_on_three_nodes(cluster: LocalCluster, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATO_DATA_DIR", raising=False)  # the digits: quick, same on both
    on_ray = run_job(_options(tmp_path / "ray", cluster.address, rounds=2))
    embedded = run_job(_options(tmp_path / "embedded", "embedded", rounds=2))
    assert on_ray["rounds"] == 2 and on_ray["updates_accepted"] == 20
    assert on_ray["final_accuracy"] == pytest.approx(embedded["final_accuracy"], abs=0.005)
    placement = on_ray["placement"]
    ran = placement["invocations_by_node"]
    assert sum(fns.get("client", 0) for fns in ran.values()) == 20
    assert sum(fns.get("aggregate", 0) for fns in ran.values()) >= 2
    assert len(ran) >= 2  # the functions spread over the nodes
    # the root runs next to the durable state, on the head; a leaf on every other node
    # where clients trained adds the updates lying there and sends its partial up
    head = placement["head_node"]
    assert ran[head].get("aggregate") == sum(f.get("aggregate", 0) for f in ran.values())
    for node, fns in ran.items():
        assert bool(fns.get("leaf")) == (node != head and bool(fns.get("client"))), node
    assert placement["cross_node_bytes"] > 0  # models down, partials up
    # what the root read from other nodes is the leaves' partials (each handed off in
    # its leaf's node), as placement predicted: no update was read across
    reads = placement["remote_read_bytes_by_node"]
    assert set(reads) == {head}
    predicted = sum(r["nodes"]["predicted_cross_node_bytes"] for r in on_ray["per_round"])
    assert sum(reads.values()) == pytest.approx(predicted, rel=0.02)
    assert placement["head_node"] in placement["state_bytes_by_node"]
    # each round's record says how long the close waited for the leaves' partials to
    # reach the root (those sent early, when the round waited for its last updates, are
    # added at the close too)
    for r in on_ray["per_round"]:
        leaves = any(count > 0 for node, count in r["nodes"]["landing"].items()
                     if node != head)
        parts = {"partials_s", "result_s", "model_write_s"} if leaves else {
            "result_s", "model_write_s"}
        assert set(r["close_parts_s"]) == parts, r


def test_a_large_blob_read_on_a_worker_node_comes_whole_and_from_its_cache(
        cluster: LocalCluster, tmp_path: Path) -> None:
    import hashlib

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def read_twice(config: dict[str, Any], key: str) -> tuple[str, str, bool, str]:
        # on a worker node: the blob read twice (the second time from the node's cache);
        # the digests, and whether a view lies in Ray's object store. (A local function:
        # Ray ships it by value, the test module not being importable on the workers.)
        import hashlib

        import numpy as np

        from strato.services import connect

        with connect(config) as svc:
            first, second = svc.blobs.get(key), svc.blobs.get(key)
            in_ray = any(isinstance(v.obj, np.ndarray) for v in (first, second))
            return (hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest(),
                    in_ray, svc.blobs.node_id)  # type: ignore[attr-defined]

    config = {"backend": "ray", "address": cluster.address,
              "root": str((tmp_path / "services").resolve())}
    data = os.urandom(3 << 20)  # over 1 MiB: it crosses as an array, and is cached
    with connect(config) as svc:
        svc.blobs.put("models/big", data)
        worker = cluster.workers[0].node_id
        task = ray.remote(read_twice).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(worker, soft=False))
        try:
            first, second, in_ray, node = ray.get(task.remote(config, "models/big"),
                                                  timeout=120)
        finally:  # the worker node's cache (a run removes its nodes' directories itself)
            from strato.backends.ray._parts import node_dir

            shutil.rmtree(node_dir(config["root"], worker).parent, ignore_errors=True)
    assert node == worker
    assert first == second == hashlib.sha256(data).hexdigest()
    assert not in_ray  # read from the node's own file, not pinned in Ray's object store


def test_losing_a_worker_node_mid_round_loses_no_update(cluster: LocalCluster, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATO_DATA_DIR", raising=False)
    out = tmp_path / "run"
    # 4 clients at once over 3 nodes: every node, the one about to go included, trains
    opts = _options(out, cluster.address, rounds=2, clients_per_round=12, client_concurrency=4)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["summary"] = run_job(opts)
        except BaseException as exc:  # reported below
            import traceback

            result["error"] = exc
            result["traceback"] = traceback.format_exc()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    # Mid-round 1: an accepted update lies on the node about to go, whose leaf holds it;
    # clients still train on every node.
    svc_config = {"backend": "ray", "address": cluster.address,
                  "root": str((out / "services").resolve()), "node_local_blobs": ["updates/"]}
    victim = cluster.workers[0]
    deadline = time.monotonic() + 120
    on_victim: list[str] = []
    with connect(svc_config) as svc:
        while time.monotonic() < deadline and runner.is_alive() and not on_victim:
            try:
                accepted = [a.value for a in svc.table.query(state.ACCEPTED)]
            except Exception:  # the run has not made its tables yet
                accepted = []
            on_victim = [a["client"] for a in accepted
                         if svc.blobs.home(a["blob"]) == victim.node_id]  # type: ignore[attr-defined]
            time.sleep(0.05)
        assert on_victim, f"no accepted update came to lie on {victim.node_id}: {result}"
        assert victim.node_id in {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        cluster.remove_node(victim)
        runner.join(timeout=300)
    assert not runner.is_alive(), "the run did not finish after the node was lost"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["rounds"] == 2
    # every selected client reported and was counted once: 12 per round (a client whose
    # update was lost with the node trained again)
    assert summary["updates_accepted"] == 24
    assert [r["accepted"] for r in summary["per_round"]] == [12, 12]
    from strato.fl.aggregator import LOST
    from strato.services import embedded

    with embedded(out / "services") as svc:  # the run's table, read on this machine
        lost = [x.value for x in svc.table.query(state.REJECTIONS)]
    assert lost and all(x["reason"].startswith(LOST) for x in lost), lost
    assert set(on_victim) <= {x["client"] for x in lost}
    # the lost node had work of this run when it went
    assert summary["placement"]["invocations_by_node"].get(victim.node_id)
    # its directory went with it (on a machine of its own); here it shares this disk
    from strato.backends.ray._parts import node_dir

    shutil.rmtree(node_dir(svc_config["root"], victim.node_id), ignore_errors=True)
    cluster.add_node()  # for later tests


@pytest.mark.parametrize("channel", ["bus", "blob"])
def test_inference_workers_as_actors_give_the_oracles_categories(
    cluster: LocalCluster, tmp_path: Path, channel: str
) -> None:
    import numpy as np

    from sparse_inputs import random_inputs
    from strato.inference.network import generate_network
    from strato.inference.partition import make_partition
    from strato.inference.reference import reference_inference
    from strato.inference.run import RunOptions as InferOptions
    from strato.inference.run import run_distributed

    net = generate_network(1024, 4, seed=4)
    x = random_inputs(1024, 300, 120, seed=5)
    part = make_partition("hypergraph", net.layers, 3)
    config = {"backend": "ray", "address": cluster.address, "root": str(tmp_path / "svc")}
    with connect(config) as svc:
        res = run_distributed(svc, net.layers, net.biases, x, part,
                              InferOptions(channel=channel, branching=2, group_size=2,
                                           timeout_s=120))
        ran = svc.runtime.placement()["invocations_by_node"]  # type: ignore[attr-defined]
    assert np.array_equal(res["categories"], reference_inference(net, x))
    assert res["counts"]["invocations"] == 3
    assert len(ran) >= 2  # the three workers went to different nodes


def test_node_local_blobs_and_functions_pinned_to_a_node(cluster: LocalCluster,
                                                          tmp_path: Path) -> None:
    """The two primitives the engine's leaves stand on: a blob the application can make
    again stays on the node that wrote it (read elsewhere by a task there, counted), and
    a ``locality="node"`` function runs on the node an invocation names, with its own
    warm worker and concurrency there."""
    from strato.errors import StratoError
    from strato.services import FunctionSpec

    handlers = str(Path(__file__).resolve().parents[2] / "conformance")
    root = str(tmp_path / "svc")
    config = {"backend": "ray", "address": cluster.address, "root": root,
              "node_local_blobs": ["local/"]}
    worker, other = (w.node_id for w in cluster.workers[:2])
    with connect(config) as svc:
        svc.runtime.register(FunctionSpec("put", "runtime_handlers:put_here", locality="node",
                                          max_concurrency=1, env={"PYTHONPATH": handlers}))
        head = svc.runtime.placement()["head_node"]  # type: ignore[attr-defined]
        first = svc.runtime.invoke("put", {"key": "local/a", "data": "hello"},  # type: ignore[call-arg]
                                   node=worker)
        again = svc.runtime.invoke("put", {"key": "local/b", "data": "hi",  # type: ignore[call-arg]
                                           "then": {"name": "put", "node": other,
                                                    "event": {"key": "local/c", "data": "c"}}},
                                   node=worker)
        on_head = svc.runtime.invoke("put", {"key": "shared/d", "data": "d"})  # no node: head
        assert first["node"] == again["node"] == worker and first["pid"] == again["pid"]
        assert on_head["node"] == head
        deadline = time.monotonic() + 60  # the nested call, on the other node
        while not svc.blobs.exists("local/c") and time.monotonic() < deadline:
            time.sleep(0.05)
        homes = {k: svc.blobs.home(k) for k in ("local/a", "local/b", "local/c", "shared/d")}  # type: ignore[attr-defined]
        assert homes == {"local/a": worker, "local/b": worker, "local/c": other,
                         "shared/d": None}
        with pytest.raises(StratoError, match="not on this node"):
            svc.blobs.locate("local/a")  # type: ignore[attr-defined]
        assert bytes(svc.blobs.get("local/a")) == b"hello"  # a task on its node reads it
        assert svc.blobs.list("local/") == ["local/a", "local/b", "local/c"]
        placement = svc.runtime.placement()  # type: ignore[attr-defined]
        assert placement["remote_read_bytes_by_node"] == {head: 5}
        assert placement["invocations_by_node"][worker]["put"] == 2
        assert placement["invocations_by_node"][other]["put"] == 1
        svc.blobs.delete("local/a")
        assert not svc.blobs.exists("local/a")
        assert svc.blobs.list("local/") == ["local/b", "local/c"]
        from strato.backends.ray._parts import node_dir

        assert node_dir(root, worker).is_dir()
    # the run is over: its node-local blobs are gone from every node
    deadline = time.monotonic() + 15
    while node_dir(root, worker).parent.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not node_dir(root, worker).parent.exists()


def test_a_handed_off_blob_is_pulled_once_and_lost_with_its_writer(cluster: LocalCluster,
                                                                    tmp_path: Path) -> None:
    """A leaf's partial is handed off: an object in its writer's node's object store
    (no file, no copy on the head) that the reader pulls once, counted as crossing; one
    whose writer has gone is ``NotFound`` (the root hands its updates over again). A
    reader waiting for several is told as one is handed."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from strato.errors import NotFound, StratoError

    class Writer:  # (a local class: Ray ships it by value)
        def put(self, config: dict[str, Any], key: str, data: bytes) -> str:
            from strato.services import connect

            # (the object is this actor process's: it lives while the process does)
            self.svc = connect(config)
            self.svc.blobs.put(key, data)
            return str(self.svc.blobs.node_id)  # type: ignore[attr-defined]

    root = tmp_path / "svc"
    config = {"backend": "ray", "address": cluster.address, "root": str(root),
              "handoff_blobs": ["hand/"]}
    worker = cluster.workers[0].node_id
    data = os.urandom(2 << 20)
    with connect(config) as svc:
        head = svc.runtime.placement()["head_node"]  # type: ignore[attr-defined]
        writer = ray.remote(Writer).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(worker, soft=False)
        ).remote()
        assert svc.blobs.await_any(["hand/a", "hand/c"], 0.1) == []  # nothing handed yet
        put = writer.put.remote(config, "hand/a", data)
        started = time.monotonic()  # the reader waiting for either is told as one comes
        assert svc.blobs.await_any(["hand/a", "hand/c"], 600) == ["hand/a"]
        assert time.monotonic() - started < 300
        assert ray.get(put, timeout=120) == worker
        ray.get(writer.put.remote(config, "hand/b", b"hi"), timeout=120)
        assert svc.blobs.exists("hand/a") and not svc.blobs.exists("hand/c")
        assert svc.blobs.list("hand/") == ["hand/a", "hand/b"]
        with pytest.raises(StratoError, match="object store"):
            svc.blobs.locate("hand/a")  # type: ignore[attr-defined]
        assert bytes(svc.blobs.get("hand/a")) == data
        assert bytes(svc.blobs.get("hand/b")) == b"hi"
        placement = svc.runtime.placement()  # type: ignore[attr-defined]
        assert placement["remote_read_bytes_by_node"] == {head: len(data) + 2}
        assert not list(root.rglob("hand")), "a handed-off blob is no file"
        svc.blobs.delete("hand/b")
        assert not svc.blobs.exists("hand/b") and svc.blobs.list("hand/") == ["hand/a"]
        with pytest.raises(NotFound):
            svc.blobs.get("hand/b")
        ray.kill(writer)  # its owner gone, the object is gone too
        with pytest.raises(NotFound, match="lost with the process that wrote it"):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # (the kill takes a moment)
                svc.blobs.get("hand/a")
                time.sleep(0.1)


def test_the_scale_benchmark_runs_on_the_cluster(cluster: LocalCluster, tmp_path: Path) -> None:
    """benchmarks/ray_scale.py (its figures come from the script, not from here)."""
    import json
    import sys

    out = tmp_path / "scale.json"
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "ray_scale.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--address", cluster.address,
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    for key in ("completion_s_ray", "completion_s_embedded", "ray_overhead_ratio",
                "cross_node_bytes_measured", "cross_node_bytes_predicted",
                "best_fit_vs_round_robin_cross_node_ratio"):
        assert isinstance(rec[key], (int, float)) and rec[key] > 0, key
    # dealt round robin, leaves read other nodes' updates: more crosses than by best fit
    assert rec["cross_node_bytes_measured_round_robin"] > rec["cross_node_bytes_measured"]
    assert rec["cross_node_prediction_error"] < 0.5  # the root's prediction tracks it
    assert set(rec["targets"]) == {"ray_overhead_ratio", "cross_node_prediction_error",
                                   "best_fit_vs_round_robin_cross_node_ratio"}
    assert "| ray-best-fit |" in proc.stdout


def test_a_lost_state_host_is_made_again_on_the_same_files(cluster: LocalCluster,
                                                           tmp_path: Path) -> None:
    from strato.backends.ray._cluster import state_client
    from strato.errors import StratoError

    config = {"backend": "ray", "address": cluster.address, "root": str(tmp_path / "svc")}
    with connect(config) as svc:
        svc.table.create_table("t")
        svc.table.put("t", "k", {"v": 1})
        svc.blobs.put("b", b"bytes")
        svc.bus.create_topic("news")
        svc.bus.subscribe("news", "q")
        client = state_client(config)
        try:
            host = client.actor()
            ray.kill(host)  # as if the process that made it had gone
            deadline = time.monotonic() + 30  # the kill is asynchronous: wait till it is gone
            while time.monotonic() < deadline:
                try:
                    ray.get(host.ping.remote(), timeout=5)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    break
                time.sleep(0.05)
            # this process runs on the host's machine: its table and blobs are the
            # host's files, read in place, host or no host; the bus goes through it
            item = svc.table.get("t", "k")
            assert item is not None and item.value == {"v": 1}
            with pytest.raises(StratoError, match="state host went away"):
                svc.bus.publish("news", b"hello")
            svc.bus.publish("news", b"again")  # a new host, the same SQLite files
            assert [m.body for m in svc.bus.receive("q", max_messages=5)] == [b"again"]
            got, _ = client.call("table", "get", "t", "k")  # what another node reads
            assert got["value"] == {"v": 1}
        finally:
            client.release()
        item = svc.table.get("t", "k")
        assert item is not None and item.value == {"v": 1}
        assert bytes(svc.blobs.get("b")) == b"bytes"
