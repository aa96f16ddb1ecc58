"""CBNet: a converting autoencoder turns hard images into easy ones for a lightweight classifier.

The method (Dogra et al., CBNet; TECHNIQUES.md section 3), step by step:

1. :func:`train_branchynet` trains B-LeNet (BranchyNet's joint weighted loss).
2. :func:`first_exit_entropy` scores every training image at the first exit;
   :func:`choose_threshold` picks the entropy threshold ``T`` on the calibration split, and
   an image is **easy** when its entropy is below ``T``, else **hard**.
3. :func:`select_targets` picks, per class, the training image with the lowest first-exit
   entropy (one target), or, with ``per_class > 1``, k-means clusters of the class, each with
   its own lowest-entropy representative (EncodeNet's multi-target variant).
4. :class:`ConvertingAutoencoder` (the published fully connected 784-512-384-256-64-784, or a
   convolutional variant) learns to map every image of a class, hard and easy, to its target
   (:func:`train_converter`).
5. :func:`light_classifier` truncates B-LeNet after its first exit (conv1 + branch);
   :func:`finetune_classifier` optionally adapts it to converted images.
6. :class:`CBNetPipeline` = converter + light classifier, with input validation; it saves and
   loads as safetensors + JSON (:func:`save_pipeline`, :func:`load_pipeline`) and exports to
   ONNX (:func:`export_onnx`, run with :class:`OnnxPipeline`); as an exit program
   (:func:`splitexit.program.as_multiexit`) it also bundles like any model
   (:func:`splitexit.deploy.bundle`).

:func:`train_cbnet` runs steps 1 to 6 from a data set.

**Fallback when a class has no easy sample** (or, with k-means, a cluster has none): its target
is the image with the lowest first-exit entropy among that class's (or cluster's) images even
though it is hard. The choice is recorded in :attr:`CBNetTargets.warnings` and
:attr:`CBNetTargets.fallback_classes` and emitted as a :class:`UserWarning`; converted images of
such a class are then only as easy as that target, so raise ``T`` or train B-LeNet longer.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .calibration import choose_operating_point, sweep
from .cost import count_macs
from .data import Dataset, Split
from .errors import CorruptFileError, InputError
from .multiexit import MultiExitModel, check_input
from .policies import Entropy
from .stages import Stage, StagedModel
from .training import Baseline, JointWeighted, train
from .training.base import Strategy, TrainHistory
from .zoo import create_multiexit

__all__ = [
    "BRANCHYNET_WEIGHTS", "CBNetSettings", "CBNetRun", "CBNetTargets", "CBNetPipeline",
    "ConvertingAutoencoder", "OnnxPipeline", "choose_threshold", "convert", "export_onnx",
    "finetune_classifier", "first_exit_entropy", "first_exit_logits", "light_classifier",
    "load_pipeline", "save_pipeline", "select_targets", "train_branchynet",
    "train_cbnet", "train_converter",
]

BRANCHYNET_WEIGHTS = (1.0, 0.3)  # BranchyNet's loss weights: first branch, final exit


# 1. BranchyNet ----------------------------------------------------------------------------
def train_branchynet(data: Split, num_classes: int, input_shape: Sequence[int], *,
                     epochs: int = 5, weights: Sequence[float] = BRANCHYNET_WEIGHTS,
                     lr: float = 2e-3, batch_size: int = 128, seed: int = 0,
                     init: nn.Module | None = None, progress: bool | None = None
                     ) -> tuple[MultiExitModel, TrainHistory]:
    """Train B-LeNet (the published branch after conv1 as exit 0) with BranchyNet's loss.

    Args:
        data: the training split.
        num_classes: number of classes.
        input_shape: per-sample input shape, e.g. ``(1, 28, 28)``.
        epochs: training epochs.
        weights: loss weight per exit (BranchyNet: 1.0 for the branch, 0.3 for the final exit).
        lr: learning rate.
        batch_size: batch size.
        seed: seed of initialisation and shuffling.
        init: a trained LeNet (``create_model("lenet", ...)``) whose weights start the main
            path; ``None`` trains from scratch as published.
        progress: show progress bars (``None``: when stderr is a terminal).

    Returns:
        The trained :class:`MultiExitModel` in eval mode and its training history.
    """
    torch.manual_seed(seed)
    model = create_multiexit("b-lenet", num_classes, input_shape, head="published")
    if init is not None:
        try:
            model.backbone.load_state_dict(init.state_dict())
        except RuntimeError as exc:
            raise InputError("init must be a LeNet built with the same classes and input "
                             f"shape (create_model('lenet', ...)): {exc}") from exc
    history = train(model, data, JointWeighted(weights), epochs=epochs, lr=lr,
                    batch_size=batch_size, seed=seed, progress=progress)
    return model.eval(), history


def _require_branchynet(model: nn.Module) -> None:
    if not isinstance(model, MultiExitModel) or model.num_exits < 2:
        raise InputError("CBNet needs a B-LeNet with an early exit: build it with "
                         "splitexit.cbnet.train_branchynet or create_multiexit('b-lenet', ..., "
                         "head='published')")


# 2. Easy / hard ---------------------------------------------------------------------------
@torch.no_grad()
def first_exit_logits(model: MultiExitModel, x: torch.Tensor, batch_size: int = 1024
                      ) -> torch.Tensor:
    """Logits of the first exit only (the stages after it are not run)."""
    _require_branchynet(model)
    model.eval()
    first_stage = model.exit_stages[0]
    chunks = []
    for i in range(0, len(x), batch_size):
        payload = model.backbone.run(x[i: i + batch_size], 0, first_stage + 1)
        chunks.append(model.run_head(0, payload, None))
    return torch.cat(chunks)


def first_exit_entropy(model: MultiExitModel, x: torch.Tensor, batch_size: int = 1024
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax entropy (nats) and prediction of the first exit for every image of ``x``."""
    logits = first_exit_logits(model, x, batch_size)
    return Entropy().statistic(logits), logits.argmax(dim=1)


