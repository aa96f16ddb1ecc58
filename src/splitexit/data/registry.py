"""The registered data sets by name: :func:`list_datasets` and :func:`load_dataset`."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from splitexit.errors import InputError
from splitexit.registry import Registry

from .canvas import fashion_canvas_dataset, mnist_canvas_dataset
from .cluttered import cluttered_fashion_dataset, cluttered_mnist_dataset
from .sources import digits_dataset, fashion_mnist_dataset, mnist5k_dataset, signals_dataset
from .splits import Dataset

__all__ = ["DATASETS", "list_datasets", "load_dataset", "register_dataset"]

#: data set loaders ``fn(calib_fraction, seed, root) -> Dataset``, by name
DATASETS: Registry[Callable[[float, int, str | os.PathLike | None], Dataset]] = Registry(
    "data set")
for _name, _loader in (("digits", digits_dataset), ("mnist5k", mnist5k_dataset),
                       ("fashion-mnist", fashion_mnist_dataset), ("signals", signals_dataset)):
    DATASETS.add(_name, _loader)
DATASETS.add("cluttered-fashion", cluttered_fashion_dataset)
DATASETS.add("cluttered-mnist", cluttered_mnist_dataset)
DATASETS.add("fashion-canvas", fashion_canvas_dataset)
DATASETS.add("mnist-canvas", mnist_canvas_dataset)


def register_dataset(name: str):
    """Decorator adding a loader ``fn(calib_fraction, seed, root) -> Dataset`` under ``name``
    (refuses a name registered twice)."""
    return DATASETS.register(name)


def _check_fraction(calib_fraction: float) -> float:
    try:
        value = float(calib_fraction)
    except (TypeError, ValueError):
        raise InputError(
            f"calib_fraction must be a number in (0, 1), got {calib_fraction!r}."
        ) from None
    if not 0.0 < value < 1.0:
        raise InputError(
            f"calib_fraction must lie strictly between 0 and 1, got {calib_fraction!r}."
        )
    return value


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`.

    Returns:
        The registered names, sorted.
    """
    return DATASETS.list()


def load_dataset(
    name: str,
    *,
    calib_fraction: float = 0.1,
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> Dataset:
    """Load a data set with its train, calibration and test splits.

    Args:
        name: One of :func:`list_datasets` (case-insensitive; ``_`` and ``-`` are the same).
        calib_fraction: Fraction of the (non-test) training data held out as the calibration
            split, stratified by class; strictly between 0 and 1.
        seed: Seed of the train / calibration split. The test split never depends on it.
        root: Directory holding the files of a file-based data set (``fashion-mnist``);
            defaults to ``$SPLITEXIT_FASHION_MNIST_DIR`` or
            ``/usr/share/datasets/fashion-mnist``. Data sets shipped inside Python packages or
            generated (``digits``, ``mnist5k``, ``signals``) ignore it.

    Returns:
        The :class:`Dataset`; its tensors are fresh copies, safe to modify.

    Raises:
        InputError: For an unknown name or a ``calib_fraction`` out of range.
        DatasetMissingError: If the files of ``fashion-mnist`` are not installed; the message
            gives the exact install command.
        CorruptFileError: If a data file is truncated or corrupt.
    """
    if not isinstance(name, str):
        raise InputError(f"data set name must be a string, got {type(name).__name__}.")
    loader = DATASETS.get(name.strip().lower().replace("_", "-"))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}.")
    return loader(_check_fraction(calib_fraction), int(seed), root)
