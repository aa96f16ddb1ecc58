"""Splits and data sets: the :class:`Split` and :class:`Dataset` containers, the stratified
seeded index split behind every train / calibration / test split, and the assembly of a data
set from source arrays and index arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from splitexit.errors import InputError

__all__ = ["Dataset", "Split", "dataset_from_indices", "stratified_split"]


@dataclass(frozen=True, eq=False)
class Split:
    """One split (train, calibration or test) of a data set.

    Attributes:
        x: Inputs, ``float32`` with values in ``[0, 1]``; shape ``(N, C, H, W)`` for images and
            ``(N, C, L)`` for 1-D signals.
        y: Class labels, ``int64`` of shape ``(N,)``.

    Equality is identity (comparing tensors element-wise has no single truth value).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise InputError(
                f"Split needs torch tensors, got x={type(self.x).__name__}, "
                f"y={type(self.y).__name__}; convert with torch.as_tensor first."
            )
        if self.x.dtype != torch.float32:
            raise InputError(f"Split.x must be float32, got {self.x.dtype}; use x.float().")
        if self.y.dtype != torch.int64:
            raise InputError(f"Split.y must be int64 labels, got {self.y.dtype}; use y.long().")
        if self.y.ndim != 1:
            raise InputError(f"Split.y must have shape (N,), got {tuple(self.y.shape)}.")
        if self.x.ndim < 2 or self.x.shape[0] != self.y.shape[0]:
            raise InputError(
                f"Split.x must have shape (N, C, ...) with N == len(y) == {self.y.shape[0]}, "
                f"got {tuple(self.x.shape)}."
            )

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.y.shape[0])

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """A ``DataLoader`` over this split's ``(x, y)`` pairs.

        Args:
            batch_size: Samples per batch (the last batch may be smaller).
            shuffle: Reshuffle every epoch. The order is fixed by ``seed``: two loaders with the
                same seed yield the same batches epoch by epoch.
            seed: Seed of the shuffling generator; ignored when ``shuffle`` is false.

        Returns:
            A single-process ``DataLoader`` over a ``TensorDataset(x, y)``.

        Raises:
            InputError: If ``batch_size`` is not a positive integer.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        generator = None
        if shuffle:
            generator = torch.Generator()
            generator.manual_seed(int(seed))
        return DataLoader(
            TensorDataset(self.x, self.y),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
        )

    def subset(self, n: int, seed: int = 0) -> Split:
        """A deterministic random subset of ``n`` samples, stratified by class.

        Each class contributes in proportion to its share of this split (largest-remainder
        rounding), so class balance is kept as well as ``n`` allows. Selected samples keep
        their order in this split.

        Args:
            n: Number of samples, ``1 <= n <= len(self)``.
            seed: Seed of the selection.

        Returns:
            A new ``Split`` holding copies of the selected samples.

        Raises:
            InputError: If ``n`` is out of range.
        """
        total = len(self)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
            raise InputError(f"subset size must be an integer in [1, {total}], got {n!r}.")
        labels = self.y.numpy()
        _, take = stratified_split(labels, n / total, seed, n_take=n)
        index = torch.from_numpy(take)
        return Split(self.x[index].clone(), self.y[index].clone())


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set with its train, calibration and test splits.

    Attributes:
        name: Registered name (see :func:`~splitexit.data.list_datasets`).
        train: Training split.
        calib: Calibration split, carved out of the original training data (never the test
            data); used to choose thresholds and operating points.
        test: Test split, in a fixed order.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        input_shape: Shape of one input, ``(C, H, W)`` or ``(C, L)``.
        class_names: Human-readable name of each class, indexed by label.
    """

    name: str
    train: Split
    calib: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, *, n_take: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0 .. len(labels) - 1`` into a kept and a taken part, stratified by class.

    The taken part has ``round(fraction * len(labels))`` indices (or exactly ``n_take``); each
    class contributes in proportion to its count, with largest-remainder rounding (ties go to
    the lower label). Within each class the taken indices are chosen by a permutation from
    ``numpy.random.Generator(PCG64(seed))``, so the result is the same on every machine.

    Args:
        labels: Integer class labels, shape ``(N,)``.
        fraction: Fraction of samples to take, in ``(0, 1)``.
        seed: Seed of the selection.
        n_take: Exact number of indices to take; overrides ``fraction`` when given.

    Returns:
        ``(keep, take)``: two sorted, disjoint ``int64`` index arrays that together cover
        ``0 .. N - 1``.

    Raises:
        InputError: If ``fraction`` or ``n_take`` is out of range.
    """
    labels = np.asarray(labels)
    total = int(labels.shape[0])
    if n_take is None:
        if not 0.0 < float(fraction) < 1.0:
            raise InputError(f"split fraction must lie strictly between 0 and 1, got {fraction!r}.")
        n_take = int(round(float(fraction) * total))
    if not 0 <= n_take <= total:
        raise InputError(f"cannot take {n_take} of {total} samples.")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * (n_take / total) if total else counts.astype(float)
    quota = np.floor(exact).astype(np.int64)
    remainder = n_take - int(quota.sum())
    if remainder > 0:
        # Largest fractional part first; stable sort keeps lower labels first on ties.
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[:remainder]] += 1
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    take_mask = np.zeros(total, dtype=bool)
    for k in range(classes.shape[0]):
        members = np.flatnonzero(inverse == k)
        chosen = rng.permutation(members.shape[0])[: quota[k]]
        take_mask[members[chosen]] = True
    return np.flatnonzero(~take_mask).astype(np.int64), np.flatnonzero(take_mask).astype(np.int64)


def _to_split(x_u: np.ndarray, y: np.ndarray, index: np.ndarray, scale: float) -> Split:
    """Gather ``index`` from the source arrays and make a float32 ``[0, 1]`` split."""
    x = torch.from_numpy(np.ascontiguousarray(x_u[index]))
    x = x.to(torch.float32)
    if scale != 1.0:
        x.div_(scale)
    return Split(x, torch.from_numpy(y[index].astype(np.int64)))


def dataset_from_indices(
    name: str,
    train_source: tuple[np.ndarray, np.ndarray],
    test_source: tuple[np.ndarray, np.ndarray],
    scale: float,
    indices: tuple[np.ndarray, np.ndarray, np.ndarray],
    class_names: list[str],
) -> Dataset:
    """A :class:`Dataset` gathered from source arrays: fresh float32 copies divided by ``scale``.

    Args:
        name: The data set's name.
        train_source: ``(x, y)`` arrays the train and calibration splits are drawn from.
        test_source: ``(x, y)`` arrays the test split is drawn from.
        scale: Divisor that maps the source values to ``[0, 1]``.
        indices: ``(train, calib, test)`` index arrays into the sources.
        class_names: Name of each class, indexed by label.

    Raises:
        InputError: If the train or the calibration split would be empty.
    """
    train_idx, calib_idx, test_idx = indices
    if calib_idx.shape[0] == 0 or train_idx.shape[0] == 0:
        raise InputError(
            f"{name}: calib_fraction leaves {train_idx.shape[0]} train and "
            f"{calib_idx.shape[0]} calibration samples; choose a fraction that leaves both "
            "non-empty."
        )
    train = _to_split(*train_source, train_idx, scale)
    calib = _to_split(*train_source, calib_idx, scale)
    test = _to_split(*test_source, test_idx, scale)
    return Dataset(
        name=name,
        train=train,
        calib=calib,
        test=test,
        num_classes=len(class_names),
        input_shape=tuple(int(d) for d in train.x.shape[1:]),
        class_names=list(class_names),
    )
