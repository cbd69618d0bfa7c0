"""Complement Sparsification: exact per-layer pruning, what a client sends, server merge."""

from __future__ import annotations

import numpy as np
import pytest

from fltools import cs_model
from strato import codec
from strato.codec import WireFormat, decode_values, encode_values
from strato.errors import CodecError, ConfigError
from strato.params import Params
from strato.strategy.complement import (
    client_complement,
    decode_download,
    decode_upload,
    encode_download,
    encode_upload,
    kernel_positions,
    prune,
    upload_positions,
)

model = cs_model


KERNELS = ("conv.weight", "fc.weight", "out.weight")


def test_kernels_are_tensors_of_two_or_more_dimensions() -> None:
    p = model()
    k = kernel_positions(p.layout)
    for spec in p.layout.tensors:
        seg = k[spec.offset // 4 : spec.end // 4]
        assert seg.all() if spec.name in KERNELS else not seg.any()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_pruning_is_per_layer_and_exact(sparsity: float) -> None:
    # fc is 1000x smaller than the rest: a global threshold would wipe it out entirely.
    p = model(scale_fc=1e-3)
    pruned, keep = prune(p, sparsity)
    for spec in p.layout.tensors:
        orig, got = p[spec.name].ravel(), pruned[spec.name].ravel()
        kept = keep[spec.offset // 4 : spec.end // 4]
        if spec.name not in KERNELS:  # biases are never pruned
            assert kept.all() and np.array_equal(got, orig)
            continue
        n_pruned = int(sparsity * orig.size)
        assert int((~kept).sum()) == n_pruned
        assert np.array_equal(got[kept], orig[kept]) and not got[~kept].any()
        # numpy reference: exactly the n smallest magnitudes of this layer are gone
        ref = np.sort(np.abs(orig))
        if n_pruned:
            assert np.abs(orig[~kept]).max() <= ref[n_pruned - 1]
            assert np.abs(orig[kept]).min() >= ref[n_pruned - 1] if kept.any() else True
        assert set(np.flatnonzero(~kept)) == set(np.argsort(np.abs(orig), kind="stable")[:n_pruned])
    assert np.array_equal(p.flat(), model(scale_fc=1e-3).flat())  # the input is untouched


def test_pruning_breaks_ties_deterministically() -> None:
    p = Params.from_arrays({"w": np.ones((4, 4), np.float32)})
    _, keep = prune(p, 0.5)
    assert np.array_equal(np.flatnonzero(~keep), np.arange(8))


def test_client_sends_exactly_its_trained_values_where_the_received_model_was_zero() -> None:
    received, keep = prune(model(1), 0.6)
    trained = model(2)  # every weight moved, the kept ones too
    values = client_complement(received, trained)
    kernels = kernel_positions(trained.layout)
    send = upload_positions(received, kernels)
    # exactly the kernel positions that are zero in the received model, and every bias
    zero_in_received = (received.flat() == 0) & kernels
    assert np.array_equal(send, zero_in_received | ~kernels)
    assert np.array_equal(send & kernels, ~keep & kernels)  # = what the server pruned
    # the trained values there, in layout order
    assert np.array_equal(values, trained.flat()[send])
    # and nothing else: changing any kept weight changes nothing that is sent
    other = trained.copy()
    other.flat()[keep & kernels] += 1.0
    assert np.array_equal(client_complement(received, other), values)
    # on the wire: values only, against the shared mask (no bitmap, no indices)
    enc = encode_upload(received, trained)
    header = int.from_bytes(enc.payload[4:8], "little") + 8
    assert enc.nbytes - header == 4 * int(send.sum())
    assert np.array_equal(decode_values(enc.payload, shared_mask=send).values, values)
    # the server reads it back against its own w_s: the complement in place, zero elsewhere
    full = decode_upload(enc.payload, received)
    assert np.array_equal(full[send], values) and not full[~send].any()


def test_a_kept_weight_that_is_exactly_zero_is_part_of_the_complement() -> None:
    # The authors' client takes its mask from the received values (w != 0), so a zero
    # anywhere in w_s is sent back; client and server agree because both read w_s.
    received, _ = prune(model(1), 0.5)
    flat = received.flat()
    kept_pos = int(np.flatnonzero(flat[: 72] != 0)[0])  # a kept conv weight
    flat[kept_pos] = 0.0
    trained = model(2)
    kernels = kernel_positions(received.layout)
    assert upload_positions(received, kernels)[kept_pos]
    enc = encode_upload(received, trained)
    assert decode_upload(enc.payload, received)[kept_pos] == trained.flat()[kept_pos]


def test_download_carries_w_s_exactly_and_its_zeros_cost_one_bit() -> None:
    w_s, _ = prune(model(4), 0.7)
    enc = encode_download(w_s)
    got = decode_download(enc.payload, expect=w_s.layout)
    assert np.array_equal(got.flat(), w_s.flat())
    nonzero = int((w_s.flat() != 0).sum())
    header = int.from_bytes(enc.payload[4:8], "little") + 8
    assert enc.nbytes - header == 4 * nonzero + (w_s.layout.numel + 7) // 8
    # a dense safetensors download (round 1) decodes too
    assert np.array_equal(decode_download(codec.encode(w_s).payload).flat(), w_s.flat())


def test_upload_must_carry_exactly_the_complement() -> None:
    w_s, _ = prune(model(1), 0.5)
    trained = model(2)
    kernels = kernel_positions(w_s.layout)
    send = upload_positions(w_s, kernels)
    # a complement of another sparsity does not fit this round's mask (values only travel,
    # so what can be checked is the count per tensor)
    other_w_s, _ = prune(model(1), 0.3)
    with pytest.raises(CodecError):
        decode_upload(encode_upload(other_w_s, trained).payload, w_s)
    # a bitmap payload with the right mask is fine, with another one it is not
    good = encode_values(w_s.layout, trained.flat()[send], send, WireFormat(mask="bitmap"))
    assert np.array_equal(decode_upload(good.payload, w_s)[send], trained.flat()[send])
    dense_wire = encode_values(w_s.layout, trained.flat(), None)
    with pytest.raises(CodecError):
        decode_upload(dense_wire.payload, w_s)
    # a dense safetensors upload (a client that knows nothing of CS) is masked server-side
    full = decode_upload(codec.encode(trained).payload, w_s)
    assert np.array_equal(full[send], trained.flat()[send]) and not full[~send].any()
    with pytest.raises(ConfigError):
        encode_upload(w_s, trained, WireFormat(mask="bitmap"))


def test_dense_first_round_sends_everything() -> None:
    trained = model(3)
    assert np.array_equal(client_complement(None, trained), trained.flat())
