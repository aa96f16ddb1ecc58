"""BottleFit training of an injected bottleneck, and the autoencoder baseline it is compared with.

BottleFit (Matsubara et al., WoWMoM'22) trains in two stages:

1. **Head distillation**: the new device half (original layers up to the cut plus the encoder)
   and the decoder learn to reproduce the trained teacher's features at the cut and at every
   later cut (sum of MSEs); the later stages are frozen.
2. **Fine-tuning** with the device half, encoder included, frozen: decoder and later stages
   learn from knowledge distillation (temperature 1, alpha 0.5) or plain cross-entropy.
   Because nothing before the bottleneck trains any more, the decoder can see exactly what
   the server will receive: pass ``codec=`` to fine-tune on codec-decoded bottleneck tensors.

Optionally (``stage1_noise=levels``), stage 1 adds uniform quantisation noise to the bottleneck
tensor, one step ``(max - min) / levels`` of each sample wide, as an int8 (255 levels) or int4
(15 levels) quantiser with one scale per sample would; the encoder then learns a representation
that survives the codec (the noise is differentiable, rounding is not).

The baseline (:func:`autoencoder_baseline`) inserts an autoencoder at the cut of the trained
model and trains only it to reconstruct the cut's features; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..split.bottleneck import (
    BottleneckedModel,
    BottleneckSpec,
    decoded_cut_name,
    inject_bottleneck,
)
from ..split.codec import Codec
from ..stages import Payload, StagedModel
from .base import Strategy, TrainConfig, TrainHistory, freeze, train

__all__ = ["OUTPUT", "quantization_noise", "HeadDistillation", "BottleneckFineTune", "BottleFitResult", "bottlefit",
           "autoencoder_baseline", "head_distillation_targets"]

OUTPUT = "output"
"""Target name of the model's final output in head distillation."""


def _check_student(model: nn.Module) -> BottleneckedModel:
    if not isinstance(model, BottleneckedModel):
        raise InputError(f"BottleFit trains a BottleneckedModel (see "
                         f"splitexit.split.bottleneck.inject_bottleneck), got {type(model).__name__}")
    return model


