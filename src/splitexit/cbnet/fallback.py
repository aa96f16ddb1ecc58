"""CBNet with a fallback exit: the converter and the tiny classifier answer confident samples;
the rest continue through the rest of LeNet.

:func:`fallback_model` builds a plain :class:`~splitexit.multiexit.MultiExitModel`, so the
fallback CBNet runs on the one exit machinery like every multi-exit model: ``model.infer``,
calibration (:func:`calibrate_fallback`, or the guarded thresholds of
:mod:`splitexit.calibration`), :func:`splitexit.program.lower` and ONNX Runtime (pieces, or the
batch-1 exit graph), bundles (:func:`splitexit.deploy.bundle`).

Its exit 0 is the CBNet pipeline (converter, then the light classifier, folded or not, as a
flat chain with :func:`~splitexit.cbnet.lean_layers`' exact rewrites); its final exit is the rest of LeNet, on one of two inputs:

- ``on="converted"``: LeNet continues from the first convolution's output on the converted
  image, the very features the light classifier's branch read (nothing is recomputed);
- ``on="original"``: the payload after exit 0 is the original image itself (exit 0's head is
  the whole CBNet pipeline) and LeNet runs from its first convolution on it (a hard sample
  costs LeNet's first convolution again).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import choose_operating_point, sweep
from ..cost import count_macs
from ..data import Split
from ..errors import InputError
from ..multiexit import MultiExitModel
from ..policies import MaxProb
from ..stages import Stage, StagedModel
from .lean import lean_layers

__all__ = ["FallbackCBNet", "fallback_model", "calibrate_fallback", "check_confidence"]

FALLBACK_ON = ("converted", "original")


def check_confidence(threshold) -> float:
    """``threshold`` as a confidence in ``[0, 1]`` (the top softmax probability), or a clear
    :class:`InputError`."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            0.0 <= float(threshold) <= 1.0):
        raise InputError(f"the fallback threshold is a confidence (top softmax probability) in "
                         f"[0, 1], got {threshold!r}; e.g. 0.9 sends every sample whose top "
                         "probability at exit 0 is below 0.9 on to the rest of LeNet, or "
                         "calibrate one with splitexit.cbnet.calibrate_fallback")
    return float(threshold)


def _backbone(rest: nn.Module) -> StagedModel:
    if isinstance(rest, MultiExitModel):
        rest = rest.backbone
    if not isinstance(rest, StagedModel) or rest.num_stages < 2:
        raise InputError("rest must be a LeNet (create_model('lenet', ...)) or a B-LeNet "
                         "(MultiExitModel): a staged network of at least two stages whose first "
                         "stage is the convolution the light classifier starts with")
    return rest


def _chain(module: nn.Module) -> nn.Module:
    """A copy of ``module`` as one flat ``nn.Sequential`` of its primitive layers
    (:func:`~splitexit.cbnet.lean_layers`), or a plain copy when it has other layers."""
    try:
        return nn.Sequential(*copy.deepcopy(lean_layers(module)))
    except InputError:
        return copy.deepcopy(module)


def fallback_model(pipeline: nn.Module, rest: nn.Module, on: str = "original") -> MultiExitModel:
    """The fallback CBNet as a multi-exit model (modules copied; the inputs are unchanged).

    Args:
        pipeline: a :class:`~splitexit.cbnet.CBNetPipeline` or
            :class:`~splitexit.cbnet.FoldedPipeline` (its classifier a :class:`StagedModel`
            whose first stage is the first convolution, its last the exit branch).
        rest: the trained LeNet (or B-LeNet) whose stages after the first continue.
        on: ``"original"`` or ``"converted"`` (see the module docstring).

    Returns:
        A :class:`MultiExitModel` with two exits: 0 (CBNet), final (LeNet).

    Raises:
        InputError: an unknown ``on``, a classifier that is not a staged first-convolution +
            branch, or a ``rest`` that is not a staged LeNet fitting the pipeline's input.
    """
    if on not in FALLBACK_ON:
        raise InputError(f"on must be one of {FALLBACK_ON}, got {on!r}")
    classifier = pipeline.classifier
    if not isinstance(classifier, StagedModel) or classifier.num_stages != 2:
        raise InputError("the pipeline's classifier must be the light classifier "
                         "(splitexit.cbnet.light_classifier: first convolution, then branch)")
    backbone = _backbone(rest)
    input_shape = tuple(pipeline.input_shape)
    # the CBNet parts as flat primitive chains (lean_layers: exact rewrites, fused ReLUs)
    front = _chain(nn.Sequential(pipeline.converter, classifier.stages[0].module))
    branch = copy.deepcopy(classifier.stages[1].module)
    later = [copy.deepcopy(s.module) for s in backbone.stages[1:]]
    names = list(backbone.cut_names)
    if on == "converted":
        stages = [Stage(front, "front"), *(Stage(m, n) for m, n in zip(later, names[1:] + [
            "output"]))]
        heads = {"front": branch}
    else:  # the payload stays the image; the head is the whole CBNet pipeline
        first = copy.deepcopy(backbone.stages[0].module)
        stages = [Stage(nn.Identity(), "image"),
                  *(Stage(m, n) for m, n in zip([first, *later], names + ["output"]))]
        heads = {"image": _chain(pipeline)}
    staged = StagedModel(stages, [s.name for s in stages[:-1]])
    try:
        model = MultiExitModel(staged, heads, input_shape)
        with torch.no_grad():
            outs = model.eval()(torch.full((1, *input_shape), 0.5))
    except (RuntimeError, InputError) as exc:
        raise InputError(f"the rest of LeNet does not fit the CBNet pipeline (input shape "
                         f"{input_shape}): {exc}") from exc
    if outs[0].shape != outs[-1].shape:
        raise InputError(f"exit 0 gives {tuple(outs[0].shape[1:])} logits but the rest of "
                         f"LeNet gives {tuple(outs[-1].shape[1:])}; use models of the same "
                         "classes")
    return model


