"""The dataset of a run: MNIST from a directory, or scikit-learn's bundled digits.

``load_dataset(data_dir)`` takes ``data_dir``, else the ``STRATO_DATA_DIR``
environment variable, else falls back to scikit-learn's 8×8 digits (1,797 images,
shipped inside scikit-learn, no download), upsampled to 28×28 so that a model built
for MNIST runs on them unchanged. ``Dataset.name`` and ``Dataset.note`` say which
one was used. A directory that is named but holds no MNIST files is an error, never
a silent fallback.

Images are float32 ``(N, 1, H, W)``, scaled to [0, 1] then standardised with the
training set's mean and standard deviation (for MNIST these are the familiar 0.1307
and 0.3081); labels are int64.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from strato.data.mnist import read_mnist
from strato.errors import ConfigError

__all__ = ["DATA_DIR_ENV", "Dataset", "dataset_name", "load_dataset", "load_digits", "load_mnist"]

DATA_DIR_ENV = "STRATO_DATA_DIR"
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

_DIGITS_SEED = 0  # the digits train/test split is fixed, whatever the run's seed
_DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """Train and test images (float32 ``(N, 1, H, W)``) and labels (int64)."""

    name: str  # "mnist" or "digits"
    note: str  # one line for the user: which data, from where, how many
    train_x: F32
    train_y: I64
    test_x: F32
    test_y: I64
    num_classes: int = 10
    mean: float = 0.0  # the standardisation applied to [0, 1] pixels
    std: float = 1.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.train_x.shape[1:])


def _standardise(train: npt.NDArray[np.uint8], test: npt.NDArray[np.uint8],
                 scale: float) -> tuple[F32, F32, float, float]:
    """Pixels / scale, standardised with the training set's statistics, as ``(N, 1, H, W)``.

    Pixels are bytes, so the exact statistics come from a 256-bin histogram (no
    float64 copy of the images); conversion is one float32 copy and two in-place ops.
    """
    counts = np.bincount(train.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / scale
    total = counts.sum()
    mean = float(counts @ values / total) if total else 0.0
    std = float(np.sqrt(counts @ (values - mean) ** 2 / total)) if total else 1.0
    std = std or 1.0

    def convert(images: npt.NDArray[np.uint8]) -> F32:
        x = images.astype(np.float32)
        x *= np.float32(1.0 / (scale * std))
        x -= np.float32(mean / std)
        return x[:, None]

    return convert(train), convert(test), mean, std


def load_mnist(directory: str | os.PathLike[str]) -> Dataset:
    """MNIST from the IDX files in ``directory`` (see ``strato.data.mnist``)."""
    train_images, train_labels, test_images, test_labels = read_mnist(directory)
    x_train, x_test, mean, std = _standardise(train_images, test_images, 255.0)
    note = (f"MNIST from {Path(directory).expanduser()} "
            f"({len(train_labels):,} train / {len(test_labels):,} test images)")
    return Dataset("mnist", note, x_train, train_labels.astype(np.int64), x_test,
                   test_labels.astype(np.int64), 10, mean, std)


def _upsample(images: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    """Nearest-neighbour upsampling by the largest integer factor, centred by padding."""
    side = images.shape[-1]
    factor = size // side
    if factor < 1:
        raise ConfigError(f"cannot fit {side}×{side} digits into {size}×{size}")
    big = images.repeat(factor, axis=1).repeat(factor, axis=2)
    before = (size - side * factor) // 2
    after = size - side * factor - before
    return np.pad(big, ((0, 0), (before, after), (before, after)))


def _digits_arrays() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The 1,797 8×8 digits (values 0..16) and their labels. Read straight from the CSV
    scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``): importing scikit-learn
    costs about a second of CPU in every worker that loads the data, the file 25 ms.
    Through scikit-learn's API if the file is not where it used to be."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("no MNIST directory given (--data-dir or STRATO_DATA_DIR) and "
                          "scikit-learn is not installed for the digits fallback")
    path = Path(next(iter(spec.submodule_search_locations)), "datasets", "data", "digits.csv.gz")
    if path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        return (table[:, :-1].reshape(-1, 8, 8).astype(np.uint8),
                table[:, -1].astype(np.int64))
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return (np.asarray(bunch.images, dtype=np.uint8), np.asarray(bunch.target, dtype=np.int64))


def load_digits(size: int | None = 28) -> Dataset:
    """scikit-learn's digits with a fixed stratified 80/20 split; ``size=None`` keeps 8×8."""
    images, labels = _digits_arrays()
    if size is not None:
        images = _upsample(images, size)
    rng = np.random.default_rng(_DIGITS_SEED)
    test_parts = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_parts.append(members[: round(len(members) * _DIGITS_TEST_FRACTION)])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    x_train, x_test, mean, std = _standardise(images[~is_test], images[is_test], 16.0)
    side = images.shape[-1]
    shape = "8×8" if size is None else f"8×8 upsampled to {side}×{side}"
    note = (f"scikit-learn digits, no MNIST directory given ({int((~is_test).sum()):,} train / "
            f"{int(is_test.sum()):,} test images, {shape})")
    return Dataset("digits", note, x_train, labels[~is_test], x_test, labels[is_test], 10,
                   mean, std)


def dataset_name(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Which dataset ``load_dataset(data_dir)`` loads, without loading it."""
    given = data_dir is not None and str(data_dir) != ""
    return "mnist" if given or os.environ.get(DATA_DIR_ENV, "") else "digits"


def load_dataset(data_dir: str | os.PathLike[str] | None = None, *,
                 digits_size: int | None = 28) -> Dataset:
    """MNIST from ``data_dir`` or ``$STRATO_DATA_DIR``; without either, the digits."""
    if dataset_name(data_dir) == "digits":
        return load_digits(digits_size)
    return load_mnist(data_dir if data_dir is not None and str(data_dir) != ""
                      else os.environ[DATA_DIR_ENV])
