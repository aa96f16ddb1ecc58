"""Training a learned entropy bottleneck: task loss + beta x rate (supervised compression).

The "Entropic Student" recipe (Matsubara et al.) in BottleFit's two stages:

1. **Head distillation with a rate term** (``stage1="head"``): the device half, the encoder,
   the decoder and the factorized prior learn to reproduce the trained teacher's features at
   the cut and at every later cut (sum of MSEs, as
   :class:`~splitexit.training.bottlefit.HeadDistillation`) plus ``beta`` times the latent's
   code length in bits per sample. Rounding is relaxed by additive uniform noise
   ``y + u, u ~ U(-1/2, 1/2)`` (Ballé et al.): the decoder sees the noisy latent and the rate
   is the prior's likelihood of it. The later stages are frozen.

   Or **end to end on the task** (``stage1="task"``, :class:`RateTaskDistillation`): every
   stage trains on knowledge distillation from the unsplit teacher plus ``beta`` x rate. At a
   few bytes per sample the latent cannot reproduce the cut's features, and it need not: only
   what the rest of the network needs for the class is worth its bits. The decoder sees the
   rounded latent (straight-through gradient, so training and deployment see the same
   integers) while the rate is the likelihood of the noise-relaxed one.
2. **Fine-tuning** with the device half and the encoder frozen: the decoder sees the exact
   integers the codec sends (``round(y)``) and it and the later stages learn from knowledge
   distillation (temperature 1, alpha 0.5, as BottleFit) or cross-entropy; the prior is fitted
   to the same integers (its likelihood only trains the prior, so it lowers the rate without
   touching the accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..split.bottleneck import (
    BottleneckSpec,
    EntropyBottleneckedModel,
    inject_entropy_bottleneck,
)
from ..stages import Payload, StagedModel
from .base import Strategy, TrainConfig, TrainHistory, freeze, train
from .bottlefit import OUTPUT, _unfreeze, check_kd, check_targets, feature_mse, kd_loss

__all__ = ["RateDistillation", "RateTaskDistillation", "EntropyFineTune", "EntropicStudentResult",
           "entropic_student", "STAGE1_LOSSES"]

STAGE1_LOSSES = ("head", "task")
"""Stage-1 objectives of :func:`entropic_student`: feature (head) distillation or end-to-end
task distillation, each plus beta x rate."""


def _check(model: nn.Module) -> EntropyBottleneckedModel:
    if not isinstance(model, EntropyBottleneckedModel):
        raise InputError("entropy-bottleneck training needs an EntropyBottleneckedModel (see "
                         "splitexit.split.bottleneck.inject_entropy_bottleneck), got "
                         f"{type(model).__name__}")
    return model


PRIOR_LR_FACTOR = 10.0
"""The prior's learning rate relative to the network's (its few parameters must follow the
latent's distribution as it changes; weight decay off)."""


def _groups(model: EntropyBottleneckedModel, prior_lr: float) -> list[dict]:
    prior = [p for p in model.prior.parameters() if p.requires_grad]
    ids = {id(p) for p in prior}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest}] if rest else []
    if prior:
        groups.append({"params": prior, "lr": prior_lr, "weight_decay": 0.0})
    if not groups:
        raise InputError("nothing to train: every parameter is frozen")
    return groups


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise InputError(f"beta (weight of the rate in bits per sample) must be a number >= 0, "
                         f"got {beta!r}")
    return float(beta)