def choose_threshold(model: MultiExitModel, calib: Split, max_drop: float = 0.01) -> float:
    """BranchyNet's entropy threshold, chosen on the calibration split (never the test split).

    The threshold is the cheapest one whose early-exit accuracy stays within ``max_drop``
    (a fraction) of the final exit's calibration accuracy.

    Raises:
        InputError: no threshold meets the target (relax ``max_drop``).
    """
    _require_branchynet(model)
    logits = model.collect_logits(calib.x)
    reference = float((logits[-1].argmax(1) == calib.y).double().mean())
    # Exit costs only order the candidates; the real ones need not be measured here.
    exit_costs = [float(e + 1) for e in range(model.num_exits)]
    points = sweep(logits, calib.y, exit_costs, Entropy())
    op = choose_operating_point(points, reference_accuracy=reference, max_drop=max_drop)
    return float(op.policy.threshold)


# 3. Targets -------------------------------------------------------------------------------
@dataclass
class CBNetTargets:
    """The target images of the converter and which target every training image maps to.

    Attributes:
        threshold: entropy threshold ``T`` (easy: first-exit entropy < ``T``).
        easy: per training image, whether it is easy.
        target_index: index into the training set of each target image.
        target_class: class of each target.
        assignment: per training image, the index of its target in ``target_index``.
        fallback_classes: classes whose target (or one of whose k-means targets) is a hard
            image because no suitable easy image existed.
        warnings: one sentence per fallback.
    """

    threshold: float
    easy: torch.Tensor
    target_index: torch.Tensor
    target_class: torch.Tensor
    assignment: torch.Tensor
    fallback_classes: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def hard_fraction(self) -> float:
        """Share of hard training images."""
        return float((~self.easy).double().mean())

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """The target images, taken from the training images ``x`` they were selected from."""
        return x[self.target_index]

    def summary(self) -> dict:
        """JSON-friendly description (for checkpoints and reports)."""
        return {"threshold": self.threshold, "hard_fraction": self.hard_fraction,
                "target_index": self.target_index.tolist(),
                "target_class": self.target_class.tolist(),
                "fallback_classes": self.fallback_classes, "warnings": self.warnings}


