"""BoostNet: a multi-exit network trained as an additive (boosting) model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..policies import AdditiveEnsemble
from ..stages import payload_tensors
from .base import Strategy
from .checks import require_heads, require_trainable

__all__ = ["BoostNet", "boostnet_policy"]


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _grad_scale(payload, scale: float):
    if scale == 1.0:
        return payload
    if isinstance(payload, tuple):
        return tuple(_GradScale.apply(t, scale) for t in payload)
    return _GradScale.apply(payload, scale)


class BoostNet(Strategy):
    """BoostNet (Yu et al., AAAI'23): exit ``k`` predicts ``F_k = detach(F_{k-1}) + f_k``.

    - Additive model: head ``k`` is trained as a correction of the detached ensemble of the
      heads before it, so at test time the decision at exit ``k`` is the sum of raw logits of
      every exit so far (serve with :func:`boostnet_policy`, an :class:`AdditiveEnsemble`).
    - Prediction re-weighting: the samples the ensemble so far finds hard (low probability on
      the true class) weigh more in exit ``k``'s loss, mixed with uniform weights by
      ``reweight`` (0 turns it off). This is our reading of the paper's fix of the
      train/test mismatch: at test time deep exits only see the samples earlier exits kept.
    - Gradient rescaling: at each exit's cut the gradient from the head is scaled by
      ``1/(K-k)`` and the one from the deeper trunk by ``(K-k-1)/(K-k)`` (gradient
      equilibrium), so shallow blocks are not dominated by the sum of deep losses.

    Args:
        reweight: strength of the prediction re-weighting in ``[0, 1]``.
        rescale_gradients: apply the gradient rescaling.
    """

    name = "boostnet"

    def __init__(self, reweight: float = 0.5, rescale_gradients: bool = True):
        if not 0 <= reweight <= 1:
            raise InputError(f"reweight must lie in [0, 1], got {reweight}")
        self.reweight, self.rescale_gradients = float(reweight), bool(rescale_gradients)

    def prepare(self, model, data=None):
        require_heads(model, self.name)
        require_trainable(model.backbone, "backbone", self.name)
        if any(getattr(h, "uses_previous", False) for h in model.heads):
            raise InputError("BoostNet builds its own ensemble of earlier exits; use plain "
                             "heads, not cascading ones")

    def exit_logits(self, model, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's raw logits, with BoostNet's gradient rescaling on the way."""
        k_exits = model.num_exits
        outs: list[torch.Tensor] = []
        payload = x
        e = 0
        for k, stage in enumerate(model.backbone.stages):
            payload = stage(payload)
            while e < len(model.heads) and model.exit_stages[e] == k:
                share = 1.0 / (k_exits - e) if self.rescale_gradients else 1.0
                outs.append(model.run_head(e, _grad_scale(payload, share), None))
                payload = _grad_scale(payload, 1.0 - share if self.rescale_gradients else 1.0)
                e += 1
        outs.append(payload_tensors(payload)[0])
        return outs

    def loss(self, model, x, y):
        outs = self.exit_logits(model, x)
        total = 0.0
        ensemble = None
        for f in outs:
            logits = f if ensemble is None else ensemble + f
            per_sample = F.cross_entropy(logits, y, reduction="none")
            if ensemble is not None and self.reweight > 0:
                with torch.no_grad():
                    hard = 1 - F.softmax(ensemble, 1).gather(1, y[:, None]).squeeze(1)
                    weights = (1 - self.reweight) + self.reweight * hard / hard.mean().clamp_min(
                        1e-6)
                per_sample = per_sample * weights
            total = total + per_sample.mean()
            ensemble = logits.detach()
        return total / len(outs)


def boostnet_policy(threshold: float = 0.9) -> AdditiveEnsemble:
    """The exit policy a BoostNet-trained model is served with (sum of logits so far)."""
    return AdditiveEnsemble(threshold=threshold)
