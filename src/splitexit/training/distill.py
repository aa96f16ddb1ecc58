"""Self-distillation: the deepest exit soft-supervises the shallow ones."""

from __future__ import annotations

import torch.nn.functional as F

from ..errors import InputError
from .base import Strategy
from .checks import require_heads, require_trainable

__all__ = ["SelfDistillation"]


class SelfDistillation(Strategy):
    """Joint training where every early exit also matches the final exit's softened output.

    Loss per early exit: ``(1 - alpha) * CE(exit, y) + alpha * T^2 * KL(final_T || exit_T)``
    with the final exit's distribution detached (the teacher is not pulled toward the
    students); the final exit gets plain cross-entropy.

    Args:
        temperature: softening temperature ``T`` (> 0).
        alpha: weight of the distillation term in ``[0, 1]``.
    """

    name = "self-distillation"

    def __init__(self, temperature: float = 3.0, alpha: float = 0.5):
        if not temperature > 0 or not 0 <= alpha <= 1:
            raise InputError(f"need temperature > 0 and alpha in [0, 1], got {temperature}, "
                             f"{alpha}")
        self.temperature, self.alpha = float(temperature), float(alpha)

    def prepare(self, model, data=None):
        require_heads(model, self.name)
        require_trainable(model.backbone, "backbone", self.name)

    def loss(self, model, x, y):
        outs = model(x)
        t = self.temperature
        teacher = F.softmax(outs[-1].detach() / t, dim=1)
        total = F.cross_entropy(outs[-1], y)
        for o in outs[:-1]:
            kd = F.kl_div(F.log_softmax(o / t, dim=1), teacher, reduction="batchmean") * t * t
            total = total + (1 - self.alpha) * F.cross_entropy(o, y) + self.alpha * kd
        return total / len(outs)
