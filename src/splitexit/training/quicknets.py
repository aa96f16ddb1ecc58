"""QuickNets: cascaded training where each new block learns only what earlier exits got wrong."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..policies import MaxProb
from ..stages import payload_tensors
from .base import Strategy
from .checks import require_heads, require_trainable

__all__ = ["QuickNets", "fit_commitment"]


class QuickNets(Strategy):
    """QuickNets' cascaded training, one segment per phase.

    The epochs are split into ``num_exits`` phases. In phase ``k`` only the backbone stages
    between exit ``k-1`` and exit ``k`` and head ``k`` learn (earlier parts run without
    gradients in eval mode, later parts do not run at all), and only on the samples of the batch
    every earlier exit got wrong. Phase 0 uses every sample. Serve with the commitment rule of
    :func:`fit_commitment`, which lets an exit commit only where its confidence is trustworthy.

    Raises:
        InputError: (at the first epoch) fewer epochs than exits.
    """

    name = "quicknets"

    def __init__(self):
        self._phase = 0
        self._num_exits = 0

    def prepare(self, model, data=None):
        require_heads(model, self.name)
        require_trainable(model.backbone, "backbone", self.name)
        require_trainable(model.heads, "exit heads", self.name)
        if any(getattr(h, "uses_previous", False) for h in model.heads):
            raise InputError("QuickNets trains each exit on its own; use plain heads, not "
                             "cascading ones")
        self._num_exits = model.num_exits

    def parameters(self, model):
        return list(model.backbone.parameters()) + list(model.heads.parameters())

    def phase(self, epoch: int, num_epochs: int) -> int:
        """The exit trained at ``epoch``."""
        return min(self._num_exits - 1, epoch * self._num_exits // num_epochs)

    def on_epoch_start(self, model, epoch, num_epochs):
        if num_epochs < model.num_exits:
            raise InputError(f"QuickNets trains one exit per phase: give at least "
                             f"{model.num_exits} epochs (got {num_epochs})")
        self._phase = self.phase(epoch, num_epochs)
        first = 0 if self._phase == 0 else model.exit_stages[self._phase - 1] + 1
        last = model.exit_stages[self._phase]
        for k, stage in enumerate(model.backbone.stages):
            stage.train(first <= k <= last)
        for e, head in enumerate(model.heads):
            head.train(e == self._phase)

    def loss(self, model, x, y):
        k = self._phase
        first = 0 if k == 0 else model.exit_stages[k - 1] + 1
        hard = torch.ones_like(y, dtype=torch.bool)
        payload = x
        with torch.no_grad():
            e = 0
            for s in range(first):
                payload = model.backbone.stages[s](payload)
                while e < k and model.exit_stages[e] == s:
                    hard &= model.run_head(e, payload, None).argmax(1) != y
                    e += 1
        for s in range(first, model.exit_stages[k] + 1):
            payload = model.backbone.stages[s](payload)
        out = (model.run_head(k, payload, None) if k < len(model.heads)
               else payload_tensors(payload)[0])
        if not bool(hard.any()):
            return out.sum() * 0.0
        return F.cross_entropy(out[hard], y[hard])


@torch.no_grad()
def fit_commitment(model, data, precision: float = 0.99, batch_size: int = 512) -> MaxProb:
    """QuickNets' commitment rule: per exit, the lowest confidence above which it is right.

    For each early exit, the threshold is the smallest top-probability ``t`` such that the
    calibration samples with confidence at least ``t`` are classified with accuracy at least
    ``precision`` (1.0, i.e. never commit, where no such ``t`` exists).

    Args:
        data: the calibration split (never the test split).
        precision: required accuracy of committed predictions.

    Returns:
        A :class:`MaxProb` policy with one threshold per exit.
    """
    if not 0 < precision <= 1:
        raise InputError(f"precision must lie in (0, 1], got {precision}")
    logits = model.collect_logits(data.x, batch_size)
    thresholds = []
    for lg in logits[:-1]:
        conf, pred = MaxProb().statistic(lg), lg.argmax(1)  # the policy's own statistic
        order = conf.argsort(descending=True)
        right = (pred[order] == data.y[order]).double()
        running = right.cumsum(0) / torch.arange(1, len(right) + 1, dtype=torch.float64)
        ok = (running >= precision).nonzero().flatten()
        thresholds.append(float(conf[order][ok[-1]]) if len(ok) else 1.0)
    return MaxProb(threshold=tuple(thresholds))
