"""End to end on the embedded primitives: workers as Runtime functions, both channels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from strato.inference.network import generate_network
from strato.inference.partition import make_partition
from strato.inference.planner import predict
from strato.inference.reference import reference_inference
from strato.inference.run import RunOptions, run_distributed
from strato.services import Services, embedded

# every operation the cost model predicts, except the timing-dependent (empty receives)
EXACT = (
    "invocations", "publish_calls", "publish_chunks", "bytes_published", "receive_calls",
    "receive_chunks", "deletes", "puts", "gets", "lists", "bytes_put", "notice_publishes",
    "notice_receives", "notice_deletes",
)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    with embedded(tmp_path_factory.mktemp("svc")) as s:
        yield s


@pytest.fixture(scope="module")
def case(make_inputs):  # type: ignore[no-untyped-def]
    net = generate_network(1024, 8, seed=4)
    x = make_inputs(1024, 400, 120, seed=5)
    return net, x, reference_inference(net, x)


@pytest.mark.parametrize(
    ("channel", "workers", "method", "branching"),
    [
        ("bus", 1, "contiguous", 0),
        ("bus", 3, "random", 2),
        ("bus", 4, "hypergraph", 0),
        ("blob", 2, "contiguous", 0),
        ("blob", 3, "hypergraph", 2),
    ],
)
def test_categories_equal_the_oracle(services, case, channel, workers, method, branching) -> None:  # type: ignore[no-untyped-def]
    net, x, ref = case
    part = make_partition(method, net.layers, workers)
    opts = RunOptions(channel=channel, branching=branching, group_size=2, timeout_s=120)
    pred = predict(net.layers, net.biases, x, part, channel, 1024, 2).counts
    res = run_distributed(services, net.layers, net.biases, x, part, opts)
    assert np.array_equal(res["categories"], ref)
    meas = res["counts"]
    assert meas["invocations"] == workers
    # 400 inputs are profiled in full, so sizes and therefore every count are exact
    for key in EXACT:
        assert meas.get(key, 0) == pred.get(key, 0), key
    if workers > 1 and channel == "blob":
        assert meas["lists"] == 7 * workers  # one per receiver and boundary, no polling
        assert 0 < meas["puts"] <= 7 * workers * (workers - 1)  # non-empty blocks only
    # nothing of the run is left behind in the blob store
    assert services.blobs.list(f"inf/{res['run']}/") == []


def test_a_failing_worker_is_reported_not_waited_for(services, case, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from strato.errors import FunctionError

    net, x, _ = case
    part = make_partition("contiguous", net.layers, 2)
    bad = [w.copy() for w in net.layers]
    opts = RunOptions(channel="bus", timeout_s=60, function="strato-infer-bad")
    # an input matrix narrower than the network makes every worker's slicing fail
    with pytest.raises(FunctionError):
        run_distributed(services, bad, net.biases, x[:, :512], part, opts)
