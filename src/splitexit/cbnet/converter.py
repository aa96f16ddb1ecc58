"""CBNet steps 4 and 5: the converting autoencoder, its training and the light classifier's
fine-tuning on converted images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Split
from ..errors import InputError
from ..multiexit import check_input
from ..training import Baseline, train
from ..training.base import Strategy, TrainHistory
from .core import CBNetTargets

# 4. Converter -----------------------------------------------------------------------------
#: one-convolution encoders: kind -> (kernel, stride, padding); both map H x W to H/4 x W/4
_ONE_CONV = {"patchfc": (4, 4, 0), "stridefc": (7, 4, 2)}


class ConvertingAutoencoder(nn.Module):
    """Maps an image to an easy image of the same class.

    Args:
        input_shape: per-sample image shape ``(C, H, W)``.
        kind: ``"fc"``, the published fully connected network (flatten, ``hidden`` layers with
            ReLU, a linear layer back to the input size), ``"conv"``, a convolutional
            variant (two stride-2 3x3 convolutions, a linear bottleneck of ``hidden[-1]``
            units, two stride-2 transposed convolutions; H and W must be divisible by 4), or
            ``"convfc"``, a convolutional encoder with a fully connected decoder (the two
            stride-2 convolutions, ``hidden`` layers with ReLU, a linear layer back to the
            input size), whose linear output folds into the classifier like ``"fc"``'s, or
            ``"patchfc"``, the cheapest encoder: one convolution over non-overlapping 4x4
            patches (kernel 4, stride 4) with ReLU, then ``"convfc"``'s fully connected
            layers and linear output, or ``"stridefc"``, the same with one overlapping
            convolution (kernel 7, stride 4, padding 2: the receptive field of ``"convfc"``'s
            two convolutions at the cost of one).
        hidden: hidden sizes of the fc encoder (published: 512, 384, 256, 64); the conv
            variant uses only the last one (the bottleneck).
        channels: channels of the conv variant's two encoder convolutions (``"patchfc"``,
            ``"stridefc"``: one size, the channels of their one convolution).
        output: ``"sigmoid"`` (published: values in ``[0, 1]``, trained with binary
            cross-entropy) or ``"linear"`` (no output non-linearity, trained with mean squared
            error): the last layer is then linear and folds into the classifier's first
            convolution (:func:`splitexit.cbnet.fold_pipeline`).

    Raises:
        InputError: an unknown ``kind`` or ``output``, non-positive sizes, or a shape the
            variant cannot take.
    """

    def __init__(self, input_shape: Sequence[int], kind: str = "fc",
                 hidden: Sequence[int] = (512, 384, 256, 64), channels: Sequence[int] = (16, 32),
                 output: str = "sigmoid"):
        super().__init__()
        if output not in ("sigmoid", "linear"):
            raise InputError(f"unknown converter output {output!r}; use 'sigmoid' (published) "
                             "or 'linear' (foldable into the classifier)")
        self.output = output
        self.input_shape = tuple(int(d) for d in input_shape)
        self.kind = kind
        self.hidden = tuple(int(h) for h in hidden)
        self.channels = tuple(int(c) for c in channels)
        if not self.hidden or min(self.hidden) < 1 or min(self.input_shape) < 1:
            raise InputError(f"hidden sizes and input shape must be positive, got hidden "
                             f"{self.hidden}, input shape {self.input_shape}")
        size = math.prod(self.input_shape)
        if kind not in ("fc", "conv", "convfc", *_ONE_CONV):
            raise InputError(f"unknown converter kind {kind!r}; use 'fc' (published), 'conv', "
                             "'convfc', 'patchfc' or 'stridefc'")
        if kind == "fc":
            layers: list[nn.Module] = [nn.Flatten()]
            for a, b in zip((size, *self.hidden), self.hidden):
                layers += [nn.Linear(a, b), nn.ReLU()]
            layers += [nn.Linear(self.hidden[-1], size), *self._squash(),
                       nn.Unflatten(1, self.input_shape)]
            self.net = nn.Sequential(*layers)
            return
        if len(self.input_shape) != 3 or self.input_shape[1] % 4 or self.input_shape[2] % 4:
            raise InputError(f"the {kind} converter needs (C, H, W) images with H and W "
                             f"divisible by 4, got {self.input_shape}; use kind='fc'")
        c, h, w = self.input_shape
        if kind in _ONE_CONV:
            if len(self.channels) != 1 or min(self.channels) < 1:
                raise InputError(f"the {kind} converter takes one positive channel count, "
                                 f"got channels={self.channels}")
            inner = (self.channels[0], h // 4, w // 4)
            kernel, stride, padding = _ONE_CONV[kind]
            layers = [nn.Conv2d(c, self.channels[0], kernel, stride, padding), nn.ReLU(),
                      nn.Flatten()]
        else:
            if len(self.channels) != 2 or min(self.channels) < 1:
                raise InputError(f"channels must be two positive sizes, got {self.channels}")
            c1, c2 = self.channels
            inner = (c2, h // 4, w // 4)
            layers = [nn.Conv2d(c, c1, 3, 2, 1), nn.ReLU(), nn.Conv2d(c1, c2, 3, 2, 1),
                      nn.ReLU(), nn.Flatten()]
        if kind == "conv":
            layers += [nn.Linear(math.prod(inner), self.hidden[-1]), nn.ReLU(),
                       nn.Linear(self.hidden[-1], math.prod(inner)), nn.ReLU(),
                       nn.Unflatten(1, inner), nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),
                       nn.ConvTranspose2d(c1, c, 4, 2, 1), *self._squash()]
        else:  # convfc, patchfc, stridefc: an fc decoder with a linear output, as fc's
            for a, b in zip((math.prod(inner), *self.hidden), self.hidden):
                layers += [nn.Linear(a, b), nn.ReLU()]
            layers += [nn.Linear(self.hidden[-1], size), *self._squash(),
                       nn.Unflatten(1, self.input_shape)]
        self.net = nn.Sequential(*layers)

    def _squash(self) -> list[nn.Module]:
        return [nn.Sigmoid()] if self.output == "sigmoid" else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def reconstruction_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy (sigmoid output, as published) or mean squared error (linear)."""
        if self.output == "sigmoid":
            return F.binary_cross_entropy(out, target)
        return F.mse_loss(out, target)

    def config(self) -> dict:
        """Constructor arguments, JSON-friendly."""
        return {"input_shape": list(self.input_shape), "kind": self.kind,
                "hidden": list(self.hidden), "channels": list(self.channels),
                "output": self.output}