def exit_macs(model: MultiExitModel) -> list[float]:
    """MACs of one sample leaving at each exit."""
    x = torch.full((1, *model.input_shape), 0.5)
    first = count_macs(lambda: model.run_head(0, model.backbone.run(x, 0, 1), None))
    return [first, count_macs(lambda: model(x))]


@dataclass
class FallbackCBNet:
    """A fallback CBNet with its calibrated confidence threshold.

    Attributes:
        model: from :func:`fallback_model`.
        threshold: exit 0 answers when its top softmax probability is at least this.
        on: what the rest of LeNet runs on.
        calib_accuracy: accuracy on the calibration split at ``threshold``.
        calib_exit_fractions: share of calibration samples per exit.
        guarded: calibrated against a reference's predictions: whether the threshold's paired
            accuracy gain over the reference has a lower confidence bound >= ``-max_drop``
            (``False``: no threshold had, and the point target chose it); ``None``: no
            reference.
        calib_gain_low_pt: that lower bound (points; ``None`` without a reference).
    """

    model: MultiExitModel
    threshold: float
    on: str = "original"
    calib_accuracy: float | None = None
    calib_exit_fractions: list[float] | None = None
    guarded: bool | None = None
    calib_gain_low_pt: float | None = None

    def __post_init__(self):
        self.threshold = check_confidence(self.threshold)

    @property
    def policy(self) -> MaxProb:
        return MaxProb(self.threshold)

    def infer(self, x: torch.Tensor):
        """Early-exit inference (an :class:`~splitexit.runtime.loop.ExitResult`)."""
        return self.model.infer(x, self.policy)

    def program(self):
        """The exit program (:func:`splitexit.program.lower`) with the calibrated policy."""
        from ..program import lower

        return lower(self.model, self.policy)


def calibrate_fallback(model: MultiExitModel, calib: Split, reference_accuracy: float, *,
                       max_drop: float = 0.0, on: str = "original",
                       thresholds: Sequence[float] | None = None,
                       reference: torch.Tensor | None = None, z: float = 1.645
                       ) -> FallbackCBNet:
    """The cheapest confidence threshold whose calibration accuracy is at least
    ``reference_accuracy - max_drop`` (e.g. LeNet's calibration accuracy, max_drop 0).

    With ``reference`` (the reference model's predicted class per calibration image, e.g.
    LeNet's), the threshold must also hold the target with confidence: the lower bound of its
    paired accuracy gain over the reference (:func:`splitexit.calibration.paired_drop_ci`,
    normal quantile ``z``; 1.645: one-sided 95%) must be at least ``-max_drop``. A point target
    alone lets a threshold pass on calibration luck; the bound asks for a margin that shrinks
    as the fallback's predictions approach the reference's. When no threshold clears the
    bound, the point target decides and :attr:`FallbackCBNet.guarded` is ``False``.

    Raises:
        InputError: no threshold reaches the target (raise ``max_drop``), a candidate
            threshold outside [0, 1], a reference that is not one class per calibration
            image, or ``z < 0``.
    """
    from ..calibration import paired_drop_ci
    from ..runtime.loop import simulate_exits

    if thresholds is not None:
        thresholds = [check_confidence(t) for t in thresholds]
    if reference is not None and tuple(reference.shape) != (len(calib.y),):
        raise InputError(f"reference must be one predicted class per calibration image, shape "
                         f"({len(calib.y)},), got {tuple(reference.shape)}")
    if not z >= 0:
        raise InputError(f"z is a normal quantile >= 0 (1.645: one-sided 95%), got {z!r}")
    logits = model.collect_logits(calib.x)
    macs = exit_macs(model)
    points = sweep(logits, calib.y, macs, MaxProb(), thresholds=thresholds, num=200)
    points.append(next(iter(sweep(logits, calib.y, macs, MaxProb(),
                                  thresholds=[1.0]))))  # everything falls back
    guarded, low = None, None
    if reference is not None:
        floor = reference_accuracy - max_drop
        ref_ok = reference == calib.y
        bounds = {}
        for p in points:
            if p.accuracy >= floor - 1e-12:
                pred = simulate_exits(logits, p.policy).predictions
                bounds[id(p)] = -paired_drop_ci(ref_ok, pred == calib.y, z)[2]
        sure = [p for p in points if bounds.get(id(p), -math.inf) >= -100 * max_drop]
        guarded = bool(sure)
        if sure:
            points = sure
    op = choose_operating_point(points, reference_accuracy=reference_accuracy,
                                max_drop=max_drop)
    if reference is not None:
        pred = simulate_exits(logits, op.policy).predictions
        low = -paired_drop_ci(reference == calib.y, pred == calib.y, z)[2]
    return FallbackCBNet(model, float(op.policy.threshold), on, op.accuracy,
                         list(op.exit_fractions), guarded, low)
