"""`strato run --strategy cs`: Complement Sparsification through the real round loop.

Two rounds on the digits (fast, offline). The checks read the run's own blobs and
tables: what each client uploaded in round 2 is exactly a complement payload (values
at the kernel positions that are zero in the model it received, plus biases; no
mask, no indices), the byte counts are those payloads' lengths, and the server's new
model is ``prune(w_s + η · mean complement)`` of those very uploads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fltools import CS_TOML, make_tiny_app, strato
from strato import codec
from strato.codec import WireFormat, decode_values, encode_values
from strato.fl import state
from strato.fl.strategies import download_key
from strato.services import embedded
from strato.strategy.complement import (
    decode_upload,
    kernel_positions,
    merge,
    prune_flat,
    upload_positions,
)

TOML = CS_TOML.format(rounds=2, seed=3)


@pytest.fixture
def cs_app(tmp_path: Path) -> Path:
    return make_tiny_app(tmp_path, TOML)


@pytest.mark.slow
def test_cs_run_uploads_exactly_the_complement(cs_app: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = strato("run", str(cs_app), "--strategy", "cs", "--sparsity", "0.6", "--eta", "2.0",
                 "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["strategy"] == "cs"
    assert summary["config"]["strategy_options"] == {"sparsity": 0.6, "eta": 2.0}
    assert summary["updates_accepted"] == 4 and summary["updates_rejected"] == 0
    rows = {r["round"]: r for r in summary["per_round"]}

    with embedded(out / "services") as svc:
        initial_blob = bytes(svc.blobs.get(state.model_key(0)))
        initial = codec.decode(initial_blob)
        w_s = codec.decode(bytes(svc.blobs.get(state.model_key(1))))
        new = codec.decode(bytes(svc.blobs.get(state.model_key(2))))
        download = bytes(svc.blobs.get(download_key(state.model_key(1))))
        updates = {r: [u.value for u in svc.table.query(state.UPDATES, state.round_key(r) + "/")]
                   for r in (1, 2)}
        blobs = {u["client"]: bytes(svc.blobs.get(u["blob"])) for u in updates[2]}
    layout = initial.layout
    kernels = kernel_positions(layout)

    # Round 1 is dense: every client downloads and uploads the dense model.
    dense = codec.encoded_size(initial)
    assert [u["bytes_up"] for u in updates[1]] == [dense, dense]
    assert rows[1]["bytes_up"] == 2 * dense
    assert rows[1]["bytes_down"] == 2 * len(initial_blob)

    # After round 1 the model is pruned per layer: exactly floor(s · numel) zeros per kernel.
    for spec in layout.tensors:
        seg = w_s.flat()[spec.offset // 4 : spec.end // 4]
        if len(spec.shape) >= 2:
            assert int((seg == 0).sum()) == int(0.6 * spec.numel), spec.name

    # Round 2: each client fetched the sparse download and sent values only, at the
    # complement positions; the byte counts are the payloads' lengths.
    send = upload_positions(w_s, kernels)
    expected_up = encode_values(layout, np.zeros(int(send.sum()), np.float32), send,
                                WireFormat(mask="shared")).nbytes
    # values only: 4 bytes per complement position and a small header, no mask
    assert 0 < expected_up - 4 * int(send.sum()) < 2048
    assert int(send.sum()) == int((~kernels).sum()) + int((w_s.flat()[kernels] == 0).sum())
    for u in updates[2]:
        assert u["bytes_down"] == len(download)
        assert u["bytes_up"] == len(blobs[u["client"]]) == expected_up
        values = decode_values(blobs[u["client"]], shared_mask=send, expect=layout).values
        assert values.size == int(send.sum())
    assert rows[2]["bytes_up"] == 2 * expected_up
    assert rows[2]["bytes_down"] == 2 * len(download) < rows[1]["bytes_down"]

    # The server's round-2 model is prune(w_s + η · weighted mean of the complements).
    total, weight = np.zeros(layout.numel), 0.0
    for u in updates[2]:
        total += u["num_examples"] * decode_upload(blobs[u["client"]], w_s).astype(np.float64)
        weight += u["num_examples"]
    ref = merge(w_s.flat(), (total / weight).astype(np.float32), kernels, 2.0)
    prune_flat(ref, layout, 0.6)
    assert np.allclose(new.flat(), ref, rtol=1e-5, atol=1e-6)
    kept = kernels & (w_s.flat() != 0) & (new.flat() != 0)
    assert np.array_equal(new.flat()[kept], w_s.flat()[kept])  # kept weights do not move


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sparsity", "1.0"], "sparsity"),
        (["--sparsity", "-0.1"], "sparsity"),
        (["--eta", "0"], "eta"),
        (["--eta", "-1.5"], "eta"),
        (["--sparsity", "nan"], "sparsity"),
    ],
)
def test_bad_cs_options_are_one_line_errors(
    cs_app: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    res = strato("run", str(cs_app), "--strategy", "cs", *args, "--out", str(tmp_path / "o"))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "o").exists()  # refused before the run was set up


def test_sparsity_needs_the_cs_strategy(cs_app: Path, tmp_path: Path) -> None:
    res = strato("run", str(cs_app), "--sparsity", "0.5", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "sparsity" in res.stderr and len(res.stderr.strip().splitlines()) == 1
