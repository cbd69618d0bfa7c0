from __future__ import annotations

import numpy as np
import pytest

from strato.errors import ConfigError
from strato.inference.network import (
    BIAS_BY_NEURONS,
    WEIGHT,
    base_layer,
    generate_layer,
    generate_network,
    random_network,
)


@pytest.mark.parametrize("neurons", [1024, 4096])
def test_every_layer_has_32_per_row_and_column(neurons: int) -> None:
    net = generate_network(neurons, 8, seed=3)
    for w in net.layers:
        assert (np.diff(w.indptr) == 32).all()
        assert (np.bincount(w.indices, minlength=neurons) == 32).all()
        assert np.all(w.data == np.float32(WEIGHT))
    assert net.biases == [BIAS_BY_NEURONS[neurons]] * 8
    assert net.edges == 8 * 32 * neurons


def test_first_layers_are_the_published_radix2_kronecker_layers() -> None:
    for base in range(1, 7):
        w = base_layer(1024, base).tocsc()
        for j in (0, 5, 63, 64, 700, 1023):
            rows = set(w.indices[w.indptr[j] : w.indptr[j + 1]].tolist())
            shift = 2 ** (base - 1)
            expect = {(j + d) % 64 + 64 * k for d in (0, shift) for k in range(16)}
            assert rows == expect


def test_later_layers_are_permuted_copies_deterministic_in_seed() -> None:
    a, b, c = generate_layer(1024, 9, 1), generate_layer(1024, 9, 1), generate_layer(1024, 9, 2)
    assert (a != b).nnz == 0
    assert (a != c).nnz > 0
    base = base_layer(1024, 3)  # layer 9 copies base layer 3
    # same multiset of row and column degrees structure: a permuted copy has the same
    # sorted singular pattern; compare sorted row-overlap counts as a cheap invariant
    ov_a = np.sort((a @ a.T).data)
    ov_base = np.sort((base @ base.T).data)
    assert np.array_equal(ov_a, ov_base)


def test_bad_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        generate_network(1000, 2)
    with pytest.raises(ConfigError):
        generate_network(1024, 0)


def test_random_layers_have_no_twin_rows_and_are_deterministic_in_seed() -> None:
    from strato.inference.kernel import transposed_layers
    from strato.inference.plan import twin_classes

    net = random_network(1024, 3, seed=5)
    again = random_network(1024, 3, seed=5)
    other = random_network(1024, 3, seed=6)
    generated = generate_network(1024, 3, seed=5)
    for wt, wt_again, wt_other, wt_gen in zip(
        transposed_layers(net.layers), transposed_layers(again.layers),
        transposed_layers(other.layers), transposed_layers(generated.layers), strict=True,
    ):
        assert (np.diff(wt.indptr) == 32).all()  # 32 inputs per output neuron
        assert (wt != wt_again).nnz == 0 and (wt != wt_other).nnz > 0
        assert len(set(twin_classes(wt).tolist())) == 1024  # every row its own class
        assert len(set(twin_classes(wt_gen).tolist())) == 64  # the generator's twins
    assert net.biases == generated.biases and net.edges == generated.edges
    with pytest.raises(ConfigError, match="per_neuron"):
        random_network(1024, 1, per_neuron=0)
