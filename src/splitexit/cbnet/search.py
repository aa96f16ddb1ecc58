"""Converter search for speed at a fixed accuracy.

Candidates (:data:`SEARCH_SPACE`) are narrower fully connected autoencoders, a small
convolutional one and converters distilled from the published one (:data:`PUBLISHED`), all
with a linear output so they fold into the classifier (:func:`~splitexit.cbnet.fold_pipeline`).
:func:`select_fastest` keeps the candidates whose calibration accuracy reaches a floor (e.g.
BranchyNet's) and picks the one with the lowest batch-1 latency measured on ONNX Runtime, the
deployment runtime, timed interleaved on calibration images (never the test split).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..calibration import paired_drop_ci
from ..data import Split
from ..errors import InputError
from ..training import Baseline, train
from ..training.base import Strategy, TrainHistory
from ..training.bottlefit import check_kd, kd_loss
from .converter import ConvertingAutoencoder

__all__ = ["ConverterSpec", "FinalExit", "PUBLISHED", "SEARCH_SPACE", "Selection",
           "finetune_joint", "onnx_latency", "random_shift", "select_fastest"]


@dataclass(frozen=True)
class ConverterSpec:
    """One converter to try.

    Attributes:
        name: label in reports.
        kind, hidden, channels, output: :class:`ConvertingAutoencoder` arguments.
        distilled: trained on the published converter's outputs instead of the targets.
        converter_epochs: epochs of the converter's own training (``None``: the suite's),
            e.g. fewer when joint fine-tuning retrains its code anyway.
        joint_epochs, joint_lr: joint fine-tuning of this candidate (``None``: the suite's
            defaults), e.g. longer for a narrow code that needs it.
        joint_teacher: ``"published"``: the joint fine-tuning also distils the published
            CBNet pipeline's logits (:func:`finetune_joint`); ``"control"``: the final exit
            of BranchyNet trained as long as the CBNets (the benchmark's equal-training
            control); ``None``: labels only.
        joint_shift: joint fine-tuning on images shifted by up to this many pixels (random
            per image, zero fill; :func:`random_shift`); 0: no augmentation.
        joint_weight_decay: AdamW weight decay of the joint fine-tuning (``None``: the
            training default).
    """

    name: str
    kind: str = "fc"
    hidden: tuple[int, ...] = (64,)
    channels: tuple[int, ...] = (16, 32)
    output: str = "linear"
    distilled: bool = False
    converter_epochs: int | None = None
    joint_epochs: int | None = None
    joint_lr: float | None = None
    joint_teacher: str | None = None
    joint_shift: int = 0
    joint_weight_decay: float | None = None

    def build(self, input_shape: Sequence[int]) -> ConvertingAutoencoder:
        return ConvertingAutoencoder(input_shape, self.kind, self.hidden, self.channels,
                                     self.output)

    def key(self) -> str:
        """A file-name-safe key of every setting."""
        parts = [self.kind, "h" + "-".join(map(str, self.hidden)), self.output]
        if self.kind in ("conv", "convfc", "patchfc", "stridefc"):
            parts.append("c" + "-".join(map(str, self.channels)))
        if self.distilled:
            parts.append("distilled")
        if self.converter_epochs is not None:
            parts.append(f"e{self.converter_epochs}")
        if self.joint_epochs is not None:
            parts.append(f"j{self.joint_epochs}")
        if self.joint_lr is not None:
            parts.append(f"jlr{self.joint_lr:g}")
        if self.joint_teacher is not None:
            parts.append(f"kd-{self.joint_teacher}")
        if self.joint_shift:
            parts.append(f"shift{self.joint_shift}")
        if self.joint_weight_decay is not None:
            parts.append(f"wd{self.joint_weight_decay:g}")
        return "_".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


#: the published converter (Dogra et al.): 784-512-384-256-64-784, sigmoid output
PUBLISHED = ConverterSpec("fc 784-512-384-256-64-784 (published)", hidden=(512, 384, 256, 64),
                          output="sigmoid")

SEARCH_SPACE: tuple[ConverterSpec, ...] = (
    ConverterSpec("fc 784-64-784", hidden=(64,)),
    ConverterSpec("fc 784-32-784", hidden=(32,)),
    ConverterSpec("fc 784-64-784 distilled", hidden=(64,), distilled=True),
    ConverterSpec("fc 784-32-784 distilled", hidden=(32,), distilled=True),
    ConverterSpec("conv 4-8 code 32", kind="conv", hidden=(32,), channels=(4, 8)),
    ConverterSpec("fc 784-128-64-784", hidden=(128, 64)),
    ConverterSpec("fc 784-256-64-784 distilled", hidden=(256, 64), distilled=True),
    # a 32-wide code folds into a dense layer no dearer than the conv it replaces; the
    # narrow code needs longer joint fine-tuning to reach BranchyNet's accuracy
    ConverterSpec("fc 784-128-32-784", hidden=(128, 32), joint_epochs=10, joint_lr=1e-3,
                  joint_teacher="published"),
    ConverterSpec("fc 784-256-32-784", hidden=(256, 32), joint_epochs=10, joint_lr=1e-3,
                  joint_teacher="published"),
    # a cheaper front than a wide fc layer: two small strided convolutions (a conv encoder,
    # an fc decoder: its linear output still folds; a 16-wide code halves the folded dense
    # layer), distilling the equal-training BranchyNet control, the suite budget's best model
    ConverterSpec("convfc 8-16 code 32", kind="convfc", hidden=(32,), channels=(8, 16),
                  joint_epochs=10, joint_lr=1e-3, joint_teacher="control"),
    ConverterSpec("convfc 8-16 code 16", kind="convfc", hidden=(16,), channels=(8, 16),
                  joint_epochs=10, joint_lr=1e-3, joint_teacher="control"),
    # cheaper still: the two convs' 7x7 receptive field from one 7x7 stride-4 conv (one conv
    # and one layout reorder fewer on ONNX Runtime) and a 24-wide code (the folded dense layer
    # 3/4 of code 32's bytes); the same recipe at twice the joint learning rate
    ConverterSpec("stridefc 24 code 24", kind="stridefc", hidden=(24,), channels=(24,),
                  joint_epochs=10, joint_lr=2e-3, joint_teacher="control"),
    ConverterSpec("stridefc 16 code 24", kind="stridefc", hidden=(24,), channels=(16,),
                  joint_epochs=10, joint_lr=2e-3, joint_teacher="control"),
)


def random_shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Every image of ``x`` ``(N, C, H, W)`` translated by its own random offset of up to
    ``pixels`` in each direction, zero-filled (training augmentation; uses torch's RNG).

    Raises:
        InputError: ``pixels`` not an integer in ``[0, min(H, W))``, or ``x`` not 4-D.
    """
    if x.dim() != 4:
        raise InputError(f"random_shift takes images (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if isinstance(pixels, bool) or not isinstance(pixels, int) or not 0 <= pixels < min(h, w):
        raise InputError(f"the shift is a whole number of pixels in [0, {min(h, w)}), got "
                         f"{pixels!r}")
    if pixels == 0:
        return x
    padded = torch.nn.functional.pad(x, (pixels,) * 4)
    dy = torch.randint(0, 2 * pixels + 1, (n,))
    dx = torch.randint(0, 2 * pixels + 1, (n,))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pixels)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