def _lowest(indices: torch.Tensor, entropy: torch.Tensor) -> int:
    return int(indices[entropy[indices].argmin()])


def select_targets(x: torch.Tensor, y: torch.Tensor, entropy: torch.Tensor, threshold: float,
                   num_classes: int, *, predictions: torch.Tensor | None = None,
                   per_class: int = 1, seed: int = 0) -> CBNetTargets:
    """Pick the converter's target images.

    With ``per_class=1`` (CBNet) a class's target is its lowest-entropy easy image. With
    ``per_class=k > 1`` (EncodeNet) the class's images are clustered into ``k`` groups by
    k-means on their pixels and each cluster's target is its lowest-entropy easy image; every
    image maps to its own cluster's target. When ``predictions`` (the first exit's) are given,
    only easy images the first exit classifies correctly qualify, so a target is never an image
    the light classifier gets wrong. Without any qualifying image, the lowest-entropy image of
    the class (or cluster) is used and the fallback is recorded (see the module docstring).

    Args:
        x: training images ``(N, ...)``.
        y: their labels ``(N,)``.
        entropy: first-exit entropy per image (:func:`first_exit_entropy`).
        threshold: entropy threshold ``T``.
        num_classes: number of classes; every class needs at least one image.
        predictions: the first exit's predicted class per image, optional.
        per_class: targets per class (k-means clusters when > 1).
        seed: k-means seed.

    Returns:
        The :class:`CBNetTargets`.

    Raises:
        InputError: mismatched lengths, a class without images, ``per_class < 1`` or a
            threshold that is not a non-negative number.
    """
    n = len(y)
    if x.shape[0] != n or entropy.shape != (n,):
        raise InputError(f"x, y and entropy must describe the same {n} images, got shapes "
                         f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(entropy.shape)}")
    if predictions is not None and predictions.shape != (n,):
        raise InputError(f"predictions must have shape ({n},), got {tuple(predictions.shape)}")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise InputError(f"per_class must be an integer >= 1, got {per_class!r}")
    if not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise InputError(f"threshold must be an entropy >= 0 (nats), got {threshold!r}")
    easy = entropy < threshold
    qualifies = easy if predictions is None else easy & (predictions == y)
    target_index: list[int] = []
    target_class: list[int] = []
    assignment = torch.empty(n, dtype=torch.long)
    fallback_classes: list[int] = []
    notes: list[str] = []
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        if len(members) == 0:
            raise InputError(f"class {c} has no training image; CBNet needs at least one image "
                             "per class to pick its target")
        for group in _clusters(x[members], per_class, seed):
            idx = members[group]
            good = idx[qualifies[idx]]
            if len(good):
                chosen = _lowest(good, entropy)
            else:
                chosen = _lowest(idx, entropy)
                where = f"class {c}" if per_class == 1 else f"a k-means cluster of class {c}"
                notes.append(f"{where} has no easy image the first exit classifies correctly "
                             f"(entropy < {threshold:.4g}); using its lowest-entropy image "
                             f"(index {chosen}, entropy {float(entropy[chosen]):.4g}) as target")
                if c not in fallback_classes:
                    fallback_classes.append(c)
            assignment[idx] = len(target_index)
            target_index.append(chosen)
            target_class.append(c)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return CBNetTargets(float(threshold), easy, torch.tensor(target_index),
                        torch.tensor(target_class), assignment, fallback_classes, notes)