class _ConversionLoss(Strategy):
    """Binary cross-entropy between the converter's output and each image's target image.

    The training split's labels are target indices (:attr:`CBNetTargets.assignment`).
    """

    name = "cbnet-converter"

    def __init__(self, target_images: torch.Tensor):
        self._targets = target_images

    def loss(self, model, x, y):
        return model.reconstruction_loss(model(x), self._targets[y])


class _DistillLoss(Strategy):
    """The student converter's reconstruction loss against the teacher converter's output."""

    name = "cbnet-distill"

    def __init__(self, teacher_outputs: torch.Tensor):
        self._outputs = teacher_outputs

    def loss(self, model, x, y):
        return model.reconstruction_loss(model(x), self._outputs[y])


def train_converter(converter: ConvertingAutoencoder, x: torch.Tensor, targets: CBNetTargets, *,
                    epochs: int = 10, lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
                    progress: bool | None = None) -> TrainHistory:
    """Train ``converter`` to map every training image to its target (Adam; BCE for a sigmoid
    output as published, MSE for a linear one).

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



def distill_converter(student: ConvertingAutoencoder, teacher: nn.Module, x: torch.Tensor, *,
                      epochs: int = 10, lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
                      progress: bool | None = None) -> TrainHistory:
    """Train a (smaller) ``student`` converter to reproduce a trained ``teacher`` converter's
    output on the images ``x`` (knowledge distillation; the teacher is fixed).

    Raises:
        InputError: images outside ``[0, 1]``, or a student whose input shape or output shape
            differs from the teacher's.
    """
    _check_images(x, student.input_shape)
    teacher_out = convert(teacher, x)
    probe = student.eval()(x[:1])
    if tuple(probe.shape[1:]) != tuple(teacher_out.shape[1:]):
        raise InputError(f"the student converter outputs {tuple(probe.shape[1:])} per sample but "
                         f"the teacher outputs {tuple(teacher_out.shape[1:])}; give both the "
                         "same input shape")
    data = Split(x, torch.arange(len(x)))
    return train(student, data, _DistillLoss(teacher_out), epochs=epochs, lr=lr,
                 weight_decay=0.0, batch_size=batch_size, seed=seed, progress=progress)


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


# Input checks ------------------------------------------------------------------------------
def _check_images(x: torch.Tensor, input_shape: Sequence[int]) -> None:
    check_input(x, input_shape)
    lo, hi = (float(v) for v in torch.aminmax(x))  # Python floats: no tensor comparisons
    if not (lo >= 0.0 and hi <= 1.0):
        raise InputError(f"CBNet takes images with values in [0, 1], got values in "
                         f"[{lo:.4g}, {hi:.4g}]; scale 8-bit images with x.float() / 255")


