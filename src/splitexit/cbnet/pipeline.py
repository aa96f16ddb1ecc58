"""CBNet step 6: the pipeline (converter + light classifier), its checkpoints, ONNX export and
:func:`train_cbnet`, which runs every step from a data set."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import checkpoint
from ..cost import count_macs
from ..data import Dataset
from ..errors import CorruptFileError, InputError
from ..multiexit import MultiExitModel
from ..zoo import create_multiexit
from .converter import ConvertingAutoencoder, _check_images, finetune_classifier, train_converter
from .core import (
    BRANCHYNET_WEIGHTS,
    CBNetTargets,
    _require_branchynet,
    choose_threshold,
    first_exit_entropy,
    light_classifier,
    select_targets,
    train_branchynet,
)


@torch.no_grad()
def _check_fit(converter: nn.Module, classifier: nn.Module, input_shape: Sequence[int],
               num_classes: int) -> None:
    """A clear error when the converter's input or output does not fit the classifier."""
    modes = [(m, m.training) for m in (converter, classifier)]
    probe = torch.full((1, *input_shape), 0.5)
    try:
        converter.eval()
        classifier.eval()
        try:
            converted = converter(probe)
        except RuntimeError as exc:
            raise InputError(f"the converter cannot take images of shape {tuple(input_shape)} "
                             f"(its input_shape): {exc}") from exc
        if tuple(converted.shape[1:]) != tuple(input_shape):
            raise InputError(f"the converter maps {tuple(input_shape)} images to "
                             f"{tuple(converted.shape[1:])}; a CBNet converter must output images "
                             "of its input shape, the shape the light classifier takes")
        try:
            logits = classifier(converted)
        except RuntimeError as exc:
            raise InputError(f"the classifier cannot take the converter's {tuple(input_shape)} "
                             f"images: {exc}; build the light classifier from a B-LeNet of the "
                             "same input shape") from exc
        if tuple(logits.shape) != (1, num_classes):
            raise InputError(f"the classifier gives {tuple(logits.shape[1:])} logits per image, "
                             f"not ({num_classes},); use num_classes={logits.shape[-1]}")
    finally:
        for m, mode in modes:
            m.train(mode)


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
        _check_fit(converter, classifier, self.input_shape, self.num_classes)
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
    from ..export.onnx import export_piece

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
        from ..runtime.ort import OrtSession

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
        converter_hidden: the converter's hidden sizes (published: 512, 384, 256, 64;
            e.g. ``(64,)`` for a fast narrow one).
        converter_output: ``"sigmoid"`` (published) or ``"linear"`` (foldable).
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
    converter_hidden: tuple[int, ...] = (512, 384, 256, 64)
    converter_output: str = "sigmoid"
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
    converter = ConvertingAutoencoder(data.input_shape, s.converter, s.converter_hidden,
                                      output=s.converter_output)
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
