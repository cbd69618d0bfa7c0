"""Sparse DNN Graph Challenge networks: the data type and a seeded RadiX-Net-like generator.

Convention (the challenge's): activations ``Y`` are images × neurons, a layer's
weights ``W`` are input neuron × output neuron, and one layer is
``Y <- min(32, ReLU(Y @ W + b))`` with the bias added to the nonzero entries of
``Y @ W`` only. An image's category is "its final row has any nonzero".

Generator. The published networks are RadiX-Net topologies: neurons are 64
*positions* × ``N/64`` *blocks* (neuron ``i`` = position ``i % 64``, block ``i // 64``).
Base layer ``b`` (1..6) connects output neuron ``j`` to the input neurons at positions
``(j + {0, 2**(b-1)}) % 64`` in 16 blocks: for ``N = 1024`` these are all 16 blocks
(exactly the published layers); for larger ``N`` we take the 16 blocks congruent to
``j``'s block modulo ``N/1024`` (a strided block-diagonal Kronecker factor, the
natural way to keep 32 nonzeros per row and column). Layer ``l > 6`` is base layer
``(l-1) % 6 + 1`` with its rows and columns permuted by two random permutations drawn
from ``numpy.random.default_rng([seed, l])``: each layer depends only on
``(seed, l)``, so any layer can be rebuilt alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from strato.errors import ConfigError

__all__ = [
    "BIAS_BY_NEURONS",
    "CLIP",
    "NONZEROS_PER_NEURON",
    "WEIGHT",
    "Network",
    "base_layer",
    "generate_layer",
    "generate_network",
    "random_network",
]

BIAS_BY_NEURONS: dict[int, float] = {1024: -0.30, 4096: -0.35, 16384: -0.40, 65536: -0.45}
NONZEROS_PER_NEURON = 32
WEIGHT = 1.0 / 16.0
CLIP = 32.0  # the challenge's activation ceiling
_POSITIONS = 64
_BLOCKS_PER_COLUMN = 16


@dataclass
class Network:
    """A sparse DNN: ``layers[l]`` is CSR float32 (input neuron × output neuron)."""

    neurons: int
    layers: list[sp.csr_matrix]
    biases: list[float]
    seed: int | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.biases) != len(self.layers):
            raise ConfigError(
                f"{len(self.layers)} layers but {len(self.biases)} biases: need one per layer"
            )
        for n, w in enumerate(self.layers, 1):
            if w.shape != (self.neurons, self.neurons):
                raise ConfigError(
                    f"layer {n} is {w.shape[0]}×{w.shape[1]}, expected "
                    f"{self.neurons}×{self.neurons}"
                )

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def edges(self) -> int:
        """Total nonzero weights (the challenge's rate is inputs × edges ÷ seconds)."""
        return int(sum(w.nnz for w in self.layers))


def _check_neurons(neurons: int) -> None:
    if neurons < 1024 or neurons % 1024:
        raise ConfigError(f"--neurons must be a multiple of 1024 (≥ 1024), got {neurons}")


def default_bias(neurons: int) -> float:
    """The challenge's bias for ``neurons``; other sizes interpolate on log4(N)."""
    if neurons in BIAS_BY_NEURONS:
        return BIAS_BY_NEURONS[neurons]
    # -0.30 at 1024, −0.05 per ×4: the published sequence, continued.
    return float(-0.30 - 0.05 * np.log(neurons / 1024) / np.log(4))


def base_layer(neurons: int, base: int) -> sp.csr_matrix:
    """Unpermuted RadiX-Net layer ``base`` in 1..6 (see the module docstring)."""
    _check_neurons(neurons)
    if not 1 <= base <= 6:
        raise ConfigError(f"base layer must be in 1..6, got {base}")
    shift = 2 ** (base - 1)
    groups = neurons // (_POSITIONS * _BLOCKS_PER_COLUMN)  # blocks congruent mod `groups`
    cols = np.arange(neurons, dtype=np.int64)
    pos, block = cols % _POSITIONS, cols // _POSITIONS
    row_pos = np.stack([pos, (pos + shift) % _POSITIONS], axis=1)  # (N, 2)
    t = np.arange(_BLOCKS_PER_COLUMN, dtype=np.int64)
    row_block = (block % groups)[:, None] + groups * t[None, :]  # (N, 16)
    rows = (row_pos[:, :, None] + _POSITIONS * row_block[:, None, :]).reshape(neurons, -1)
    # rows[j] lists the 32 input neurons of output neuron j: build the CSC of W, i.e.
    # the CSR of W.T, then transpose (a cheap format flip).
    rows.sort(axis=1)
    indptr = np.arange(0, rows.size + 1, NONZEROS_PER_NEURON, dtype=np.int64)
    data = np.full(rows.size, WEIGHT, dtype=np.float32)
    wt = sp.csr_matrix((data, rows.ravel(), indptr), shape=(neurons, neurons))
    return wt.T.tocsr()


def generate_layer(neurons: int, layer: int, seed: int) -> sp.csr_matrix:
    """Layer ``layer`` (1-based) of the seeded network, built without the others."""
    base_index = (layer - 1) % 6 + 1
    w = base_layer(neurons, base_index)
    if layer <= 6:
        return w
    rng = np.random.default_rng([seed, layer])
    row_perm = rng.permutation(neurons)
    col_perm = rng.permutation(neurons)
    # W'[i, j] = W[row_perm[i], col_perm[j]]: a row- and column-permuted copy.
    permuted: sp.csr_matrix = w[row_perm][:, col_perm].tocsr()
    permuted.sort_indices()
    return permuted


def generate_network(
    neurons: int, layers: int, seed: int = 0, bias: float | None = None
) -> Network:
    """A RadiX-Net-like Graph Challenge network, deterministic in ``seed``."""
    _check_neurons(neurons)
    if layers < 1:
        raise ConfigError(f"--layers must be ≥ 1, got {layers}")
    b = default_bias(neurons) if bias is None else float(bias)
    return Network(
        neurons=neurons,
        layers=[generate_layer(neurons, n, seed) for n in range(1, layers + 1)],
        biases=[b] * layers,
        seed=seed,
    )


def random_network(
    neurons: int, layers: int, seed: int = 0, bias: float | None = None,
    per_neuron: int = NONZEROS_PER_NEURON,
) -> Network:
    """A network of the generator's size, weight and bias whose output neurons each take
    ``per_neuron`` input neurons drawn at random (without repeats): no two rows share
    their columns by construction, so a plan that sends one row per twin class gains
    nothing from it (the benchmark's control for the generator's twin rows)."""
    _check_neurons(neurons)
    if layers < 1:
        raise ConfigError(f"--layers must be ≥ 1, got {layers}")
    if not 1 <= per_neuron <= neurons:
        raise ConfigError(f"per_neuron must be in 1..{neurons}, got {per_neuron}")
    b = default_bias(neurons) if bias is None else float(bias)
    out = []
    for n in range(1, layers + 1):
        rng = np.random.default_rng([seed, n, 1])
        # each output neuron's inputs: the first per_neuron of a random permutation
        rows = np.argpartition(rng.random((neurons, neurons)), per_neuron, axis=1)[:, :per_neuron]
        rows.sort(axis=1)
        indptr = np.arange(0, rows.size + 1, per_neuron, dtype=np.int64)
        data = np.full(rows.size, WEIGHT, dtype=np.float32)
        wt = sp.csr_matrix((data, rows.ravel(), indptr), shape=(neurons, neurons))
        out.append(wt.T.tocsr())
    return Network(neurons=neurons, layers=out, biases=[b] * layers, seed=seed)
