"""Shallow-Deep Networks' joint training: exit-loss weights ramped up epoch by epoch."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F

from ..errors import InputError
from .base import Strategy
from .checks import require_heads, require_trainable

__all__ = ["SDNRamp"]


class SDNRamp(Strategy):
    """SDN (Kaya et al., ICML'19) joint training with a per-epoch weight ramp.

    Internal classifier ``i`` of ``K`` has a target weight ``tau_i`` (``0.15 .. 0.75`` spread
    evenly by depth, as in SDN); its loss weight grows linearly from ``start`` to ``tau_i``
    over the epochs, so the backbone first learns the final task. The final exit keeps weight 1.

    Args:
        max_weights: target weight per internal classifier (default: SDN's even spread).
        start: weight at the first epoch.
    """

    name = "sdn-ramp"

    def __init__(self, max_weights: Sequence[float] | None = None, start: float = 0.01):
        self.max_weights = list(max_weights) if max_weights is not None else None
        self.start = float(start)
        self._weights: list[float] = []

    def prepare(self, model, data=None):
        require_heads(model, self.name)
        require_trainable(model.backbone, "backbone", self.name)
        n = len(model.heads)
        if self.max_weights is None:
            self.max_weights = [0.15 + 0.6 * i / max(1, n - 1) for i in range(n)]
        if len(self.max_weights) != n:
            raise InputError(f"{len(self.max_weights)} max_weights for {n} internal classifiers")
        self._weights = [self.start] * n

    def current_weights(self) -> list[float]:
        """This epoch's weight per internal classifier."""
        return list(self._weights)

    def on_epoch_start(self, model, epoch, num_epochs):
        frac = epoch / max(1, num_epochs - 1)
        self._weights = [self.start + (tau - self.start) * frac for tau in self.max_weights]

    def loss(self, model, x, y):
        outs = model(x)
        total = F.cross_entropy(outs[-1], y)
        for w, o in zip(self._weights, outs[:-1]):
            total = total + w * F.cross_entropy(o, y)
        return total / (1 + sum(self._weights))
