"""CS with the combined mode's wire (``--strategy cs-combined``, ``--bits/--zstd/--kept-rate``)
through the real round loop, and its option checks.

The run test reads the run's own blobs and tables: every payload is a wire frame of
the expected format, the byte counts are the payloads' lengths (and far below what
faithful CS moves for the same models), the run starts from the model its clients
decode, and every new model is what the server computes from the uploads it stored.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fltools import CS_TOML, make_tiny_app, strato, toy_params
from strato import codec
from strato.cli import main
from strato.codec import WireFormat, decode_values, encode_values
from strato.errors import CodecError, ConfigError
from strato.fl import state
from strato.fl.strategies import (
    RoundAggregator,
    check_strategy,
    complement_options,
    download_key,
    wire_seed,
)
from strato.services import embedded
from strato.strategy.complement import (
    encode_download,
    encode_upload,
    kernel_positions,
    prune,
    prune_flat,
    upload_positions,
)

TOML = CS_TOML.format(rounds=3, seed=5)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return make_tiny_app(tmp_path, TOML)


def header(payload: bytes) -> dict[str, Any]:
    """The JSON header of a ``strato.codec`` masked frame (b"STW1", u32 length, JSON)."""
    assert payload[:4] == b"STW1"
    (n,) = struct.unpack("<I", payload[4:8])
    head: dict[str, Any] = json.loads(payload[8 : 8 + n])
    return head


def encodings(params_layout: Any, kernels: str, biases: str = "f32") -> list[str]:
    return [kernels if len(t.shape) >= 2 else biases for t in params_layout.tensors]


def weighted_mean(rows: list[tuple[np.ndarray, float]]) -> np.ndarray:
    total = sum(n * v.astype(np.float64) for v, n in rows)
    return (total / sum(n for _, n in rows)).astype(np.float32)


@pytest.mark.slow
def test_cs_combined_run_moves_coded_payloads_and_merges_them(app: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # η 2: the default (4, tuned on the MNIST example's 10 clients a round) makes this
    # 2-client digits job diverge after round 2; this test is about the mechanism.
    res = strato("run", str(app), "--strategy", "cs-combined", "--eta", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["strategy"] == "cs-combined"
    assert summary["updates_accepted"] == 6 and summary["updates_rejected"] == 0
    for row in summary["per_round"]:
        assert math.isfinite(row["accuracy"]) and math.isfinite(row["loss"])
    assert summary["final_accuracy"] > 0.2  # it learns (chance is 0.1)
    rows = {r["round"]: r for r in summary["per_round"]}

    with embedded(out / "services") as svc:
        models = {r: bytes(svc.blobs.get(state.model_key(r))) for r in range(4)}
        downloads = {r: bytes(svc.blobs.get(download_key(state.model_key(r)))) for r in range(3)}
        updates = {r: [u.value for u in svc.table.query(state.UPDATES, state.round_key(r) + "/")]
                   for r in (1, 2, 3)}
        blobs = {(r, u["client"]): bytes(svc.blobs.get(u["blob"]))
                 for r in updates for u in updates[r]}
    record = {r: codec.decode(b) for r, b in models.items()}
    layout = record[0].layout
    kernels = kernel_positions(layout)

    # Round 1's download is the 8-bit dense model + zstd, and the run starts from exactly
    # what the clients decode from it (so their deltas apply to the model they got).
    head = header(downloads[0])
    assert head["mask"] == "all" and head["zstd"] is True
    assert head["enc"] == encodings(layout, "a8")
    assert np.array_equal(decode_values(downloads[0]).values, record[0].flat())
    for t in layout.tensors:
        if len(t.shape) >= 2:
            assert np.unique(record[0].flat()[t.offset // 4 : t.end // 4]).size <= 256

    faithful_up = faithful_down = 0
    dense = codec.encoded_size(record[0])
    for r in (1, 2, 3):
        base = record[r - 1]  # the exact model the server sent this round
        down = downloads[r - 1]
        if r > 1:
            # a 4-bit zero-code sparse model: no bitmap; code 0 is exactly the pruned set
            head = header(down)
            assert head["mask"] == "implicit" and head["zstd"] is True
            assert head["enc"] == encodings(layout, "z4")
            got = decode_values(down, expect=layout).to_params().flat()
            assert np.array_equal(got[kernels] == 0, base.flat()[kernels] == 0)
            assert np.array_equal(got[~kernels], base.flat()[~kernels])  # biases float32
            for t, q in zip(layout.tensors, head["q"], strict=True):
                if q is not None:  # kernels: within one step of 7 magnitude levels
                    sl = slice(t.offset // 4, t.end // 4)
                    assert np.abs(got[sl] - base.flat()[sl]).max() <= (q[1] - q[0]) / 6 + 1e-6
        rows_r = []
        for u in updates[r]:
            blob = blobs[(r, u["client"])]
            head = header(blob)  # a dense delta: 8-bit in round 1, 4-bit after, + zstd
            assert head["mask"] == "all" and head["zstd"] is True
            assert head["enc"] == encodings(layout, "a8" if r == 1 else "a4")
            assert u["bytes_up"] == len(blob) and u["bytes_down"] == len(down)
            rows_r.append((base.flat() + decode_values(blob, expect=layout).values,
                           float(u["num_examples"])))
        assert rows[r]["bytes_up"] == sum(len(blobs[(r, u["client"])]) for u in updates[r])
        assert rows[r]["bytes_down"] == 2 * len(down)

        # The new model is the server's merge of those very uploads, then per-layer pruning:
        # kept weights move by kept_rate times their mean change, the complement
        # regrows at η times its mean, biases take the mean; round 1 is FedAvg.
        cfg = complement_options({"eta": 2}, "cs-combined").config
        assert cfg.eta == 2
        assert cfg.kept_rate is not None
        mean = weighted_mean(rows_r)
        w = base.flat()
        if r == 1:
            ref = mean.copy()
        else:
            ref = w.copy()
            kept, grow = kernels & (w != 0), kernels & (w == 0)
            ref[kept] = w[kept] + cfg.kept_rate * (mean[kept] - w[kept])
            ref[grow] = cfg.eta * mean[grow]
            ref[~kernels] = mean[~kernels]
        prune_flat(ref, layout, 0.5)
        assert np.allclose(record[r].flat(), ref, rtol=1e-5, atol=1e-6), r

        # What faithful CS would have moved for the same models (float32, no zstd).
        if r == 1:
            faithful_up += 2 * dense
            faithful_down += 2 * len(models[0])
        else:
            send = upload_positions(base, kernels)
            faithful_up += 2 * encode_values(layout, np.zeros(int(send.sum()), np.float32),
                                             send, WireFormat(mask="shared")).nbytes
            faithful_down += 2 * encode_download(base).nbytes
    assert summary["bytes_up"] == sum(rows[r]["bytes_up"] for r in rows)
    assert summary["bytes_up"] * 3 < faithful_up
    assert summary["bytes_down"] * 3 < faithful_down
    assert (summary["bytes_up"] + summary["bytes_down"]) * 4 < faithful_up + faithful_down


# --- the aggregator's half, without services --------------------------------------------


def test_a_dense_client_still_works_and_a_sparse_delta_is_refused() -> None:
    """A client that knows nothing of the codec (dense weights) is merged as weights."""
    w_s, _ = prune(toy_params(1), 0.5)
    layout = w_s.layout
    opts = complement_options({}, "cs-combined")
    agg = RoundAggregator("cs-combined", {}, layout, 2, seed=7)
    trained = toy_params(2)
    dense = agg.decode_update(codec.encode(trained).payload, lambda: w_s).flat()
    coded = agg.decode_update(
        opts.wire.encode_upload(w_s, trained, first=False, seed=1).payload, lambda: w_s
    ).flat()
    assert np.array_equal(dense, trained.flat())
    step = np.abs(trained.flat() - w_s.flat()).max() / 7  # 4-bit affine over the delta's range
    assert np.abs(coded - trained.flat()).max() <= 2 * step
    with pytest.raises(CodecError):  # a complement where the round expects a dense delta
        agg.decode_update(encode_upload(w_s, trained).payload, lambda: w_s)
    # the download is seeded from (run seed, round): deterministic, so two closers agree
    assert agg.download_payload(w_s) == agg.download_payload(w_s)
    other = RoundAggregator("cs-combined", {}, layout, 2, seed=8).download_payload(w_s)
    assert other != agg.download_payload(w_s)
    assert len({wire_seed(5, 2, c) for c in ("a", "b", "download")} |
               {wire_seed(5, 3, "a"), wire_seed(6, 2, "a")}) == 5


def test_quantized_faithful_cs_uploads_the_quantized_complement() -> None:
    """bits 8 without kept_rate: the faithful structure, quantized (kernels 8-bit)."""
    w_s, _ = prune(toy_params(1), 0.5)
    wire = complement_options({"bits": 8}).wire
    received = decode_values(wire.encode_download(w_s, first=False, seed=3).payload).to_params()
    send = upload_positions(w_s, kernel_positions(w_s.layout))
    assert np.array_equal(upload_positions(received, kernel_positions(w_s.layout)), send)
    payload = wire.encode_upload(received, toy_params(2), first=False, seed=4).payload
    assert header(payload)["mask"] == "shared"
    agg = RoundAggregator("cs", {"bits": 8}, w_s.layout, 2)
    full = agg.decode_update(payload, lambda: w_s).flat()
    assert not full[~send].any()
    assert np.allclose(full[send], toy_params(2).flat()[send], atol=0.05)


# --- options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--strategy", "cs", "--bits", "5"], "bits must be 32, 8 or 4"),
        (["--strategy", "cs-combined", "--bits", "4.5"], "bits"),
        (["--strategy", "cs", "--zstd", "23"], "zstd must be a level"),
        (["--strategy", "cs-combined", "--zstd", "-1"], "zstd"),
        (["--strategy", "cs", "--kept-rate", "-1"], "kept_rate"),
        (["--strategy", "cs-combined", "--kept-rate", "nan"], "kept_rate"),
        (["--strategy", "cs-combined", "--eta", "inf"], "eta"),
        (["--strategy", "cs-combined", "--sparsity", "1"], "sparsity"),
        (["--bits", "4"], "bits"),  # the app's strategy is fedavg
    ],
)
def test_bad_options_are_one_line_errors(
    app: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    assert main(["run", str(app), *args, "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("strato: error:") and needle in lines[0], lines
    assert not (tmp_path / "o").exists()  # refused before the run was set up


def test_bad_toml_option_is_a_one_line_error_from_the_command(app: Path, tmp_path: Path) -> None:
    (app / "strato.toml").write_text(TOML + '\n[strategy]\nname = "cs"\nbits = "4"\n')
    res = strato("run", str(app), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "bits" in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


def test_options_resolve_the_preset_and_overrides() -> None:
    combined = complement_options({}, "cs-combined")
    assert (combined.config.sparsity, combined.config.eta, combined.config.kept_rate) == (
        0.5, 4.0, 0.5)
    assert combined.wire.down == WireFormat(bits=4, mask="implicit", zstd_level=19)
    assert combined.wire.first_down == WireFormat(bits=8, zstd_level=19)
    assert combined.wire.deltas
    tuned = complement_options({"eta": 3.0, "bits": 8, "zstd": 0, "kept_rate": 0}, "cs-combined")
    assert tuned.config.eta == 3.0 and tuned.config.kept_rate is None
    assert tuned.wire.down == WireFormat(bits=8, mask="implicit") and not tuned.wire.deltas
    faithful = complement_options({"sparsity": 0.6})
    assert faithful.wire.first_down is None and faithful.wire.down == WireFormat(mask="bitmap")
    with pytest.raises(ConfigError, match="unknown option level"):
        check_strategy("cs-combined", {"level": 3})


def test_zstd_without_zstandard_names_the_extra(
    app: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` now fails
    assert main(["run", str(app), "--strategy", "cs-combined", "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'strato[compress]'" in lines[0], lines
    assert not (tmp_path / "o").exists()
    check_strategy("cs-combined", {"zstd": 0})  # without zstd it needs no package
    with pytest.raises(ConfigError, match="zstandard"):
        check_strategy("cs", {"zstd": 3})
