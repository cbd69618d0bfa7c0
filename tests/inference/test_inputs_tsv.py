from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from strato.errors import ConfigError, NotFound
from strato.inference import tsv
from strato.inference.inputs import binarize_images, mnist_inputs, read_mnist_images
from strato.inference.network import generate_network


def test_binarize_pads_and_thresholds() -> None:
    img = np.zeros((1, 28, 28), dtype=np.uint8)
    img[0, 0, 0] = 154  # above 153: lit
    img[0, 0, 1] = 153  # not above: dark
    x = binarize_images(img, 1024)
    assert x.shape == (1, 1024)
    assert x.nnz == 1 and x.indices[0] == 2 * 32 + 2  # padded by 2 on each side
    big = binarize_images(img, 4096)  # 64×64: each pixel becomes 2×2
    assert big.nnz == 4 and sorted(big.indices.tolist()) == [260, 261, 324, 325]


def test_mnist_loader_reads_idx(fake_mnist: Path) -> None:
    imgs = read_mnist_images(fake_mnist)
    assert imgs.shape == (64, 28, 28)
    x = mnist_inputs(1024, 10, fake_mnist)
    assert x.shape == (10, 1024) and np.all(x.data == 1.0)
    with pytest.raises(ConfigError):
        mnist_inputs(1024, 65, fake_mnist)
    with pytest.raises(NotFound):
        read_mnist_images(fake_mnist / "nowhere")


def test_network_images_categories_roundtrip(tmp_path: Path, make_inputs) -> None:  # type: ignore[no-untyped-def]
    net = generate_network(1024, 3, seed=5)
    tsv.write_network(tmp_path, net)
    back = tsv.read_network(tmp_path, 1024)
    assert back.depth == 3 and back.biases == net.biases
    for a, b in zip(net.layers, back.layers, strict=True):
        assert (a != b).nnz == 0
    first = (tmp_path / "n1024-l1.tsv").read_text().splitlines()[0].split("\t")
    assert first == ["1", "1", "0.0625"]  # 1-based, challenge value
    x = make_inputs(1024, 5, 20)
    tsv.write_images(tmp_path / "img.tsv", x)
    assert (tsv.read_images(tmp_path / "img.tsv", 1024, 5) != x).nnz == 0
    cats = np.array([0, 3, 9])
    tsv.write_categories(tmp_path / "c.tsv", cats)
    assert (tmp_path / "c.tsv").read_text() == "1\n4\n10\n"
    assert np.array_equal(tsv.read_categories(tmp_path / "c.tsv"), cats)


def test_malformed_tsv_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.tsv").write_text("1\t2\n")
    with pytest.raises(ConfigError):
        tsv.read_matrix(tmp_path / "bad.tsv")
    (tmp_path / "zero.tsv").write_text("0\t1\t1.0\n")
    with pytest.raises(ConfigError):
        tsv.read_matrix(tmp_path / "zero.tsv")
