"""A run's data split: each client gets its own rows; warm workers decode the split once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from strato.fl.config import JobConfig
from strato.fl.data import load_job_data, prepare_job_data
from strato.services import embedded


def _counting_gets(svc: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = svc.blobs.get

    def get(key: str, **kw: Any) -> Any:
        calls.append(key)
        return real(key, **kw)

    monkeypatch.setattr(svc.blobs, "get", get)
    return calls


def test_clients_get_disjoint_shares_and_the_split_is_decoded_once_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STRATO_DATA_DIR", raising=False)  # the bundled digits
    cfg = JobConfig(clients=40, clients_per_round=4).validate()
    with embedded(tmp_path / "a") as svc:
        job = prepare_job_data(svc, cfg, None).job_fields
        gets = _counting_gets(svc, monkeypatch)
        shares = [load_job_data(svc, job, f"{i:04d}") for i in range(cfg.clients)]
        assert gets == [job["partition_key"]]  # one decode for 40 clients
        assert [len(s) for s in shares] == [job["client_examples"][f"{i:04d}"]
                                            for i in range(cfg.clients)]
        rows = np.concatenate([s.x.reshape(len(s), -1) for s in shares])
        assert len(np.unique(rows, axis=0)) > 0.9 * len(rows)  # shares do not repeat rows
    # another run (new services, another split) never sees the first run's split
    cfg2 = JobConfig(clients=2, clients_per_round=2).validate()
    with embedded(tmp_path / "b") as svc2:
        job2 = prepare_job_data(svc2, cfg2, None).job_fields
        total = sum(len(load_job_data(svc2, job2, f"{i:04d}")) for i in range(2))
        assert total == sum(job2["client_examples"].values())
        assert len(load_job_data(svc2, job2, "0000")) == job2["client_examples"]["0000"]
