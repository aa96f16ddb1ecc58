"""Zero Time Waste: cascading heads on a frozen backbone plus a learned geometric ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..heads import CascadingHead
from ..policies import GeometricEnsemble, fit_ensemble_weights
from .base import Strategy, freeze
from .checks import require_head_type, require_trainable

__all__ = ["ZTW", "fit_ztw_ensemble"]


class ZTW(Strategy):
    """ZTW (Wolczyk et al., NeurIPS'21) head training.

    The backbone is frozen (the pretrained model keeps its accuracy); every exit is a
    :class:`CascadingHead` that also reads the previous head's detached logits, trained with
    the sum of cross-entropies. Afterwards fit the ensemble with :func:`fit_ztw_ensemble` and
    serve with the returned :class:`GeometricEnsemble` policy.
    """

    name = "ztw"

    def prepare(self, model, data=None):
        require_head_type(model, CascadingHead, self.name,
                          "build the model with create_multiexit(..., head='cascading')")
        require_trainable(model.heads, "exit heads", self.name)
        freeze([model.backbone])

    def loss(self, model, x, y):
        outs = model(x)[:-1]
        return sum(F.cross_entropy(o, y) for o in outs) / len(outs)


@torch.no_grad()
def _logits(model, data, batch_size: int) -> list[torch.Tensor]:
    return model.collect_logits(data.x, batch_size)


def fit_ztw_ensemble(model, data, threshold: float = 0.9, steps: int = 300,
                     batch_size: int = 512) -> GeometricEnsemble:
    """Fit ZTW's ensemble weights on ``data`` (the training split) with the model frozen.

    Returns:
        A :class:`GeometricEnsemble` policy with the fitted weights and ``threshold``.
    """
    logits = _logits(model, data, batch_size)
    with torch.enable_grad():
        return fit_ensemble_weights(logits, data.y, steps=steps,
                                    policy=GeometricEnsemble(threshold=threshold))
