"""The Graph Challenge's TSV formats, so users with the published files can run them.

- layer ``l`` of an ``N``-neuron network: ``n{N}-l{l}.tsv``, lines ``row<TAB>col<TAB>value``
  (1-based input neuron, output neuron, weight);
- biases (the challenge fixes one per N; we write them so a saved network is
  self-contained): ``n{N}-bias.tsv``, lines ``layer<TAB>bias`` (1-based);
- inputs: ``sparse-images-{N}.tsv``, lines ``image<TAB>neuron<TAB>value`` (1-based);
- categories: one 1-based image index per line (the challenge's
  ``neuron{N}-l{L}-categories.tsv``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from strato.errors import ConfigError, NotFound
from strato.inference.network import Network, default_bias

__all__ = [
    "read_categories",
    "read_images",
    "read_matrix",
    "read_network",
    "write_categories",
    "write_images",
    "write_matrix",
    "write_network",
]


def write_matrix(path: str | Path, m: sp.spmatrix) -> None:
    """``row col value`` lines, 1-based, rows in order."""
    coo = sp.coo_matrix(m)
    order = np.lexsort((coo.col, coo.row))
    rows, cols, vals = coo.row[order] + 1, coo.col[order] + 1, coo.data[order]
    with open(path, "w") as f:
        for start in range(0, rows.size, 1 << 20):  # bounded memory for big layers
            stop = start + (1 << 20)
            f.writelines(
                f"{r}\t{c}\t{v:g}\n"
                for r, c, v in zip(
                    rows[start:stop].tolist(),
                    cols[start:stop].tolist(),
                    vals[start:stop].tolist(),
                    strict=True,
                )
            )


def read_matrix(path: str | Path, shape: tuple[int, int] | None = None) -> sp.csr_matrix:
    """A ``row col value`` TSV (1-based) as CSR float32; ``shape`` defaults to the max ids."""
    p = Path(path)
    if not p.exists():
        raise NotFound(f"{p} does not exist")
    text = p.read_bytes()
    try:
        flat = np.array(text.split(), dtype=np.float64)
    except ValueError:
        raise ConfigError(f"{p} has a non-numeric field; expected row<TAB>col<TAB>value") from None
    if flat.size % 3:
        raise ConfigError(f"{p} does not have 3 fields per line")
    triples = flat.reshape(-1, 3)
    rows, cols = triples[:, 0].astype(np.int64) - 1, triples[:, 1].astype(np.int64) - 1
    if rows.size and (rows.min() < 0 or cols.min() < 0):
        raise ConfigError(f"{p} has an index below 1 (the format is 1-based)")
    if shape is None:
        shape = (int(rows.max(initial=-1)) + 1, int(cols.max(initial=-1)) + 1)
    elif rows.size and (rows.max() >= shape[0] or cols.max() >= shape[1]):
        raise ConfigError(f"{p} has an index beyond {shape[0]}×{shape[1]}")
    m = sp.csr_matrix(
        (triples[:, 2].astype(np.float32), (rows, cols)), shape=shape, dtype=np.float32
    )
    m.sum_duplicates()
    return m


def write_network(directory: str | Path, network: Network) -> list[Path]:
    """Write every layer and the biases; returns the files written."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    n = network.neurons
    written = []
    for idx, w in enumerate(network.layers, 1):
        path = d / f"n{n}-l{idx}.tsv"
        write_matrix(path, w)
        written.append(path)
    bias_path = d / f"n{n}-bias.tsv"
    bias_path.write_text("".join(f"{i}\t{b:g}\n" for i, b in enumerate(network.biases, 1)))
    written.append(bias_path)
    return written


def read_network(directory: str | Path, neurons: int, layers: int | None = None) -> Network:
    """Read ``n{N}-l{l}.tsv`` for l = 1..layers (all present ones when ``layers`` is None);
    biases from ``n{N}-bias.tsv`` when present, else the challenge's value for N."""
    d = Path(directory)
    if layers is None:
        found = [
            int(m.group(1))
            for p in d.glob(f"n{neurons}-l*.tsv")
            if (m := re.fullmatch(rf"n{neurons}-l(\d+)\.tsv", p.name))
        ]
        if not found:
            raise NotFound(f"no n{neurons}-l*.tsv layer files in {d}")
        layers = max(found)
    shape = (neurons, neurons)
    mats = [read_matrix(d / f"n{neurons}-l{i}.tsv", shape) for i in range(1, layers + 1)]
    bias_path = d / f"n{neurons}-bias.tsv"
    if bias_path.exists():
        table = dict(_read_pairs(bias_path))
        missing = [i for i in range(1, layers + 1) if i not in table]
        if missing:
            raise ConfigError(f"{bias_path} lacks the bias of layer(s) {missing[:5]}")
        biases = [table[i] for i in range(1, layers + 1)]
    else:
        biases = [default_bias(neurons)] * layers
    return Network(neurons=neurons, layers=mats, biases=biases)


def _read_pairs(path: Path) -> list[tuple[int, float]]:
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError(f"{path}:{lineno}: expected 'layer<TAB>bias'")
        out.append((int(fields[0]), float(fields[1])))
    return out


def write_images(path: str | Path, images: sp.spmatrix) -> None:
    write_matrix(path, images)


def read_images(path: str | Path, neurons: int, count: int | None = None) -> sp.csr_matrix:
    """Sparse images (image × neuron); ``count`` rows (default: the largest image id)."""
    m = read_matrix(path)
    if m.shape[1] > neurons:
        raise ConfigError(f"{path} has neuron ids up to {m.shape[1]}, the network has {neurons}")
    rows = m.shape[0] if count is None else count
    if rows < m.shape[0]:
        m = m[:rows]
    m.resize((rows, neurons))
    return sp.csr_matrix(m)


def write_categories(path: str | Path, categories: np.ndarray) -> None:
    """One 1-based image index per line."""
    Path(path).write_text("".join(f"{int(c) + 1}\n" for c in categories))


def read_categories(path: str | Path) -> np.ndarray:
    """0-based image indices from a 1-based categories file."""
    text = Path(path).read_text().split()
    try:
        return np.array(sorted(int(t) - 1 for t in text), dtype=np.int64)
    except ValueError:
        raise ConfigError(f"{path} has a non-integer line") from None
