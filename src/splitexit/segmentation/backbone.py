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

__all__ = ["segnet", "DilatedBlock", "Upsample", "REDUCTION"]

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


@register_model("segnet")
def segnet(num_classes: int = 11, input_shape=(1, 64, 64), widths=(16, 32, 48),
           dilations=(1, 2, 4, 1)) -> ZooEntry:
    """FCN-style segmentation network: a stride-2 stem, a stride-2 down block, dilated
    residual blocks at 1/4 resolution, a 1x1 classifier and bilinear upsampling to the input
    size. Output: per-pixel logits ``(N, num_classes, H, W)``.

    Cuts: ``stem``, ``down``, ``block1`` .. ``block{len(dilations) - 1}``; the default exits
    sit after ``down`` and every block but the last, with ``conv`` dense heads.

    Raises:
        InputError: an input that is not ``(C, H, W)`` with ``H`` and ``W`` divisible by 4.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or any(s % REDUCTION or s < REDUCTION for s in shape[1:]):
        raise InputError(f"segnet takes images (C, H, W) with H and W divisible by "
                         f"{REDUCTION} (two stride-2 convolutions, then upsampling by "
                         f"{REDUCTION} back to the input size); got {tuple(input_shape)}: pad "
                         "or crop the images to a multiple of 4")
    if len(widths) != 3 or not dilations:
        raise InputError(f"segnet needs widths=(stem, down, blocks) and at least one dilation, "
                         f"got widths={widths}, dilations={dilations}")
    c, (w0, w1, w2) = shape[0], widths
    parts: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(*_conv_bn(c, w0, 2), *_conv_bn(w0, w0))),
        ("down", nn.Sequential(*_conv_bn(w0, w1, 2), *_conv_bn(w1, w1))),
    ]
    width = w1
    for i, d in enumerate(dilations):
        parts.append((f"block{i + 1}", DilatedBlock(width, w2, d)))
        width = w2
    _, last = parts[-1]
    parts[-1] = ("classifier", nn.Sequential(last, nn.Conv2d(width, num_classes, 1),
                                             Upsample(shape[1:])))

    def heads(kind: str, in_shape, classes: int, **kwargs) -> nn.Module:
        kwargs.setdefault("out_size", shape[1:])
        return create_dense_head(kind, in_shape, classes, **kwargs)

    exits = ["down", *[f"block{i + 1}" for i in range(len(dilations) - 1)]]
    return ZooEntry(_staged(parts), exits, "conv", dense=True, head_builder=heads)


segnet.task = "segmentation"