class RateDistillation(Strategy):
    """Stage 1: head distillation + ``beta`` x bits per sample, noise-relaxed rounding.

    Args:
        teacher: The trained original StagedModel (eval mode, never updated).
        beta: Weight of the rate (bits per sample) against the sum of feature MSEs.
        prior_lr: Learning rate of the prior's parameters (no weight decay).
        targets: Student cuts to match; default
            :func:`~splitexit.training.bottlefit.head_distillation_targets`.
    """

    name = "rate-distillation"

    def __init__(self, teacher: StagedModel, beta: float, targets: Sequence[str] | None = None,
                 prior_lr: float = 2e-3 * PRIOR_LR_FACTOR):
        if not isinstance(teacher, StagedModel):
            raise InputError(f"teacher must be a StagedModel, got {type(teacher).__name__}")
        self._teacher = teacher
        self.beta = _check_beta(beta)
        self.prior_lr = float(prior_lr)
        self.targets = list(targets) if targets is not None else None
        self.last_bits: float | None = None

    def prepare(self, model: nn.Module, data=None) -> None:
        student = _check(model)
        self.targets = check_targets(student, self._teacher, self.targets)
        e = student.encoder_index
        freeze([student])
        _unfreeze([*student.stages[: e + 2], student.prior])
        self._teacher.eval()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        student: EntropyBottleneckedModel = model
        e = student.encoder_index
        z = student.run(x, 0, e + 1)
        if student.training:
            z = z + torch.rand_like(z) - 0.5
        else:
            z = torch.round(z)
        bits = student.prior.bits(z).mean()
        self.last_bits = float(bits.detach())
        names = [*student.cut_names, OUTPUT]

        def outputs():
            payload: Payload = student.stages[e + 1].module[1](z)  # the decoder, no rounding
            yield names[e + 1], payload
            for i in range(e + 2, len(student.stages)):
                payload = student.stages[i](payload)
                yield names[i], payload

        return feature_mse(student, outputs(), self._teacher, x, self.targets) + self.beta * bits

    def parameters(self, model: nn.Module) -> list:
        """Parameter groups: the prior's at :data:`PRIOR_LR_FACTOR` times the learning rate."""
        return _groups(_check(model), self.prior_lr)

    def config(self) -> dict:
        return {"name": self.name, "beta": self.beta, "targets": self.targets}


class RateTaskDistillation(Strategy):
    """Stage 1, end to end: every stage and the prior train on the task loss + ``beta`` x rate.

    Loss: knowledge distillation from ``teacher`` (temperature, alpha as
    :func:`~splitexit.training.bottlefit.kd_loss`) on the logits computed from the rounded
    latent (the decoder stage's straight-through rounding), plus ``beta`` times the bits per
    sample of the uniformly noised latent under the prior.

    Args:
        teacher: The trained unsplit StagedModel (eval mode, never updated); None trains with
            cross-entropy only.
        beta: Weight of the rate (bits per sample) against the task loss.
        temperature: KD temperature.
        alpha: Weight of the KD term; ``1 - alpha`` weighs cross-entropy.
        prior_lr: Learning rate of the prior's parameters (no weight decay).
    """

    name = "rate-task-distillation"

    def __init__(self, teacher: StagedModel | None, beta: float, temperature: float = 1.0,
                 alpha: float = 0.5, prior_lr: float = 2e-3 * PRIOR_LR_FACTOR):
        check_kd(teacher, temperature, alpha)
        self._teacher = teacher
        self.beta = _check_beta(beta)
        self.temperature = float(temperature)
        self.alpha = float(alpha) if teacher is not None else 0.0
        self.prior_lr = float(prior_lr)
        self.last_bits: float | None = None

    def prepare(self, model: nn.Module, data=None) -> None:
        student = _check(model)
        _unfreeze([student, student.prior])
        if self._teacher is not None:
            self._teacher.eval()

    def parameters(self, model: nn.Module) -> list:
        """Parameter groups: the prior's at :data:`PRIOR_LR_FACTOR` times the learning rate."""
        return _groups(_check(model), self.prior_lr)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        student: EntropyBottleneckedModel = model
        e = student.encoder_index
        z = student.run(x, 0, e + 1)
        relaxed = z + torch.rand_like(z) - 0.5 if student.training else torch.round(z)
        bits = student.prior.bits(relaxed).mean()
        self.last_bits = float(bits.detach())
        logits = student.run(z, e + 1)  # the decoder stage rounds (straight through)
        return kd_loss(logits, y, self._teacher, x, self.temperature, self.alpha) \
            + self.beta * bits

    def config(self) -> dict:
        return {"name": self.name, "beta": self.beta, "temperature": self.temperature,
                "alpha": self.alpha}


