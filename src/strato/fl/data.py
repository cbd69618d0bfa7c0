"""A run's data: which dataset, how it is split among clients, each client's share.

The coordinator loads the dataset once to partition it and stores the partition
(index arrays, as safetensors) in the blob store; each client function loads the
dataset in its worker once, keeps it warm, and takes its own rows.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from strato.codec import decode, encode
from strato.data import load_dataset, load_digits, partition
from strato.fl.app import DataInfo, Dataset
from strato.fl.config import JobConfig
from strato.params import Params
from strato.services import Services

__all__ = ["PreparedData", "load_job_data", "prepare_job_data"]

PARTITION_KEY = "job/partition.safetensors"
TEST_CLIENT = "__test__"

_cache: dict[str, Any] = {}
# The decoded partition per (services, key): a warm worker serves many clients, and
# decoding the partition (a header entry per client) for each of them made a round
# quadratic in the number of clients. The blob is written once, when the job is set up.
_partitions: dict[tuple[int, str], tuple[weakref.ref[Services], Params]] = {}


@dataclass(frozen=True)
class PreparedData:
    info: DataInfo
    job_fields: dict[str, Any]


def _load(data_dir: str | None) -> Any:
    """The job's dataset: MNIST from ``data_dir``, or the digits when the job has none.
    Not ``$STRATO_DATA_DIR`` here: a worker must load what the job recorded, whatever
    its own environment says (a Ray node's may differ from the run process's)."""
    key = data_dir or ""
    if key not in _cache:
        _cache[key] = load_dataset(data_dir) if data_dir else load_digits()
    return _cache[key]


def prepare_job_data(svc: Services, cfg: JobConfig, data_dir: str | None) -> PreparedData:
    resolved = data_dir or os.environ.get("STRATO_DATA_DIR") or None
    if resolved:
        resolved = os.path.abspath(resolved)
    ds = _load(resolved)
    parts = partition(
        ds.train_y, cfg.clients, cfg.partition, seed=cfg.seed, alpha=cfg.dirichlet_alpha
    )
    arrays = {f"{i:04d}": np.asarray(idx, dtype=np.int64) for i, idx in enumerate(parts)}
    svc.blobs.put(PARTITION_KEY, encode(Params.from_arrays(arrays)).payload)
    info = DataInfo(ds.name, tuple(int(d) for d in ds.train_x.shape[1:]), int(ds.num_classes))
    return PreparedData(
        info,
        {
            "data_dir": resolved,
            "dataset": ds.name,
            "dataset_note": ds.note,
            "input_shape": list(info.input_shape),
            "num_classes": info.num_classes,
            "partition_key": PARTITION_KEY,
            "client_examples": {k: len(v) for k, v in arrays.items()},
        },
    )


def load_job_data(svc: Services, job: dict[str, Any], client: str) -> Dataset:
    """The client's share of the training data, or the test set for ``__test__``."""
    ds = _load(job["data_dir"])
    info = DataInfo(job["dataset"], tuple(job["input_shape"]), int(job["num_classes"]))
    if client == TEST_CLIENT:
        return Dataset(ds.test_x, ds.test_y, info)
    idx = np.array(_partition(svc, str(job["partition_key"]))[client])
    return Dataset(ds.train_x[idx], ds.train_y[idx], info)


def _partition(svc: Services, key: str) -> Params:
    hit = _partitions.get((id(svc), key))
    if hit is not None and hit[0]() is svc:
        return hit[1]
    parts = decode(svc.blobs.get(key))
    _partitions[(id(svc), key)] = (weakref.ref(svc), parts)
    return parts
