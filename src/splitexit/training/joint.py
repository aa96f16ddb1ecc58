"""Plain strategies: the baseline, BranchyNet's joint weighted loss, SDN's heads-only training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .base import Strategy, freeze

__all__ = ["Baseline", "JointWeighted", "HeadsOnly", "require_heads"]


def require_heads(model: nn.Module, strategy: str) -> None:
    if not hasattr(model, "heads") or len(model.heads) == 0:
        raise InputError(f"strategy {strategy!r} trains exit heads, but the model has none; "
                         "build it with splitexit.create_multiexit or MultiExitModel(..., heads)")


def _final_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "backbone"):
        return model.backbone(x)
    return model(x)


class Baseline(Strategy):
    """Cross-entropy on the final output only: the backbone trained without exits."""

    name = "baseline"

    def loss(self, model, x, y):
        return F.cross_entropy(_final_logits(model, x), y)


class JointWeighted(Strategy):
    """BranchyNet: a weighted sum of every exit's cross-entropy, trained jointly.

    Args:
        weights: one weight per exit (the last is the final exit); BranchyNet found
            ``1.0`` for the first branch and ``0.3`` for the last helped. Defaults to 1 each.
    """

    name = "joint"

    def __init__(self, weights: Sequence[float] | None = None):
        self.weights = list(weights) if weights is not None else None

    def prepare(self, model, data=None):
        require_heads(model, self.name)
        if self.weights is not None and len(self.weights) != model.num_exits:
            raise InputError(f"{len(self.weights)} weights for {model.num_exits} exits")

    def loss(self, model, x, y):
        outs = model(x)
        weights = self.weights or [1.0] * len(outs)
        return sum(w * F.cross_entropy(o, y) for w, o in zip(weights, outs)) / sum(weights)


class HeadsOnly(Strategy):
    """SDN's IC-only training: the pretrained backbone is frozen, only the heads learn."""

    name = "heads-only"

    def prepare(self, model, data=None):
        require_heads(model, self.name)
        freeze([model.backbone])
        for h in model.heads:
            for p in h.parameters():
                p.requires_grad_(True)

    def loss(self, model, x, y):
        outs = model(x)[:-1]
        return sum(F.cross_entropy(o, y) for o in outs) / len(outs)