class EntropyFineTune(Strategy):
    """Stage 2: device half and encoder frozen; decoder and tail learn on the integers the
    codec sends; the prior is fitted to them.

    Args:
        teacher: For knowledge distillation; None trains with cross-entropy only.
        temperature: KD temperature (1, as BottleFit).
        alpha: Weight of the KD term; ``1 - alpha`` weighs cross-entropy (0.5).
        prior_lr: Learning rate of the prior's parameters (no weight decay).
    """

    name = "entropy-finetune"

    def __init__(self, teacher: StagedModel | None = None, temperature: float = 1.0,
                 alpha: float = 0.5, prior_lr: float = 2e-3 * PRIOR_LR_FACTOR):
        check_kd(teacher, temperature, alpha)
        self._teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha) if teacher is not None else 0.0
        self.prior_lr = float(prior_lr)

    def parameters(self, model: nn.Module) -> list:
        """Parameter groups: the prior's at :data:`PRIOR_LR_FACTOR` times the learning rate."""
        return _groups(_check(model), self.prior_lr)

    def prepare(self, model: nn.Module, data=None) -> None:
        student = _check(model)
        e = student.encoder_index
        freeze(list(student.stages[: e + 1]))
        _unfreeze([*student.stages[e + 1:], student.prior])
        if self._teacher is not None:
            self._teacher.eval()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        student: EntropyBottleneckedModel = model
        e = student.encoder_index
        with torch.no_grad():
            q = torch.round(student.run(x, 0, e + 1))
        rate = student.prior.bits(q).mean() / q[0].numel()  # trains the prior only
        logits = student.run(q, e + 1)
        return kd_loss(logits, y, self._teacher, x, self.temperature, self.alpha) + rate

    def config(self) -> dict:
        return {"name": self.name, "temperature": self.temperature, "alpha": self.alpha}


@dataclass
class EntropicStudentResult:
    """A trained entropy-bottlenecked model and the histories of both stages."""

    model: EntropyBottleneckedModel
    stage1: TrainHistory
    stage2: TrainHistory


def entropic_student(teacher: StagedModel, cut: str, spec: BottleneckSpec, data, beta: float,
                     *, stage1_epochs: int = 2, stage2_epochs: int = 2,
                     stage1: str = "head", stage2_loss: str = "kd", lr: float = 2e-3,
                     batch_size: int = 128, seed: int = 0, components: int = 3,
                     progress: bool | None = None) -> EntropicStudentResult:
    """Inject an entropy bottleneck into a copy of ``teacher`` at ``cut`` and train it.

    Args:
        teacher: The trained StagedModel (left unchanged).
        cut: Where the bottleneck goes (one 4-D tensor payload).
        spec: Latent channels, stride and widths (as BottleFit's).
        data: Training split.
        beta: Rate weight (per bit per sample) in stage 1; larger gives fewer bytes.
        stage1_epochs: Epochs of stage 1 (head or task distillation with the rate term).
        stage2_epochs: Epochs of fine-tuning on the integer latent.
        stage1: ``"head"`` (feature distillation + rate, the device half trains, the later
            stages are frozen) or ``"task"`` (end to end: KD from ``teacher`` + rate, every
            stage trains; for rates of a few bytes). See :data:`STAGE1_LOSSES`.
        stage2_loss: ``"kd"`` or ``"ce"``.
        lr: Learning rate (AdamW, cosine decay).
        batch_size: Batch size.
        seed: Seed.
        components: Logistic components of each element's prior.
        progress: Progress bars.

    Returns:
        An :class:`EntropicStudentResult`; freeze its prior with
        :func:`~splitexit.split.bottleneck.freeze_tables`.
    """
    if stage2_loss not in ("kd", "ce"):
        raise InputError(f"stage2_loss must be 'kd' or 'ce', got {stage2_loss!r}")
    if stage1 not in STAGE1_LOSSES:
        raise InputError(f"stage1 must be one of {STAGE1_LOSSES}, got {stage1!r}")
    torch.manual_seed(seed)
    student = inject_entropy_bottleneck(teacher, cut, spec, data.x[:64], components)
    cfg = TrainConfig(epochs=stage1_epochs, lr=lr, batch_size=batch_size, seed=seed,
                      progress=progress)
    first = (RateDistillation(teacher, beta, prior_lr=lr * PRIOR_LR_FACTOR) if stage1 == "head"
             else RateTaskDistillation(teacher, beta, prior_lr=lr * PRIOR_LR_FACTOR))
    h1 = train(student, data, first, cfg)
    cfg2 = TrainConfig(epochs=stage2_epochs, lr=lr, batch_size=batch_size, seed=seed + 1,
                       progress=progress)
    stage2 = EntropyFineTune(teacher if stage2_loss == "kd" else None,
                             prior_lr=lr * PRIOR_LR_FACTOR)
    h2 = train(student, data, stage2, cfg2)
    student.eval()
    return EntropicStudentResult(student, h1, h2)
