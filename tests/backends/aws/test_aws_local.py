"""The local AWS: it starts, answers, runs Step Functions executions, and leaves nothing."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def test_a_local_aws_starts_and_stops_without_leftovers(tmp_path: Path) -> None:
    pytest.importorskip("moto")
    from strato.backends.aws.local import LocalAws
    from strato.services import FunctionSpec, connect

    here = str(Path(__file__).resolve().parent)
    local = LocalAws(tmp_path / "local", keep_alive_s=60).start()
    pids = [p.pid for p in local._procs]
    try:
        with urllib.request.urlopen(f"{local.moto_url}/moto-api/config", timeout=10) as reply:
            assert reply.status in (200, 201)
        with connect(local.config(tmp_path / "root", "life-")) as svc:
            svc.runtime.register(
                FunctionSpec("d", "aws_handlers:describe", env={"PYTHONPATH": here})
            )
            worker_env = json.loads(svc.runtime.invoke("d", {})["services"])
            assert worker_env["endpoint_url"] == local.endpoint_url
        assert all(alive(pid) for pid in pids)
        tasks = Path(f"/proc/{pids[1]}/task").iterdir()
        children = [c for t in tasks for c in (t / "children").read_text().split()]
        assert children  # the front still keeps its warm Lambda worker
    finally:
        local.stop()
    assert not any(alive(pid) for pid in pids + [int(c) for c in children])
    assert (tmp_path / "local" / "moto.log").exists()  # a given workdir is kept


def test_open_part_knows_the_five_primitives(tmp_path: Path) -> None:
    pytest.importorskip("boto3")
    from strato.backends.aws import open_part
    from strato.services import Services

    services = Services({"backend": "aws", "root": str(tmp_path), "region": "eu-west-1"})
    with pytest.raises(ValueError, match="bus, blobs"):
        open_part("queue", services)
