from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from strato.errors import ConfigError
from strato.inference.channels import MESSAGE_LIMIT, bus_groups, plan_bus_messages
from strato.inference.cost import PRICES, price, profile_sample, profile_sizes
from strato.inference.network import generate_network
from strato.inference.partition import communication_volume, make_partition, send_lists


@pytest.fixture(scope="module")
def net():  # type: ignore[no-untyped-def]
    return generate_network(1024, 8, seed=0)


@pytest.mark.parametrize("method", ["random", "contiguous", "hypergraph"])
def test_partitions_are_balanced(net, method: str) -> None:  # type: ignore[no-untyped-def]
    part = make_partition(method, net.layers, 8)
    for li in range(net.depth):
        assert np.bincount(part.owner[li], minlength=8).max() <= 128


def test_send_lists_match_brute_force(net) -> None:  # type: ignore[no-untyped-def]
    part = make_partition("random", net.layers, 3, seed=2)
    w = sp.csc_matrix(net.layers[1])
    lists = send_lists(net.layers[1], part.owner[0], part.owner[1], 3)
    for s in range(3):
        for t in range(3):
            if s == t:
                continue
            cols = np.flatnonzero(part.owner[1] == t)
            need = np.unique(w[:, cols].indices)
            expect = need[part.owner[0][need] == s]
            assert np.array_equal(lists.get((s, t), np.zeros(0)), expect)
    vol = communication_volume(net.layers, part)
    assert vol[0] == sum(v.size for v in lists.values())


def test_hypergraph_cuts_volume_to_under_a_third_of_random(net) -> None:  # type: ignore[no-untyped-def]
    rnd = communication_volume(net.layers, make_partition("random", net.layers, 8)).sum()
    hyp = communication_volume(net.layers, make_partition("hypergraph", net.layers, 8)).sum()
    assert hyp <= rnd / 3


def test_bad_partition_requests(net) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        make_partition("spectral", net.layers, 2)
    with pytest.raises(ConfigError):
        make_partition("random", net.layers, 0)


def test_bus_messages_batch_small_blocks_and_split_big_ones() -> None:
    groups = bus_groups(6, 4)  # topics {0..3}, {4, 5}
    small = plan_bus_messages(1, {0: 10, 2: 0, 3: 5, 4: 7, 5: 0}, groups)
    assert [(g, attr, len(secs)) for g, attr, secs, _ in small] == [
        (0, "all-but-1", 3), (1, "all", 2)
    ]
    big = plan_bus_messages(0, {1: 3 * MESSAGE_LIMIT, 2: 1, 3: 1}, bus_groups(4, 4))
    assert all(n <= MESSAGE_LIMIT for *_, n in big)
    to1 = [secs[0] for _, attr, secs, _ in big if attr == "1"]
    assert [p for _, p, _, _ in to1] == list(range(len(to1))) and len(to1) == 4
    assert sum(n for _, _, _, n in to1) == 3 * MESSAGE_LIMIT


def test_price_uses_list_prices() -> None:
    c = {"gb_s": 1000.0, "invocations": 10, "publish_chunks": 4, "puts": 2, "gets": 3}
    want = (1000 * PRICES["lambda_gb_s"] + 10 * PRICES["lambda_request"]
            + 4 * PRICES["sns_request"] + 2 * PRICES["s3_put_list"] + 3 * PRICES["s3_get"])
    assert price(c) == pytest.approx(want)


def test_profile_sample_is_stratified_by_image_size() -> None:
    x = sp.csr_matrix(np.tril(np.ones((1000, 1000), dtype=np.float32)))  # image i: i + 1 pixels
    picked = profile_sample(x, fraction=0.1, minimum=10)
    assert picked.size == 100 and np.all(np.diff(picked) > 0)
    # one image from every tenth of the size range, not a cluster
    assert np.array_equal(np.diff(picked), np.full(99, 10))
    assert profile_sample(x, fraction=0.1, minimum=2000).size == 1000  # small: everything


def test_sampled_profile_predicts_the_full_block_sizes(net, make_inputs) -> None:  # type: ignore[no-untyped-def]
    x = make_inputs(1024, 3000, 120, seed=11)
    parts = [make_partition("random", net.layers, 4), make_partition("hypergraph", net.layers, 4)]
    exact = profile_sizes(net.layers, net.biases, x, parts, minimum=10**9)
    sampled = profile_sizes(net.layers, net.biases, x, parts, fraction=0.2, minimum=100)
    for e, s in zip(exact, sampled, strict=True):
        assert s.sample == 600 and e.sample == 3000
        total_e, total_s = e.block_bytes.sum(), s.block_bytes.sum()
        assert abs(total_s / total_e - 1) < 0.1, (total_s, total_e)
        # and the empty blocks are the same ones
        assert np.array_equal(e.block_bytes > 0, s.block_bytes > 0)
