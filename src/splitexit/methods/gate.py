"""Exit gate (Dong et al.): a tiny predictor lets samples it judges hard skip the early heads.

Early heads cost compute for every sample that does not leave at them. A gate looks at the raw
input first; samples it flags as hard run the backbone straight to the final exit without
evaluating any head, the others take the usual early-exit path. The gate's own cost is counted
for every sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..cost import count_macs
from ..errors import InputError
from ..multiexit import ExitResult, MultiExitModel, simulate_exits
from ..policies import ExitPolicy

__all__ = ["ExitGate", "GatedMultiExitModel", "fit_gate", "calibrate_gate"]


class ExitGate(nn.Module):
    """Hardness predictor on the raw input: average-pool to a 4x4 (or 16) grid, a small MLP.

    Returns one logit per sample; ``sigmoid(logit)`` is the probability the sample is hard.
    """

    def __init__(self, input_shape: Sequence[int], hidden: int = 16, grid: int = 4):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.hidden, self.grid = int(hidden), int(grid)
        dims = len(self.input_shape) - 1
        if dims == 2:
            self.pool = nn.AdaptiveAvgPool2d(grid)
            cells = grid * grid
        elif dims == 1:
            self.pool = nn.AdaptiveAvgPool1d(grid * grid)
            cells = grid * grid
        else:
            raise InputError(f"the gate needs (C, L) or (C, H, W) inputs, got {input_shape}")
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(self.input_shape[0] * cells, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(x)).squeeze(1)


class GatedMultiExitModel(MultiExitModel):
    """A :class:`MultiExitModel` whose ``infer`` asks an :class:`ExitGate` first.

    Samples with gate probability at least ``gate_threshold`` run the backbone only (final
    exit, no head evaluated); the rest take the policy's early-exit path. Shares the backbone
    and heads of the model it was built from (:meth:`from_multiexit`).
    """

    def __init__(self, backbone, heads, gate: ExitGate, input_shape=None,
                 gate_threshold: float = 0.5):
        super().__init__(backbone, heads, input_shape)
        self.gate = gate
        self.gate_threshold = gate_threshold

    @property
    def gate_threshold(self) -> float:
        return self._gate_threshold

    @gate_threshold.setter
    def gate_threshold(self, value: float) -> None:
        if not 0 <= float(value) <= 1:
            raise InputError(f"gate_threshold is a probability in [0, 1], got {value}")
        self._gate_threshold = float(value)

    @classmethod
    def from_multiexit(cls, model: MultiExitModel, gate: ExitGate | None = None,
                       gate_threshold: float = 0.5) -> GatedMultiExitModel:
        """Wrap a trained multi-exit model (its modules are shared, not copied)."""
        if model.input_shape is None and gate is None:
            raise InputError("the model has no input_shape; pass gate=ExitGate(input_shape)")
        gate = gate or ExitGate(model.input_shape)
        wrapped = cls(model.backbone, dict(zip(model.head_cuts, model.heads)), gate,
                      model.input_shape, gate_threshold)
        wrapped.spec = model.config()
        return wrapped.train(model.training)

    def config(self) -> dict:
        """The wrapped model's description plus the gate's (size and threshold)."""
        inner = super().config()
        if inner:
            inner["gate"] = {"hidden": self.gate.hidden, "grid": self.gate.grid,
                             "threshold": self.gate_threshold}
        return inner

    def keep_exits(self, exits):
        raise InputError("keep the exits before adding the gate: "
                         "GatedMultiExitModel.from_multiexit(model.keep_exits(...))")

    def is_hard(self, probability: torch.Tensor) -> torch.Tensor:
        """The gate's decision; a threshold of 1 never gates."""
        if self.gate_threshold >= 1.0:
            return torch.zeros_like(probability, dtype=torch.bool)
        return probability >= self.gate_threshold

    @torch.no_grad()
    def hard_probability(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """The gate's probability that each sample is hard."""
        return torch.cat([torch.sigmoid(self.gate(x[i: i + batch_size]))
                          for i in range(0, len(x), batch_size)])

    def gate_macs(self) -> float:
        """MACs of the gate per sample."""
        shape = self.input_shape or self.gate.input_shape
        return count_macs(lambda: self.gate(torch.zeros(1, *shape)))

    @torch.inference_mode()
    def infer(self, x: torch.Tensor, policy: ExitPolicy) -> ExitResult:
        """Gate, then the real early-exit path for easy samples and the bare backbone for
        hard ones; both shrink with the batch."""
        self._check(x)
        hard = self.is_hard(torch.sigmoid(self.gate(x)))
        n = len(x)
        if not bool(hard.any()):
            return super().infer(x, policy)
        final = self.backbone(x[hard])
        predictions = torch.empty(n, dtype=torch.long)
        exit_index = torch.full((n,), self.num_exits - 1, dtype=torch.long)
        logits = torch.empty(n, final.shape[1], dtype=final.dtype)
        predictions[hard], logits[hard] = final.argmax(1), final
        easy = ~hard
        if bool(easy.any()):
            r = super().infer(x[easy], policy)
            predictions[easy], exit_index[easy], logits[easy] = (r.predictions, r.exit_index,
                                                                 r.logits.to(final.dtype))
        return ExitResult(predictions, exit_index, logits)

    def simulate_gated(self, logits: Sequence[torch.Tensor], hard: torch.Tensor,
                       policy: ExitPolicy) -> ExitResult:
        """Offline replay of :meth:`infer` from every exit's logits and the gate's decisions."""
        result = simulate_exits(logits, policy)
        predictions, exit_index, out = (result.predictions.clone(), result.exit_index.clone(),
                                        result.logits.clone())
        predictions[hard] = logits[-1][hard].argmax(1)
        exit_index[hard] = len(logits) - 1
        out[hard] = logits[-1][hard].to(out.dtype)
        return ExitResult(predictions, exit_index, out)

    def sample_macs(self, exit_index: torch.Tensor, hard: torch.Tensor,
                    exit_macs: Sequence[float], backbone_macs: float) -> torch.Tensor:
        """Per-sample MACs: the gate, plus the backbone alone for hard samples or the exit's
        cost (stages and heads evaluated) for the others."""
        table = torch.tensor(list(exit_macs), dtype=torch.float64)
        macs = torch.where(hard, torch.tensor(float(backbone_macs), dtype=torch.float64),
                           table[exit_index])
        return macs + self.gate_macs()


def fit_gate(model: GatedMultiExitModel, data, policy: ExitPolicy, epochs: int = 10,
             lr: float = 1e-2, batch_size: int = 128, seed: int = 0) -> dict:
    """Train the gate to predict which samples ``policy`` sends to the final exit.

    The labels come from the model itself (heads and backbone frozen): a training sample is
    "hard" when the policy replayed over its exits' logits lets it reach the final exit.
    Classes are balanced with ``pos_weight``.

    Returns:
        ``{"hard_fraction", "gate_accuracy", "balanced_accuracy"}`` on ``data``.

    Raises:
        InputError: a model that is not a :class:`GatedMultiExitModel` or has no heads.
    """
    if not isinstance(model, GatedMultiExitModel) or len(model.heads) == 0:
        raise InputError("fit_gate needs a GatedMultiExitModel with exit heads; wrap a trained "
                         "model with GatedMultiExitModel.from_multiexit(model)")
    logits = model.collect_logits(data.x)
    hard = (simulate_exits(logits, policy).exit_index == model.num_exits - 1).float()
    positives = float(hard.sum())
    pos_weight = torch.tensor((len(hard) - positives) / max(1.0, positives))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.gate.parameters(), lr=lr)
    model.gate.train()
    for _ in range(epochs):
        order = torch.randperm(len(hard), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            loss = F.binary_cross_entropy_with_logits(model.gate(data.x[idx]), hard[idx],
                                                      pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.gate.train(model.training)
    predicted = model.hard_probability(data.x) >= 0.5
    truth = hard.bool()
    recall_hard = float(predicted[truth].double().mean()) if bool(truth.any()) else 1.0
    recall_easy = float((~predicted[~truth]).double().mean()) if bool((~truth).any()) else 1.0
    return {"hard_fraction": positives / len(hard),
            "gate_accuracy": float((predicted == truth).double().mean()),
            "balanced_accuracy": (recall_hard + recall_easy) / 2}


@torch.no_grad()
def calibrate_gate(model: GatedMultiExitModel, data, policy: ExitPolicy,
                   exit_macs: Sequence[float], backbone_macs: float,
                   max_drop: float = 0.0) -> dict:
    """Choose the gate threshold with the lowest mean MACs on ``data`` (the calibration split)
    whose accuracy is at most ``max_drop`` below the ungated model's with the same policy.

    Sets ``model.gate_threshold`` and returns ``{"gate_threshold", "accuracy", "mean_macs",
    "ungated_accuracy", "ungated_mean_macs"}`` on ``data``. A threshold of 1 never gates.
    """
    logits = model.collect_logits(data.x)
    p_hard = model.hard_probability(data.x)
    base = simulate_exits(logits, policy)
    base_acc = base.accuracy(data.y)
    table = torch.tensor(list(exit_macs), dtype=torch.float64)
    best = {"gate_threshold": 1.0, "accuracy": base_acc,
            "mean_macs": float(table[base.exit_index].mean()) + model.gate_macs()}
    for t in torch.linspace(0.05, 0.95, 19).tolist():
        hard = p_hard >= t
        r = model.simulate_gated(logits, hard, policy)
        macs = float(model.sample_macs(r.exit_index, hard, exit_macs, backbone_macs).mean())
        acc = r.accuracy(data.y)
        if acc >= base_acc - max_drop - 1e-12 and macs < best["mean_macs"]:
            best = {"gate_threshold": t, "accuracy": acc, "mean_macs": macs}
    model.gate_threshold = best["gate_threshold"]
    return {**best, "ungated_accuracy": base_acc,
            "ungated_mean_macs": float(table[base.exit_index].mean())}