def _unfreeze(modules: Sequence[nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(True)


def quantization_noise(z: torch.Tensor, levels: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``z`` plus uniform noise of one quantisation step per sample (the int8/int4 codec's error).

    The step is ``(max - min) / levels`` over each sample (dim 0), as the codec's per-tensor
    scale for a one-sample message; it is treated as a constant (no gradient through it).

    Args:
        z: A batch of bottleneck tensors (N, ...).
        levels: Quantisation levels, e.g. 255 (int8) or 15 (int4).
        generator: Optional random generator.

    Returns:
        A tensor of ``z``'s shape.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise InputError(f"noise levels must be an int >= 1 (255 for int8, 15 for int4), "
                         f"got {levels!r}")
    flat = z.detach().reshape(z.shape[0], -1)
    step = (flat.amax(1) - flat.amin(1)) / levels
    step = step.reshape(-1, *([1] * (z.dim() - 1)))
    noise = torch.rand(z.shape, generator=generator, dtype=z.dtype, device=z.device) - 0.5
    return z + noise * step


def head_distillation_targets(student: BottleneckedModel) -> list[str]:
    """Default targets: the decoded cut and every later cut (plus the output if there is none)."""
    start = student.cut_index(decoded_cut_name(student.source_cut))
    targets = student.cut_names[start:]
    return targets if len(targets) > 1 else [*targets, OUTPUT]


class HeadDistillation(Strategy):
    """Stage 1 of BottleFit (and, restricted, the autoencoder baseline).

    Loss: sum over ``targets`` of the MSE between the student's output at that cut and the
    teacher's features at the matching cut (``"<cut>/decoded"`` matches ``<cut>``;
    :data:`OUTPUT` matches the teacher's output).

    Args:
        teacher: The trained original StagedModel (kept in eval mode, never updated).
        targets: Student cut names to match; default :func:`head_distillation_targets`.
        trainable: ``"head"`` trains the device half, encoder and decoder (BottleFit);
            ``"bottleneck"`` trains only encoder and decoder (autoencoder baseline).
        noise_levels: Add :func:`quantization_noise` with this many levels to the bottleneck
            tensor while training (None: no noise).
    """

    name = "head-distillation"

    def __init__(self, teacher: StagedModel, targets: Sequence[str] | None = None,
                 trainable: str = "head", noise_levels: int | None = None):
        if trainable not in ("head", "bottleneck"):
            raise InputError(f"trainable must be 'head' or 'bottleneck', got {trainable!r}")
        if noise_levels is not None and (isinstance(noise_levels, bool)
                                         or not isinstance(noise_levels, int)
                                         or noise_levels < 1):
            raise InputError(f"noise_levels must be None or an int >= 1 (255 for int8, 15 for "
                             f"int4), got {noise_levels!r}")
        self.noise_levels = noise_levels
        if not isinstance(teacher, StagedModel):
            raise InputError(f"teacher must be a StagedModel, got {type(teacher).__name__}")
        self._teacher = teacher
        self.targets = list(targets) if targets is not None else None
        self.trainable = trainable

    def prepare(self, model: nn.Module, data=None) -> None:
        student = _check_student(model)
        self.targets = check_targets(student, self._teacher, self.targets)
        e = student.encoder_index
        freeze([student])
        first = 0 if self.trainable == "head" else e
        _unfreeze(list(student.stages[first: e + 2]))
        self._teacher.eval()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        student: BottleneckedModel = model
        noisy = student.bottleneck_cut if self.noise_levels and student.training else None

        def outputs():
            payload: Payload = x
            for stage, name in zip(student.stages, [*student.cut_names, OUTPUT], strict=True):
                payload = stage(payload)
                if name == noisy:
                    payload = quantization_noise(payload, self.noise_levels)
                yield name, payload

        return feature_mse(student, outputs(), self._teacher, x, self.targets)


def check_targets(student, teacher: StagedModel, targets: Sequence[str] | None) -> list[str]:
    """The student cuts head distillation matches (default :func:`head_distillation_targets`),
    each checked to have a counterpart in the teacher."""
    targets = list(targets) if targets is not None else head_distillation_targets(student)
    teacher_names = [*teacher.cut_names, OUTPUT]
    for t in targets:
        mapped = OUTPUT if t == OUTPUT else student.teacher_cut(t)
        if mapped is None or mapped not in teacher_names:
            raise InputError(f"distillation target {t!r} has no counterpart in the teacher "
                             f"(teacher cuts: {teacher.cut_names}); choose among "
                             f"{head_distillation_targets(student)}")
    return targets


def feature_mse(student, outputs, teacher: StagedModel, x: torch.Tensor,
                targets: Sequence[str]) -> torch.Tensor:
    """Sum of the MSEs between the student's payload at each target cut and the teacher's at
    the matching cut. ``outputs`` yields ``(cut name, payload)`` in stage order, lazily: it is
    not advanced past the last target."""
    with torch.no_grad():
        feats = dict(zip([*teacher.cut_names, OUTPUT], teacher.forward_intermediates(x),
                         strict=True))
    remaining = set(targets)
    total = x.new_zeros(())
    for name, payload in outputs:
        if name in remaining:
            total = total + _mse(payload, feats[OUTPUT if name == OUTPUT
                                                else student.teacher_cut(name)])
            remaining.discard(name)
            if not remaining:
                break
    return total


def check_kd(teacher: StagedModel | None, temperature: float, alpha: float) -> None:
    """Clear errors for the knowledge-distillation settings of a stage-2 strategy."""
    if teacher is not None and not isinstance(teacher, StagedModel):
        raise InputError(f"teacher must be a StagedModel or None, got {type(teacher).__name__}")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")


def kd_loss(logits: torch.Tensor, y: torch.Tensor, teacher: StagedModel | None,
            x: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """``alpha`` x KD from ``teacher`` at ``temperature`` + ``(1 - alpha)`` x cross-entropy
    (cross-entropy alone without a teacher or with ``alpha == 0``)."""
    loss = F.cross_entropy(logits, y)
    if teacher is None or alpha == 0:
        return loss
    with torch.no_grad():
        teacher_logits = teacher(x)
    return alpha * softened_kl(logits, teacher_logits, temperature) + (1 - alpha) * loss


def softened_kl(logits: torch.Tensor, teacher_logits: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Hinton's distillation term: the KL divergence from the teacher's temperature-softened
    distribution to the student's, times ``temperature ** 2`` (batch mean)."""
    target = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(F.log_softmax(logits / temperature, dim=1), target,
                    reduction="batchmean") * temperature ** 2


def _mse(a: Payload, b: Payload) -> torch.Tensor:
    if isinstance(a, tuple):
        return sum(F.mse_loss(s, t) for s, t in zip(a, b, strict=True))
    return F.mse_loss(a, b)


class BottleneckFineTune(Strategy):
    """Stage 2 of BottleFit: device half and encoder frozen, decoder and tail trained.

    Args:
        teacher: For knowledge distillation; None trains with cross-entropy only.
        temperature: KD temperature (BottleFit: 1).
        alpha: Weight of the KD term; ``1 - alpha`` weighs cross-entropy (BottleFit: 0.5).
        codec: If given, each sample's bottleneck tensor goes through this codec's
            encode/decode before the decoder, so the server side learns the quantised input.
    """

    name = "bottleneck-finetune"

    def __init__(self, teacher: StagedModel | None = None, temperature: float = 1.0,
                 alpha: float = 0.5, codec: Codec | None = None):
        check_kd(teacher, temperature, alpha)
        if codec is not None and not isinstance(codec, Codec):
            raise InputError(f"codec must be a Codec or None, got {type(codec).__name__}")
        self._teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha) if teacher is not None else 0.0
        self._codec = codec
        self.codec = codec.spec() if codec is not None else None

    def prepare(self, model: nn.Module, data=None) -> None:
        student = _check_student(model)
        e = student.encoder_index
        freeze(list(student.stages[: e + 1]))
        _unfreeze(list(student.stages[e + 1:]))
        if self._teacher is not None:
            self._teacher.eval()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        student: BottleneckedModel = model
        e = student.encoder_index
        with torch.no_grad():
            z = student.run(x, 0, e + 1)
            if self._codec is not None:
                z = torch.cat([self._codec.decode(self._codec.encode(z[i: i + 1]))
                               for i in range(z.shape[0])])
        return kd_loss(student.run(z, e + 1), y, self._teacher, x, self.temperature,
                       self.alpha)


@dataclass
class BottleFitResult:
    """A trained bottlenecked model and the histories of both stages."""

    model: BottleneckedModel
    stage1: TrainHistory
    stage2: TrainHistory


def _config(epochs: int, lr: float, batch_size: int, seed: int, progress: bool | None
            ) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)


def bottlefit(teacher: StagedModel, cut: str, spec: BottleneckSpec, data, *,
              stage1_epochs: int = 2, stage2_epochs: int = 2, stage2_loss: str = "kd",
              lr: float = 2e-3, batch_size: int = 128, seed: int = 0,
              codec: Codec | None = None, targets: Sequence[str] | None = None,
              stage1_noise: int | None = None, progress: bool | None = None
              ) -> BottleFitResult:
    """Inject a bottleneck into a copy of ``teacher`` at ``cut`` and train it the BottleFit way.

    Args:
        teacher: The trained StagedModel (left unchanged).
        cut: Where to inject the bottleneck (one 4-D tensor payload).
        spec: Bottleneck channels, stride and widths.
        data: Training split (:class:`splitexit.data.Split`).
        stage1_epochs: Epochs of head distillation.
        stage2_epochs: Epochs of fine-tuning with the encoder frozen.
        stage2_loss: ``"kd"`` (temperature 1, alpha 0.5) or ``"ce"``.
        lr: Learning rate of both stages (AdamW, cosine decay).
        batch_size: Batch size.
        seed: Seed of initialisation and shuffling.
        codec: Fine-tune the server side on codec-decoded bottleneck tensors (stage 2).
        targets: Head-distillation targets; default :func:`head_distillation_targets`.
        stage1_noise: Quantisation levels of the noise added to the bottleneck in stage 1
            (15 prepares for int4, 255 for int8; None: none).
        progress: Show progress bars (None: when stderr is a terminal).

    Returns:
        A :class:`BottleFitResult`; split its model with ``split_model(result.model)``.

    Raises:
        InputError: Bad loss name, bad cut for a bottleneck, bad numbers.
    """
    if stage2_loss not in ("kd", "ce"):
        raise InputError(f"stage2_loss must be 'kd' or 'ce', got {stage2_loss!r}")
    torch.manual_seed(seed)
    student = inject_bottleneck(teacher, cut, spec, data.x[:64])
    h1 = train(student, data, HeadDistillation(teacher, targets, "head", stage1_noise),
               _config(stage1_epochs, lr, batch_size, seed, progress))
    ft = BottleneckFineTune(teacher if stage2_loss == "kd" else None, codec=codec)
    h2 = train(student, data, ft, _config(stage2_epochs, lr, batch_size, seed + 1, progress))
    student.eval()
    return BottleFitResult(student, h1, h2)


def autoencoder_baseline(teacher: StagedModel, cut: str, spec: BottleneckSpec, data, *,
                         epochs: int = 2, lr: float = 2e-3, batch_size: int = 128, seed: int = 0,
                         progress: bool | None = None) -> tuple[BottleneckedModel, TrainHistory]:
    """Insert an autoencoder at ``cut`` of a trained model; train only it to reconstruct.

    The encoder and decoder have the same shapes as BottleFit's; the loss is the MSE between
    the decoder's output and the teacher's features at ``cut``; every original layer is frozen.

    Args:
        teacher: The trained StagedModel (left unchanged).
        cut: Where to insert the autoencoder.
        spec: Its channels, stride and widths.
        data: Training split.
        epochs: Training epochs.
        lr: Learning rate.
        batch_size: Batch size.
        seed: Seed.
        progress: Show progress bars.

    Returns:
        The model with the trained autoencoder, and the training history.
    """
    torch.manual_seed(seed)
    student = inject_bottleneck(teacher, cut, spec, data.x[:64])
    strategy = HeadDistillation(teacher, [decoded_cut_name(cut)], trainable="bottleneck")
    history = train(student, data, strategy, _config(epochs, lr, batch_size, seed, progress))
    student.eval()
    return student, history