class _Joint(Strategy):
    """Cross-entropy on the labels, optionally plus knowledge distillation from a fixed
    teacher's logits (:func:`splitexit.training.bottlefit.kd_loss`), on randomly shifted
    images when ``shift`` > 0 (the teacher sees the same shifted images)."""

    name = "cbnet-joint"

    def __init__(self, teacher: nn.Module | None, temperature: float, alpha: float,
                 shift: int):
        check_kd(None, temperature, alpha)  # the teacher may be any module
        self._teacher = None if teacher is None else teacher.eval()
        self.temperature, self.alpha, self.shift = float(temperature), float(alpha), shift

    def loss(self, model, x, y):
        x = random_shift(x, self.shift)
        return kd_loss(model(x), y, self._teacher, x, self.temperature, self.alpha)


class FinalExit(nn.Module):
    """A multi-exit model's final-exit logits (e.g. as a distillation teacher)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[-1]


def finetune_joint(pipeline: nn.Module, data: Split, *, epochs: int = 2, lr: float = 5e-4,
                   batch_size: int = 128, seed: int = 0, teacher: nn.Module | None = None,
                   temperature: float = 4.0, alpha: float = 0.7, shift: int = 0,
                   weight_decay: float | None = None,
                   progress: bool | None = None) -> TrainHistory:
    """Fine-tune converter and classifier together on the labels (cross-entropy), optionally
    distilling a trained ``teacher``'s logits (e.g. the published CBNet pipeline) and on
    randomly shifted images.

    The converter then no longer aims at the target images: it learns whatever code the light
    classifier reads best. Reports must label such pipelines as jointly fine-tuned.

    Args:
        teacher: a fixed model mapping the same images to logits; ``None``: labels only.
        temperature, alpha: the distillation temperature and the weight of its term
            (``1 - alpha`` weighs the cross-entropy).
        shift: augmentation: images shifted by up to this many pixels (:func:`random_shift`).
        weight_decay: AdamW weight decay (``None``: the training default).

    Raises:
        InputError: ``temperature <= 0``, ``alpha`` outside [0, 1], a shift that is not a
            whole number of pixels smaller than the image, or a negative weight decay.
    """
    check_kd(None, temperature, alpha)
    if weight_decay is not None and not weight_decay >= 0:
        raise InputError(f"weight_decay must be >= 0, got {weight_decay!r}")
    random_shift(data.x[:1], shift)  # a bad shift fails before any training
    strategy = (Baseline() if teacher is None and not shift
                else _Joint(teacher, temperature, alpha, shift))
    extra = {} if weight_decay is None else {"weight_decay": float(weight_decay)}
    return train(pipeline, data, strategy, epochs=epochs, lr=lr, batch_size=batch_size,
                 seed=seed, progress=progress, **extra)


def onnx_latency(modules: Mapping[str, nn.Module], x: torch.Tensor, directory: str | Path,
                 threads: int = 1, warmup: int = 10, chunks: int | None = None
                 ) -> dict[str, dict]:
    """Batch-1 latency of each module exported to ONNX and run by ONNX Runtime, interleaved
    over the samples ``x`` in ``chunks`` groups (:func:`splitexit.measure.interleaved_seconds`;
    ``None``: one sample per group) (``{name: {"mean_ms", "median_ms", ...}}``)."""
    from ..measure import interleaved_latency
    from ..runtime.ort import OrtSession
    from .pipeline import export_onnx

    directory = Path(directory)
    fns = {}
    for i, (name, module) in enumerate(modules.items()):
        session = OrtSession(export_onnx(module.eval(), directory / f"candidate{i}.onnx",
                                         tuple(x.shape[1:])), threads)
        fns[name] = (lambda s: lambda t: s.run_arrays([t.numpy()])[0])(session)
    return interleaved_latency(fns, x, warmup=warmup, chunks=chunks)


@dataclass
class Selection:
    """What :func:`select_fastest` measured and chose.

    Attributes:
        chosen: the fastest candidate at the accuracy floor (``None``: none reached it).
        min_accuracy: the floor.
        table: per candidate: calibration accuracy, ONNX Runtime batch-1 mean and median
            latency (ms), whether it reached the floor; with a reference also the paired
            accuracy gain over it and the gain's lower confidence bound (points).
        guarded: with a reference: whether ``chosen`` is ahead of it with confidence
            (``False``: no candidate was, and ``chosen`` only reached the point floor);
            ``None`` without a reference.
    """

    chosen: str | None
    min_accuracy: float
    table: list[dict] = field(default_factory=list)
    guarded: bool | None = None


@torch.no_grad()
def select_fastest(pipelines: Mapping[str, nn.Module], calib: Split, min_accuracy: float, *,
                   samples: int = 2000, threads: int = 1,
                   directory: str | Path | None = None, reference: torch.Tensor | None = None,
                   z: float = 1.645, chunks: int | None = None) -> Selection:
    """The fastest pipeline on ONNX Runtime (batch 1) among those whose calibration accuracy
    is at least ``min_accuracy``.

    With ``reference`` (the reference model's predictions on the calibration images, e.g.
    BranchyNet's), a candidate must be at least as accurate as the reference with confidence:
    the lower bound of its paired accuracy gain (:func:`splitexit.calibration.paired_drop_ci`,
    normal quantile ``z``; 1.645: one-sided 95%) must be >= 0. A point floor alone picks the
    luckiest candidate on a small calibration split; the bound guards against that. When no
    candidate clears the bound, the fastest at the point floor is chosen and
    :attr:`Selection.guarded` says so.

    Args:
        pipelines: ``{name: pipeline}`` (any modules mapping images to logits).
        calib: the calibration split (accuracy on all of it; latency on ``samples`` of it).
        min_accuracy: the accuracy floor, a fraction (e.g. BranchyNet's calibration accuracy).
        samples: calibration images timed one at a time.
        threads: ONNX Runtime threads.
        directory: where the ONNX files go (a temporary directory when ``None``).
        reference: the reference's predicted class per calibration image (optional).
        z: normal quantile of the confidence bound.
        chunks: the timed images cut into this many consecutive groups, each candidate running
            a whole group warm before the next one (:func:`splitexit.measure.interleaved_seconds`;
            ``None``: one image per group, so every call starts with the other candidates'
            weights in the caches). Time the candidates as the test timing does: a model with a
            larger weight matrix (e.g. a folded one) ranks behind when every call runs cold,
            ahead when it runs warm, as a deployed model serving a stream does.

    Raises:
        InputError: no pipelines, ``min_accuracy`` outside [0, 1], a reference that is not
            one prediction per calibration image, or ``z < 0``.
    """
    if not pipelines:
        raise InputError("no candidate pipelines to select from")
    if not 0.0 <= min_accuracy <= 1.0:
        raise InputError(f"min_accuracy is a fraction in [0, 1], got {min_accuracy!r}")
    if reference is not None and tuple(reference.shape) != (len(calib.y),):
        raise InputError(f"reference must be one predicted class per calibration image, shape "
                         f"({len(calib.y)},), got {tuple(reference.shape)}")
    if not z >= 0:
        raise InputError(f"z is a normal quantile >= 0 (1.645: one-sided 95%), got {z!r}")
    accuracy, gain = {}, {}
    for name, module in pipelines.items():
        module.eval()
        pred = torch.cat([module(calib.x[i: i + 1024]).argmax(1)
                          for i in range(0, len(calib.x), 1024)])
        accuracy[name] = float((pred == calib.y).double().mean())
        if reference is not None:
            drop, _, high = paired_drop_ci(reference == calib.y, pred == calib.y, z)
            gain[name] = (-drop, -high)
    with tempfile.TemporaryDirectory(prefix="splitexit-search-") as tmp:
        latency = onnx_latency(pipelines, calib.x[:samples], directory or tmp, threads,
                               chunks=chunks)
    table = [{"candidate": n, "calib_accuracy": accuracy[n],
              "onnx_latency_ms": latency[n]["mean_ms"],
              "onnx_latency_p50_ms": latency[n]["median_ms"],
              "meets_accuracy": accuracy[n] >= min_accuracy} for n in pipelines]
    guarded = None
    if reference is not None:
        for r in table:
            r["gain_pt"], r["gain_low_pt"] = gain[r["candidate"]]
            r["meets_accuracy_with_confidence"] = r["meets_accuracy"] and r["gain_low_pt"] >= 0
        guarded = any(r["meets_accuracy_with_confidence"] for r in table)
    ok = [r for r in table if r["meets_accuracy_with_confidence" if guarded else
                               "meets_accuracy"]]
    chosen = min(ok, key=lambda r: r["onnx_latency_ms"])["candidate"] if ok else None
    for r in table:
        r["chosen"] = r["candidate"] == chosen
    return Selection(chosen, min_accuracy, table, guarded if chosen else None)
