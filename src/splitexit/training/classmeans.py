"""E2CM: exits fitted without gradient steps, from class means of pooled features."""

from __future__ import annotations

import time

import torch

from ..errors import InputError
from ..heads import ClassMeansHead
from ..stages import payload_tensors
from .base import as_split
from .checks import require_head_type

__all__ = ["fit_class_means"]


@torch.no_grad()
def fit_class_means(model, data, batch_size: int = 512) -> dict:
    """Fit every :class:`ClassMeansHead` of ``model`` in ONE pass over ``data``, no gradients.

    The backbone runs once per batch in eval mode; each head accumulates its cut's pooled
    features per class, then the sums become means.

    Args:
        model: a :class:`MultiExitModel` whose exit heads are all class-means heads.
        data: the training split (``.x``, ``.y``), or an ``(x, y)`` pair of tensors.

    Returns:
        ``{"samples", "passes", "seconds"}``: how much data was seen (one pass) and the time.

    Raises:
        InputError: the model has no heads or a head is not a class-means head.
    """
    require_head_type(model, ClassMeansHead, "e2cm",
                      "build the model with create_multiexit(..., head='class-means')")
    data = as_split(data)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    for head in model.heads:
        head.reset()
    seen = 0
    for i in range(0, len(data.x), batch_size):
        x, y = data.x[i: i + batch_size], data.y[i: i + batch_size]
        payload = x
        e = 0
        for k, stage in enumerate(model.backbone.stages):
            if e >= len(model.heads):
                break
            payload = stage(payload)
            while e < len(model.heads) and model.exit_stages[e] == k:
                tensors = payload_tensors(payload)
                if len(tensors) != 1:
                    raise InputError(f"cut {model.head_cuts[e]!r} carries {len(tensors)} "
                                     "tensors; attach class-means heads at single-tensor cuts")
                model.heads[e].accumulate(tensors[0], y)
                e += 1
        seen += len(y)
    for head in model.heads:
        head.finish()
    model.train(was_training)
    return {"samples": seen, "passes": 1, "seconds": time.perf_counter() - t0}
