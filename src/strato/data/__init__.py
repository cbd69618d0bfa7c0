"""Datasets and their split among clients.

``load_dataset(data_dir)`` gives MNIST (from IDX files in ``data_dir`` or
``$STRATO_DATA_DIR``) or, with neither, scikit-learn's digits; ``partition(labels,
clients, scheme, seed=...)`` splits the training set (``iid``, ``dirichlet``,
``shards``). Pure numpy, deterministic, and every user mistake is a ``ConfigError``.
"""

from __future__ import annotations

from strato.data.datasets import (
    DATA_DIR_ENV,
    Dataset,
    dataset_name,
    load_dataset,
    load_digits,
    load_mnist,
)
from strato.data.mnist import MNIST_FILES, find_mnist_files, read_idx, read_mnist
from strato.data.partition import SCHEMES, dirichlet, iid, partition, shards

__all__ = [
    "DATA_DIR_ENV",
    "MNIST_FILES",
    "SCHEMES",
    "Dataset",
    "dataset_name",
    "dirichlet",
    "find_mnist_files",
    "iid",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "partition",
    "read_idx",
    "read_mnist",
    "shards",
]
