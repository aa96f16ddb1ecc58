"""Segmentation canvases (M2NIST-style), generated deterministically from item images already
on the machine: ``fashion-canvas`` (Fashion-MNIST items) and ``mnist-canvas`` (MNIST-5k digits).

Each sample is a square canvas (64x64 by default) holding 1 to 3 items at random places, their
bounding boxes disjoint; the label map gives every pixel the class of the item it belongs to
(``1 + item class``) or background (``0``). A pixel belongs to an item when the item is
visibly there (intensity at least :data:`FOREGROUND_LEVEL`), so image and labels agree.
Items of the train and calibration canvases come from disjoint parts of the original training
images, and those of the test canvases from the original test images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from splitexit.errors import InputError

from .splits import Dataset, Split, stratified_split

__all__ = ["DenseSplit", "create_canvases", "canvas_dataset", "FOREGROUND_LEVEL",
           "CANVAS_SIZE", "CANVAS_MAX_ITEMS", "CANVAS_POOL", "CANVAS_TEST", "CANVAS_SEEDS"]

#: an item pixel at least this bright (of 255) is labelled as the item, else background
FOREGROUND_LEVEL = 32
#: canvas side, most items per canvas, canvases drawn for train + calibration, for test
CANVAS_SIZE, CANVAS_MAX_ITEMS, CANVAS_POOL, CANVAS_TEST = 64, 3, 10_000, 2_000
#: generator seeds of the train, calibration and test canvases (fixed: the data never moves)
CANVAS_SEEDS = {"train": 11, "calib": 12, "test": 13}


@dataclass(frozen=True, eq=False)
class DenseSplit(Split):
    """A split whose labels are per-pixel maps: ``x`` float32 ``(N, C, H, W)``, ``y`` int64
    ``(N, H, W)`` (class per pixel).

    Raises:
        InputError: labels whose shape does not match the images (one map of ``H x W`` per
            image), or not integer class indices.
    """

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise InputError("DenseSplit needs torch tensors; convert with torch.as_tensor")
        if self.x.dtype != torch.float32 or self.x.ndim != 4:
            raise InputError(f"DenseSplit.x must be float32 images (N, C, H, W), got "
                             f"{self.x.dtype} {tuple(self.x.shape)}")
        check_label_maps(self.y, self.x)

    def subset(self, n: int, seed: int = 0) -> DenseSplit:
        """``n`` samples chosen at random with ``seed`` (kept in order)."""
        total = len(self)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
            raise InputError(f"subset size must be an integer in [1, {total}], got {n!r}.")
        rng = np.random.Generator(np.random.PCG64(int(seed)))
        index = torch.from_numpy(np.sort(rng.permutation(total)[:n]))
        return DenseSplit(self.x[index].clone(), self.y[index].clone())


def check_label_maps(y: torch.Tensor, x: torch.Tensor) -> None:
    """Raise a clear :class:`InputError` unless ``y`` holds one int64 ``(H, W)`` label map per
    image of ``x`` ``(N, C, H, W)``."""
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
        raise InputError(f"label maps must be an int64 tensor (N, H, W), got "
                         f"{getattr(y, 'dtype', type(y).__name__)}; use y.long()")
    want = (x.shape[0], *x.shape[2:])
    if tuple(y.shape) != tuple(want):
        raise InputError(f"label maps of shape {tuple(y.shape)} do not match images of shape "
                         f"{tuple(x.shape)}: give one label per pixel, shape {tuple(want)} "
                         "(N, H, W), in the images' order")


#: candidate places drawn per canvas; a canvas whose items do not all fit keeps fewer
_TRIES = 64


def _place(corners: np.ndarray, item: int, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` of the candidate top-left ``corners`` (in order) whose
    ``item x item`` boxes are disjoint."""
    boxes: list[tuple[int, int]] = []
    for r, c in corners.tolist():
        if all(abs(r - r2) >= item or abs(c - c2) >= item for r2, c2 in boxes):
            boxes.append((r, c))
            if len(boxes) == count:
                break
    return boxes


