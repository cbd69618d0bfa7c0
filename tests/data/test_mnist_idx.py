"""MNIST IDX loading (synthetic files, and the real ones when present) and fallbacks."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from strato.data import DATA_DIR_ENV, MNIST_FILES, load_dataset, read_idx
from strato.errors import ConfigError

REAL_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist(root: Path, n_train: int = 30, n_test: int = 12, gz: bool = True,
                seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, stem in MNIST_FILES.items():
        raw = idx_bytes(arrays[key])
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / stem).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_reads_synthetic_idx_files(tmp_path: Path, gz: bool) -> None:
    raw = write_mnist(tmp_path / "mnist", gz=gz)
    ds = load_dataset(tmp_path / "mnist")
    assert ds.name == "mnist" and "MNIST" in ds.note
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (12, 1, 28, 28)
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.train_y, raw["train_labels"])
    np.testing.assert_array_equal(ds.test_y, raw["test_labels"])
    # Standardised with the training set's statistics, pixel for pixel.
    pixels = raw["train_images"] / 255.0
    assert ds.mean == pytest.approx(pixels.mean()) and ds.std == pytest.approx(pixels.std())
    np.testing.assert_allclose(ds.train_x[:, 0], (pixels - ds.mean) / ds.std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.test_x[:, 0], (raw["test_images"] / 255.0 - ds.mean) / ds.std,
                               rtol=1e-5, atol=1e-5)


def test_read_idx_handles_other_types_and_dotted_names(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    (tmp_path / "x.idx").write_bytes(idx_bytes(arr, code=0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), arr)
    raw = write_mnist(tmp_path / "plain", gz=False)
    dotted = tmp_path / "dotted"
    dotted.mkdir()
    for path in (tmp_path / "plain").iterdir():
        (dotted / path.name.replace("-idx", ".idx")).write_bytes(path.read_bytes())
    np.testing.assert_array_equal(load_dataset(dotted).test_y, raw["test_labels"])


def test_missing_and_empty_directories_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("not mnist")
    with pytest.raises(ConfigError, match="holds no MNIST files") as info:
        load_dataset(tmp_path / "empty")
    assert "\n" not in str(info.value)


def test_incomplete_or_corrupt_files_are_config_errors(tmp_path: Path) -> None:
    root = tmp_path / "m"
    write_mnist(root)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match="lacks MNIST file"):
        load_dataset(root)

    write_mnist(root)  # labels file carrying an images magic number
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((12, 1, 1), np.uint8))))
    with pytest.raises(ConfigError, match="magic number 2051, expected 2049"):
        load_dataset(root)

    write_mnist(root)  # truncated images
    data = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes())
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(ConfigError, match="header"):
        load_dataset(root)

    write_mnist(root)  # 12 test images but 11 labels
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(11, np.uint8))))
    with pytest.raises(ConfigError, match="12 images but 11 labels"):
        load_dataset(root)

    write_mnist(root)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(ConfigError, match="cannot read"):
        load_dataset(root)


def test_environment_variable_names_the_directory(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist(tmp_path / "env", n_train=7, n_test=3, seed=1)
    write_mnist(tmp_path / "arg", n_train=5, n_test=2, seed=2)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert len(load_dataset().train_y) == 7
    assert len(load_dataset(None).train_y) == 7
    assert len(load_dataset(str(tmp_path / "arg")).train_y) == 5  # the argument wins
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset()


def test_digits_fallback_when_no_directory_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sklearn")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    ds = load_dataset()
    assert ds.name == "digits" and "digits" in ds.note
    assert ds.train_x.shape[1:] == (1, 28, 28) and ds.test_x.shape[1:] == (1, 28, 28)
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert abs(float(ds.train_x.mean())) < 1e-4 and float(ds.train_x.std()) == pytest.approx(1.0)
    # Deterministic, and stratified: every label sits in both splits in proportion.
    again = load_dataset()
    assert np.array_equal(ds.train_x, again.train_x) and np.array_equal(ds.test_y, again.test_y)
    share = np.bincount(ds.test_y, minlength=10) / np.bincount(
        np.concatenate([ds.train_y, ds.test_y]), minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.02)
    small = load_dataset(digits_size=None)
    assert small.train_x.shape[1:] == (1, 8, 8)


def test_real_mnist_when_present() -> None:
    if not (REAL_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no MNIST at {REAL_MNIST}")
    ds = load_dataset(REAL_MNIST)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.mean == pytest.approx(0.1307, abs=1e-4) and ds.std == pytest.approx(0.3081, abs=1e-4)
    assert sorted(np.unique(ds.train_y).tolist()) == list(range(10))


def test_digits_read_from_the_file_equal_scikit_learns_and_load_without_importing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sk = pytest.importorskip("sklearn.datasets")
    from strato.data import datasets

    images, labels = datasets._digits_arrays()
    bunch = sk.load_digits()
    assert np.array_equal(images, bunch.images.astype(np.uint8))
    assert np.array_equal(labels, bunch.target) and labels.dtype == np.int64
    # a fresh interpreter loads the digits without importing scikit-learn
    code = ("import sys; from strato.data.datasets import load_dataset; "
            "ds = load_dataset(); print(ds.name, 'sklearn' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != DATA_DIR_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout.split()
    assert out == ["digits", "False"]


def test_digits_fall_back_to_scikit_learns_api_and_say_when_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    pytest.importorskip("sklearn")
    import importlib.util

    from strato.data import datasets

    expected = datasets._digits_arrays()
    real_find_spec = importlib.util.find_spec

    def moved(name: str, *args: object) -> object:  # the CSV is not where it used to be
        spec = real_find_spec(name)
        if name == "sklearn" and spec is not None:
            spec = importlib.util.spec_from_file_location("sklearn", tmp_path / "x.py",
                                                          submodule_search_locations=[str(tmp_path)])
        return spec

    monkeypatch.setattr(datasets.importlib.util, "find_spec", moved)
    got = datasets._digits_arrays()
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(ConfigError, match="scikit-learn is not installed"):
        load_dataset()
