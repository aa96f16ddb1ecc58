"""Segmentation quality: confusion matrices, mean intersection-over-union (mIoU) and pixel
accuracy, for a whole set and per sample (what the threshold sweeps add up)."""

from __future__ import annotations

import torch

from ..errors import InputError

__all__ = ["confusion_matrix", "sample_confusions", "miou", "pixel_accuracy",
           "segmentation_metrics", "check_label_shape"]


def check_label_shape(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Raise a clear :class:`InputError` unless ``predictions`` and ``labels`` are integer
    maps of one shape ``(N, H, W)`` with classes in ``0 .. num_classes - 1``."""
    for name, t in (("predictions", predictions), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dim() < 2:
            raise InputError(f"{name} must be an integer tensor of class maps (N, H, W), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}; take logits.argmax(1)")
    if predictions.shape != labels.shape:
        raise InputError(f"predicted maps {tuple(predictions.shape)} and label maps "
                         f"{tuple(labels.shape)} differ in shape; give one label per pixel of "
                         "every prediction")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"num_classes must be an int >= 1, got {num_classes!r}")
    for name, t in (("predictions", predictions), ("labels", labels)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise InputError(f"{name} hold classes {int(t.min())} .. {int(t.max())}, outside "
                             f"0 .. {num_classes - 1}")


def sample_confusions(predictions: torch.Tensor, labels: torch.Tensor,
                      num_classes: int) -> torch.Tensor:
    """One confusion matrix per sample, ``(N, C, C)`` int64: ``[n, true, predicted]`` pixel
    counts. Summing any selection of rows gives that selection's confusion matrix."""
    check_label_shape(predictions, labels, num_classes)
    n, c = labels.shape[0], num_classes
    flat = (torch.arange(n).view(n, *[1] * (labels.dim() - 1)) * c * c
            + labels * c + predictions).flatten()
    return torch.bincount(flat, minlength=n * c * c).view(n, c, c)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """The ``(C, C)`` confusion matrix (``[true, predicted]`` pixel counts) of a set."""
    check_label_shape(predictions, labels, num_classes)
    flat = (labels * num_classes + predictions).flatten()
    return torch.bincount(flat, minlength=num_classes ** 2).view(num_classes, num_classes)


def _iou(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU of a ``(..., C, C)`` confusion; NaN where a class is neither present nor
    predicted."""
    conf = confusion.double()
    hit = conf.diagonal(dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - hit
    return torch.where(union > 0, hit / union.clamp_min(1), torch.full_like(hit, float("nan")))


def miou(confusion: torch.Tensor) -> torch.Tensor:
    """Mean IoU over the classes present in the labels or the predictions (the usual
    definition: a class absent from both is left out), from a ``(..., C, C)`` confusion."""
    return _iou(confusion).nanmean(-1)


def pixel_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Share of pixels labelled right, from a ``(..., C, C)`` confusion."""
    conf = confusion.double()
    return conf.diagonal(dim1=-2, dim2=-1).sum(-1) / conf.sum((-2, -1)).clamp_min(1)


def segmentation_metrics(predictions: torch.Tensor, labels: torch.Tensor,
                         num_classes: int) -> dict:
    """``{"miou", "pixel_accuracy", "class_iou"}`` of predicted maps against label maps.

    Raises:
        InputError: maps of different shapes or classes out of range.
    """
    conf = confusion_matrix(predictions, labels, num_classes)
    return {"miou": float(miou(conf)), "pixel_accuracy": float(pixel_accuracy(conf)),
            "class_iou": [None if v != v else float(v) for v in _iou(conf).tolist()]}