def create_canvases(images: np.ndarray, labels: np.ndarray, n: int, seed: int,
                    size: int = CANVAS_SIZE, max_items: int = CANVAS_MAX_ITEMS
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` segmentation canvases built from item ``images`` (uint8 ``(M, h, w)`` or
    ``(M, 1, h, w)``) with class ``labels`` ``(M,)``.

    Every canvas draws 1 to ``max_items`` items (uniformly) with ``numpy.random.PCG64(seed)``,
    each a random image placed at a random place with its box disjoint from the others' (the
    first disjoint ones of a few random candidate places).

    Returns:
        ``(x, y)``: uint8 canvases ``(n, 1, size, size)`` and int64 label maps
        ``(n, size, size)`` with ``0`` background and ``1 + class`` on item pixels.

    Raises:
        InputError: items larger than the canvas, no items, or bad counts.
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    labels = np.asarray(labels)
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels) or not len(
            images):
        raise InputError(f"items must be uint8 images (M, h, w) with M labels, got "
                         f"{images.dtype} {images.shape} and {labels.shape} labels")
    item = max(images.shape[1:])
    if isinstance(size, bool) or not isinstance(size, int) or size < item:
        raise InputError(f"a canvas of side {size!r} cannot hold {images.shape[1]}x"
                         f"{images.shape[2]} items; use size >= {item}")
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1 or (
            isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"n and max_items must be ints >= 1, got {n!r} and {max_items!r}")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    counts = rng.integers(1, max_items + 1, n)
    corners = rng.integers(0, size - item + 1, (n, _TRIES, 2))
    picks = rng.integers(0, len(images), (n, max_items))
    x = np.zeros((n, 1, size, size), dtype=np.uint8)
    y = np.zeros((n, size, size), dtype=np.int64)
    h, w = images.shape[1:]
    for i in range(n):
        for j, (r, c) in enumerate(_place(corners[i], item, int(counts[i]))):
            k = picks[i, j]
            x[i, 0, r: r + h, c: c + w] = images[k]
            # an item's pixels take its class where it is visible, else background
            y[i, r: r + h, c: c + w] = (images[k] >= FOREGROUND_LEVEL) * (1 + int(labels[k]))
    return x, y


def _to_dense_split(x: np.ndarray, y: np.ndarray) -> DenseSplit:
    return DenseSplit(torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y))


@functools.lru_cache(maxsize=4)
def _canvases(source: str, calib_fraction: float, seed: int, root) -> tuple:
    from .sources import _fashion_dir, _fashion_items, _mnist5k_items

    items = _fashion_items(*_fashion_dir(root)) if source == "fashion" else _mnist5k_items()
    (train_x, train_y), (test_x, test_y) = items
    # calibration canvases use items no training canvas shows
    keep, held = stratified_split(train_y, calib_fraction, seed)
    n_calib = int(round(calib_fraction * CANVAS_POOL))
    parts = {
        "train": create_canvases(train_x[keep], train_y[keep], CANVAS_POOL - n_calib,
                                 CANVAS_SEEDS["train"] + 1000 * seed),
        "calib": create_canvases(train_x[held], train_y[held], n_calib,
                                 CANVAS_SEEDS["calib"] + 1000 * seed),
        "test": create_canvases(test_x, test_y, CANVAS_TEST, CANVAS_SEEDS["test"]),
    }
    for x, y in parts.values():
        x.setflags(write=False)
        y.setflags(write=False)
    return parts


def canvas_dataset(name: str, source: str, item_names: list[str], calib_fraction: float,
                   seed: int, root=None) -> Dataset:
    """The ``name`` canvas data set from ``source`` items (``"fashion"`` or ``"mnist"``):
    :data:`CANVAS_POOL` train + calibration canvases (``calib_fraction`` of them calibration,
    drawn with ``seed``) and :data:`CANVAS_TEST` test canvases (independent of ``seed``)."""
    parts = _canvases(source, float(calib_fraction), int(seed),
                      None if root is None else str(root))
    splits = {k: _to_dense_split(x.copy(), y.copy()) for k, (x, y) in parts.items()}
    if not len(splits["calib"]) or not len(splits["train"]):
        raise InputError(f"{name}: calib_fraction {calib_fraction} leaves an empty split")
    return Dataset(name=name, train=splits["train"], calib=splits["calib"], test=splits["test"],
                   num_classes=1 + len(item_names),
                   input_shape=tuple(int(d) for d in splits["train"].x.shape[1:]),
                   class_names=["background", *item_names])


def fashion_canvas_dataset(calib_fraction: float, seed: int, root) -> Dataset:
    """``fashion-canvas``: 64x64 canvases of 1-3 Fashion-MNIST items, 11 classes."""
    from .sources import FASHION_MNIST_CLASS_NAMES

    return canvas_dataset("fashion-canvas", "fashion", FASHION_MNIST_CLASS_NAMES,
                          calib_fraction, seed, root)


def mnist_canvas_dataset(calib_fraction: float, seed: int, root) -> Dataset:
    """``mnist-canvas``: 64x64 canvases of 1-3 MNIST-5k digits (M2NIST-style), 11 classes."""
    from .sources import DIGITS_CLASS_NAMES

    return canvas_dataset("mnist-canvas", "mnist", DIGITS_CLASS_NAMES, calib_fraction, seed)