def _clusters(images: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """Positions of each k-means cluster (one group of everything when ``k == 1``)."""
    n = images.shape[0]
    if k == 1 or n == 1:
        return [torch.arange(n)]
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    k = min(k, n)
    with threadpool_limits(1):  # tiny problems: threads only add contention
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(
            images.reshape(n, -1).double().numpy())
    groups = [torch.from_numpy(np.flatnonzero(labels == j)) for j in range(k)]
    return [g for g in groups if len(g)]


# 4. Converter -----------------------------------------------------------------------------
class ConvertingAutoencoder(nn.Module):
    """Maps an image to an easy image of the same class; output in ``[0, 1]`` (sigmoid).

    Args:
        input_shape: per-sample image shape ``(C, H, W)``.
        kind: ``"fc"``, the published fully connected network (flatten, ``hidden`` layers with
            ReLU, a linear layer back to the input size), or ``"conv"``, a convolutional
            variant (two stride-2 3x3 convolutions, a linear bottleneck of ``hidden[-1]``
            units, two stride-2 transposed convolutions; H and W must be divisible by 4).
        hidden: hidden sizes of the fc encoder (published: 512, 384, 256, 64); the conv
            variant uses only the last one (the bottleneck).
        channels: channels of the conv variant's two encoder convolutions.

    Raises:
        InputError: an unknown ``kind``, non-positive sizes, or a shape the variant cannot take.
    """

    def __init__(self, input_shape: Sequence[int], kind: str = "fc",
                 hidden: Sequence[int] = (512, 384, 256, 64), channels: Sequence[int] = (16, 32)):
        super().__init__()
        self.input_shape = tuple(int(d) for d in input_shape)
        self.kind = kind
        self.hidden = tuple(int(h) for h in hidden)
        self.channels = tuple(int(c) for c in channels)
        if not self.hidden or min(self.hidden) < 1 or min(self.input_shape) < 1:
            raise InputError(f"hidden sizes and input shape must be positive, got hidden "
                             f"{self.hidden}, input shape {self.input_shape}")
        size = math.prod(self.input_shape)
        if kind == "fc":
            layers: list[nn.Module] = [nn.Flatten()]
            for a, b in zip((size, *self.hidden), self.hidden):
                layers += [nn.Linear(a, b), nn.ReLU()]
            layers += [nn.Linear(self.hidden[-1], size), nn.Sigmoid(),
                       nn.Unflatten(1, self.input_shape)]
        elif kind == "conv":
            if len(self.input_shape) != 3 or self.input_shape[1] % 4 or self.input_shape[2] % 4:
                raise InputError(f"the conv converter needs (C, H, W) images with H and W "
                                 f"divisible by 4, got {self.input_shape}; use kind='fc'")
            if len(self.channels) != 2 or min(self.channels) < 1:
                raise InputError(f"channels must be two positive sizes, got {self.channels}")
            c, h, w = self.input_shape
            c1, c2 = self.channels
            inner = (c2, h // 4, w // 4)
            layers = [nn.Conv2d(c, c1, 3, 2, 1), nn.ReLU(), nn.Conv2d(c1, c2, 3, 2, 1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(math.prod(inner), self.hidden[-1]), nn.ReLU(),
                      nn.Linear(self.hidden[-1], math.prod(inner)), nn.ReLU(),
                      nn.Unflatten(1, inner), nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),
                      nn.ConvTranspose2d(c1, c, 4, 2, 1), nn.Sigmoid()]
        else:
            raise InputError(f"unknown converter kind {kind!r}; use 'fc' (published) or 'conv'")
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def config(self) -> dict:
        """Constructor arguments, JSON-friendly."""
        return {"input_shape": list(self.input_shape), "kind": self.kind,
                "hidden": list(self.hidden), "channels": list(self.channels)}


class _ConversionLoss(Strategy):
    """Binary cross-entropy between the converter's output and each image's target image.

    The training split's labels are target indices (:attr:`CBNetTargets.assignment`).
    """

    name = "cbnet-converter"

    def __init__(self, target_images: torch.Tensor):
        self._targets = target_images

    def loss(self, model, x, y):
        return F.binary_cross_entropy(model(x), self._targets[y])


def train_converter(converter: ConvertingAutoencoder, x: torch.Tensor, targets: CBNetTargets, *,
                    epochs: int = 10, lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
                    progress: bool | None = None) -> TrainHistory:
    """Train ``converter`` to map every training image to its target (BCE, Adam).

    Args:
        converter: the autoencoder.
        x: the training images the targets were selected from.
        targets: from :func:`select_targets`.
        epochs: passes over ``x``.
        lr: Adam learning rate (no weight decay, as published; cosine decay).
        batch_size: batch size.
        seed: shuffling seed.
        progress: show progress bars.

    Returns:
        The training history (mean BCE per epoch).

    Raises:
        InputError: images outside ``[0, 1]`` or not matching the converter's input shape.
    """
    _check_images(x, converter.input_shape)
    if len(targets.assignment) != len(x):
        raise InputError(f"targets describe {len(targets.assignment)} images but x has {len(x)};"
                         " select the targets from the same training images")
    data = Split(x, targets.assignment)
    return train(converter, data, _ConversionLoss(targets.images(x)), epochs=epochs, lr=lr,
                 weight_decay=0.0, batch_size=batch_size, seed=seed, progress=progress)


# 5. Light classifier ----------------------------------------------------------------------
def light_classifier(model: MultiExitModel) -> StagedModel:
    """B-LeNet truncated after its first exit: the stages up to it plus its head (a copy).

    Args:
        model: a trained B-LeNet (:func:`train_branchynet`).

    Returns:
        A :class:`StagedModel` with stages ``conv1`` and ``branch``, independent of ``model``.
    """
    _require_branchynet(model)
    first_stage = model.exit_stages[0]
    stages = [copy.deepcopy(s) for s in model.backbone.stages[: first_stage + 1]]
    stages.append(Stage(copy.deepcopy(model.heads[0]), "branch"))
    return StagedModel(stages, [*model.backbone.cut_names[:first_stage], model.head_cuts[0]]
                       ).eval()


@torch.no_grad()
def convert(converter: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Run the converter over ``x`` in batches (eval mode)."""
    converter.eval()
    return torch.cat([converter(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])


def finetune_classifier(classifier: nn.Module, converter: nn.Module, data: Split, *,
                        epochs: int = 2, lr: float = 5e-4, batch_size: int = 128, seed: int = 0,
                        progress: bool | None = None) -> TrainHistory:
    """Fine-tune the light classifier on converted training images (the converter is fixed)."""
    converted = Split(convert(converter, data.x), data.y)
    return train(classifier, converted, Baseline(), epochs=epochs, lr=lr, batch_size=batch_size,
                 seed=seed, progress=progress)


# 6. Pipeline ------------------------------------------------------------------------------
def _check_images(x: torch.Tensor, input_shape: Sequence[int]) -> None:
    check_input(x, input_shape)
    lo, hi = torch.aminmax(x)
    if lo < 0 or hi > 1:
        raise InputError(f"CBNet takes images with values in [0, 1], got values in "
                         f"[{float(lo):.4g}, {float(hi):.4g}]; scale 8-bit images with "
                         "x.float() / 255")


class CBNetPipeline(nn.Module):
    """CBNet inference: the converter, then the light classifier; returns logits.

    Inputs are validated (type, shape, finite, values in ``[0, 1]``) unless the module is
    being traced or exported to ONNX; :class:`OnnxPipeline` validates on its side.

    Args:
        converter: the trained :class:`ConvertingAutoencoder`.
        classifier: the light classifier (:func:`light_classifier`).
        num_classes: number of classes.
        info: JSON-friendly facts kept with the pipeline (threshold, hard share, targets ...).

    Example:
        >>> pipe = CBNetPipeline(converter, light_classifier(branchy), 10)
        >>> pipe(test_images).argmax(1)
    """

    def __init__(self, converter: ConvertingAutoencoder, classifier: nn.Module,
                 num_classes: int, info: dict | None = None):
        super().__init__()
        self.converter = converter
        self.classifier = classifier
        self.num_classes = int(num_classes)
        self.input_shape = converter.input_shape
        self.info = dict(info or {})
        # No "model" key: splitexit.checkpoint.load must send users to load_pipeline.
        self.spec = {"cbnet": {"converter": converter.config(), "num_classes": self.num_classes,
                               "classifier": "b-lenet first exit"}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, *input_shape)`` in ``[0, 1]``.

        Raises:
            InputError: wrong type, dtype or shape, non-finite values or values outside [0, 1].
        """
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            _check_images(x, self.input_shape)
        return self.classifier(self.converter(x))

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class per image."""
        return self(x).argmax(dim=1)

    def macs(self) -> float:
        """Multiply-accumulates of one image through converter and classifier."""
        return count_macs(lambda: self(torch.full((1, *self.input_shape), 0.5)))


def save_pipeline(pipeline: CBNetPipeline, directory: str | os.PathLike, **metadata) -> Path:
    """Save a pipeline as safetensors weights plus JSON (``splitexit.checkpoint``)."""
    return checkpoint.save(pipeline, directory, info=pipeline.info, **metadata)


def load_pipeline(directory: str | os.PathLike) -> CBNetPipeline:
    """Rebuild a pipeline saved by :func:`save_pipeline` (weights identical, eval mode).

    Raises:
        CorruptFileError: not a CBNet checkpoint, or weights that do not match its description.
    """
    meta = checkpoint.read_meta(directory)
    spec = (meta.get("spec") or {}).get("cbnet")
    if not isinstance(spec, dict) or "converter" not in spec or "num_classes" not in spec:
        raise CorruptFileError(f"{directory} is not a CBNet pipeline checkpoint (no 'cbnet' "
                               "spec in model.json); save one with splitexit.cbnet.save_pipeline")
    try:
        converter = ConvertingAutoencoder(**spec["converter"])
    except TypeError as exc:
        raise CorruptFileError(f"{directory}: bad converter description {spec['converter']}: "
                               f"{exc}") from exc
    shape = converter.input_shape
    branchy = create_multiexit("b-lenet", spec["num_classes"], shape, head="published")
    pipeline = CBNetPipeline(converter, light_classifier(branchy), spec["num_classes"],
                             meta.get("info"))
    return checkpoint.load_weights(pipeline, directory)


# ONNX -------------------------------------------------------------------------------------
def export_onnx(module: nn.Module, path: str | os.PathLike, input_shape: Sequence[int],
                output_names: Sequence[str] = ("logits",)) -> Path:
    """Export ``module`` (one tensor in) to ONNX with a dynamic batch; input named ``"input"``.

    Uses :func:`splitexit.export.onnx.export_piece` (torch's TorchScript-based exporter with
    ``dynamo=False``, since the dynamo exporter needs ``onnxscript``; checked by
    ``onnx.checker``).

    Raises:
        InputError: the module cannot be exported (the message names the operation).
    """
    from .export.onnx import export_piece

    example = torch.full((2, *input_shape), 0.5)
    return export_piece(module, example, path, input_names=["input"],
                        output_names=list(output_names), as_payload=False)


class OnnxPipeline:
    """An exported CBNet pipeline on ONNX Runtime (an :class:`~splitexit.runtime.OrtSession`)
    with the pipeline's own input checks (shape, finite, values in ``[0, 1]``).

    Args:
        path: the ``.onnx`` file (:func:`export_onnx` of a :class:`CBNetPipeline`).
        input_shape: per-sample input shape; read from ``<path>.json`` when omitted.
        threads: ONNX Runtime intra-op threads (``None``: ONNX Runtime decides).
    """

    def __init__(self, path: str | os.PathLike, input_shape: Sequence[int] | None = None,
                 threads: int | None = 1):
        from .runtime.ort import OrtSession

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"no ONNX file at {self.path}; export one with "
                             "splitexit.cbnet.export_onnx or `splitexit cbnet export`")
        if input_shape is None:
            sidecar = self.path.with_suffix(".json")
            if not sidecar.is_file():
                raise InputError(f"pass input_shape=, or keep {sidecar.name} (written by "
                                 "`splitexit cbnet export`) beside the ONNX file")
            try:
                input_shape = json.loads(sidecar.read_text())["input_shape"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorruptFileError(f"{sidecar} is not a valid export description") from exc
        self.input_shape = tuple(int(d) for d in input_shape)
        self.session = OrtSession(self.path, threads)

    def run(self, x: np.ndarray | torch.Tensor, check: bool = True) -> np.ndarray:
        """Logits for images ``(N, *input_shape)`` in ``[0, 1]``.

        Raises:
            InputError: wrong shape, non-finite values or values outside [0, 1].
        """
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if check:
            _check_images(torch.from_numpy(x), self.input_shape)
        return self.session.run_arrays([x])[0]

    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted class per image."""
        return self.run(x).argmax(axis=1)


# Everything in one call -------------------------------------------------------------------
@dataclass
class CBNetSettings:
    """What :func:`train_cbnet` trains.

    Attributes:
        branchy_epochs: B-LeNet training epochs (BranchyNet joint loss).
        branchy_weights: BranchyNet loss weights per exit.
        threshold: entropy threshold ``T``; ``None`` chooses it on the calibration split.
        max_drop: when choosing ``T``: allowed BranchyNet accuracy drop vs its final exit.
        targets_per_class: 1 (CBNet) or k > 1 (k-means targets, EncodeNet).
        converter: ``"fc"`` (published) or ``"conv"``.
        converter_epochs: converter training epochs.
        converter_lr: converter learning rate (Adam).
        finetune_epochs: light-classifier fine-tuning epochs on converted images (0: none,
            as published).
    """

    branchy_epochs: int = 5
    branchy_weights: tuple[float, ...] = BRANCHYNET_WEIGHTS
    branchy_lr: float = 2e-3
    threshold: float | None = None
    max_drop: float = 0.01
    targets_per_class: int = 1
    converter: str = "fc"
    converter_epochs: int = 10
    converter_lr: float = 1e-3
    finetune_epochs: int = 0
    finetune_lr: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    progress: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CBNetRun:
    """What :func:`train_cbnet` returns."""

    pipeline: CBNetPipeline
    branchynet: MultiExitModel
    targets: CBNetTargets
    train_seconds: dict[str, float]
    converter_loss: list[float]


def train_cbnet(data: Dataset, settings: CBNetSettings | None = None,
                branchynet: MultiExitModel | None = None) -> CBNetRun:
    """Train the whole CBNet pipeline on a data set's training split.

    Args:
        data: a :class:`splitexit.data.Dataset` of images in ``[0, 1]``.
        settings: what to train (defaults: :class:`CBNetSettings`).
        branchynet: an already trained B-LeNet to reuse (skips step 1).

    Returns:
        The pipeline, the B-LeNet, the targets, training times and the converter's loss curve.
    """
    s = settings or CBNetSettings()
    seconds: dict[str, float] = {}
    if branchynet is None:
        branchynet, history = train_branchynet(
            data.train, data.num_classes, data.input_shape, epochs=s.branchy_epochs,
            weights=s.branchy_weights, lr=s.branchy_lr, batch_size=s.batch_size, seed=s.seed,
            progress=s.progress)
        seconds["branchynet"] = history.seconds
    _require_branchynet(branchynet)
    threshold = (choose_threshold(branchynet, data.calib, s.max_drop) if s.threshold is None
                 else s.threshold)
    entropy, predictions = first_exit_entropy(branchynet, data.train.x)
    targets = select_targets(data.train.x, data.train.y, entropy, threshold, data.num_classes,
                             predictions=predictions, per_class=s.targets_per_class,
                             seed=s.seed)
    torch.manual_seed(s.seed)
    converter = ConvertingAutoencoder(data.input_shape, s.converter)
    history = train_converter(converter, data.train.x, targets, epochs=s.converter_epochs,
                              lr=s.converter_lr, batch_size=s.batch_size, seed=s.seed,
                              progress=s.progress)
    seconds["converter"] = history.seconds
    classifier = light_classifier(branchynet)
    if s.finetune_epochs:
        ft = finetune_classifier(classifier, converter, data.train, epochs=s.finetune_epochs,
                                 lr=s.finetune_lr, batch_size=s.batch_size, seed=s.seed,
                                 progress=s.progress)
        seconds["finetune"] = ft.seconds
    info = {"dataset": data.name, "settings": s.to_dict(), **targets.summary()}
    pipeline = CBNetPipeline(converter, classifier, data.num_classes, info).eval()
    return CBNetRun(pipeline, branchynet, targets, seconds, history.loss)
