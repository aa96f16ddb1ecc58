"""A small encoder-decoder segmentation backbone for the zoo (``segnet``): an FCN with dilated
residual blocks at a quarter of the input resolution and a bilinear decoder, cut after every
block so dense exit heads (:mod:`splitexit.segmentation.heads`) can attach at any depth."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..zoo import ZooEntry, _staged, register_model
from .heads import create_dense_head

__all__ = ["segnet", "DilatedBlock", "Upsample", "GuideStem", "Guided", "REDUCTION"]

#: the backbone's two stride-2 convolutions: inputs must be divisible by this
REDUCTION = 4


def _conv_bn(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU()]


class DilatedBlock(nn.Module):
    """Two dilated 3x3 conv-BN layers plus shortcut (a 1x1 conv when the width changes), ReLU:
    the receptive field grows without losing resolution, as in DeepLab-style FCNs."""

    def __init__(self, c_in: int, c_out: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out, dilation=dilation),
                                  nn.Conv2d(c_out, c_out, 3, 1, dilation, dilation=dilation,
                                            bias=False),
                                  nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Upsample(nn.Module):
    """Bilinear upsampling to a fixed output size (static, so it exports to ONNX as Resize)."""

    def __init__(self, size: Sequence[int]):
        super().__init__()
        self.size = tuple(int(s) for s in size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class GuideStem(nn.Module):
    """The first stage of a guided network: ``module``'s features behind the input image,
    space-to-depth'd by ``factor`` to their resolution (lossless), so every later cut carries
    the full-resolution image for its exit head's guide."""

    def __init__(self, module: nn.Module, factor: int):
        super().__init__()
        self.module, self.factor = module, int(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.pixel_unshuffle(x, self.factor), self.module(x)], 1)


class Guided(nn.Module):
    """A later stage of a guided network: ``module`` runs on the features; the first ``carry``
    channels (the guide image) pass through unchanged."""

    def __init__(self, module: nn.Module, carry: int):
        super().__init__()
        self.module, self.carry = module, int(carry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, : self.carry], self.module(x[:, self.carry:])], 1)


@register_model("segnet")
def segnet(num_classes: int = 11, input_shape=(1, 64, 64), widths=(16, 32, 48),
           dilations=(1, 2, 4, 1), guided: bool = False, reduction: int = REDUCTION,
           classifier: dict | None = None) -> ZooEntry:
    """FCN-style segmentation network: a stride-2 stem, a stride-2 down block, dilated
    residual blocks at 1/4 resolution, a 1x1 classifier and bilinear upsampling to the input
    size. Output: per-pixel logits ``(N, num_classes, H, W)``.

    Cuts: ``stem``, ``down``, ``block1`` .. ``block{len(dilations) - 1}``; the default exits
    sit after ``down`` and every block but the last, with ``conv`` dense heads.

    With ``guided=True`` the image guides every upsampling (the final classifier's and every
    exit head's, ``guide=C``): stem and down form one stage (no ``stem`` cut) whose payload
    carries the image space-to-depth'd to 1/4 resolution (``16 C`` channels, lossless) in
    front of the features, passed through by every block; a head adds a per-pixel 1x1 map of
    the full-resolution image to its upsampled scores, so boundaries follow the image at every
    exit while the cuts stay at 1/4 resolution.

    ``reduction=8`` adds a third stride-2 convolution (to ``widths[2]`` channels) at the end
    of ``down``: the blocks work at 1/8 resolution, where a 3x3 convolution sees 24 pixels, so
    early cuts already see whole items at a fraction of the MACs.

    ``classifier`` (``{"kind": ..., **kwargs}`` of a dense head type) replaces the final 1x1
    classifier with that head, e.g. dilated 3x3 convolutions that see a whole item at once,
    as the exit heads may.

    Raises:
        InputError: an input that is not ``(C, H, W)`` with ``H`` and ``W`` divisible by 4.
    """
    if reduction not in (4, 8):
        raise InputError(f"segnet's reduction is 4 or 8 (two or three stride-2 "
                         f"convolutions), got {reduction!r}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or any(s % reduction or s < reduction for s in shape[1:]):
        raise InputError(f"segnet takes images (C, H, W) with H and W divisible by "
                         f"{reduction} (stride-2 convolutions, then upsampling by "
                         f"{reduction} back to the input size); got {tuple(input_shape)}: pad "
                         f"or crop the images to a multiple of {reduction}")
    if len(widths) != 3 or not dilations:
        raise InputError(f"segnet needs widths=(stem, down, blocks) and at least one dilation, "
                         f"got widths={widths}, dilations={dilations}")
    c, (w0, w1, w2) = shape[0], widths
    stem = nn.Sequential(*_conv_bn(c, w0, 2), *_conv_bn(w0, w0))
    down = [*_conv_bn(w0, w1, 2), *_conv_bn(w1, w1)]
    width = w1
    if reduction == 8:
        down += _conv_bn(w1, w2, 2)
        width = w2
    down = nn.Sequential(*down)
    carry = c * reduction ** 2 if guided else 0
    parts: list[tuple[str, nn.Module]] = (
        [("down", GuideStem(nn.Sequential(stem, down), reduction))] if guided
        else [("stem", stem), ("down", down)])
    for i, d in enumerate(dilations):
        block = DilatedBlock(width, w2, d)
        parts.append((f"block{i + 1}", Guided(block, carry) if guided else block))
        width = w2
    _, last = parts[-1]
    if guided or classifier:
        spec = dict(classifier or {"kind": "pointwise"})
        if "kind" not in spec:
            raise InputError(f"segnet's classifier is a dense head {{'kind': ..., **kwargs}}, "
                             f"got {classifier!r}")
        head = create_dense_head(spec.pop("kind"), (carry + width, *(
            s // reduction for s in shape[1:])), num_classes, out_size=shape[1:],
            guide=c if guided else 0, **spec)
        parts[-1] = ("classifier", nn.Sequential(last, head))
    else:
        parts[-1] = ("classifier", nn.Sequential(last, nn.Conv2d(width, num_classes, 1),
                                                 Upsample(shape[1:])))

    def heads(kind: str, in_shape, classes: int, **kwargs) -> nn.Module:
        kwargs.setdefault("out_size", shape[1:])
        if guided:
            kwargs.setdefault("guide", c)
        return create_dense_head(kind, in_shape, classes, **kwargs)

    exits = ["down", *[f"block{i + 1}" for i in range(len(dilations) - 1)]]
    backbone = _staged(parts)
    backbone.guide = c if guided else 0  # image channels every cut carries for the heads
    return ZooEntry(backbone, exits, "conv", dense=True, head_builder=heads)


segnet.task = "segmentation"
