"""Dense exit heads: per-pixel classifiers at a cut of a segmentation backbone, upsampled to
the output size. Their own registry (:data:`DENSE_HEADS`), since they need the output size and
give ``(N, classes, H, W)`` where classification heads give ``(N, classes)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..heads import ExitHead, head_in_shape
from ..registry import Registry

__all__ = ["DENSE_HEADS", "DenseHead", "create_dense_head", "list_dense_heads",
           "upsample_factor", "GUIDE_GAIN"]

#: the guide image (in [0, 1]) is scaled by this before the guide's 1x1 map, so a per-pixel
#: intensity threshold (an item pixel against background) is reached in a few hundred steps
GUIDE_GAIN = 16.0

#: dense head classes ``cls(in_shape, num_classes, out_size, **kw)``, by type name
DENSE_HEADS: Registry[Callable[..., DenseHead]] = Registry("dense head type")


def list_dense_heads() -> list[str]:
    """Registered dense head types."""
    return DENSE_HEADS.list()


def upsample_factor(in_shape: Sequence[int], out_size: Sequence[int]) -> int:
    """The integer factor that maps a cut's ``(C, H, W)`` map onto ``out_size``.

    Raises:
        InputError: the cut carries no 2-D map, or its spatial size does not divide the
            output size by one integer factor (upsampling could not align pixels).
    """
    shape = tuple(in_shape)
    out = tuple(int(s) for s in out_size)
    if len(shape) != 3 or len(out) != 2:
        raise InputError(f"a dense head needs a (C, H, W) feature map and an output size (H, W); "
                         f"got a cut of shape {shape} and out_size {out}: attach it at a cut "
                         "before the features are pooled or flattened")
    factors = {o // s if s and o % s == 0 else 0 for s, o in zip(shape[1:], out)}
    if len(factors) != 1 or 0 in factors:
        raise InputError(f"a dense head at a cut of spatial size {shape[1:]} cannot be "
                         f"upsampled to the output {out}: the output must be the same integer "
                         "multiple of the cut's height and width; attach it at a cut whose "
                         "size divides the output (see backbone.payload_shapes(x))")
    return factors.pop()


class DenseHead(ExitHead):
    """Base class: a per-pixel classifier at a cut, bilinearly upsampled to ``out_size``.

    Subclasses build ``self.body`` (features -> ``num_classes`` maps at the cut's resolution).
    ``out_shape`` is what :class:`~splitexit.multiexit.MultiExitModel` checks with
    ``dense=True``.

    With ``guide=C`` the cut carries the ``C``-channel input image in front of its features,
    space-to-depth'd to the cut's resolution (a guided ``segnet``): the head rebuilds the
    full-resolution image (depth-to-space) and adds a per-pixel, per-class 1x1 map of it to
    the upsampled scores, so its boundaries follow the image rather than the coarse cut.

    Raises:
        InputError: no ``out_size``, a cut that cannot be upsampled to it, or a cut too
            narrow to carry the guide and features.
    """

    def __init__(self, in_shape, num_classes: int, out_size: Sequence[int] | None = None,
                 guide: int = 0):
        super().__init__(in_shape, num_classes)
        if out_size is None:
            raise InputError("a dense head needs out_size=(H, W), the size of the model's "
                             "output map (build it with create_dense_head(kind, in_shape, "
                             "num_classes, out_size=...))")
        self.factor = upsample_factor(self.in_shape, out_size)
        self.out_size = tuple(int(s) for s in out_size)
        if isinstance(guide, bool) or not isinstance(guide, int) or guide < 0:
            raise InputError(f"a dense head's guide is the number of image channels carried "
                             f"in front of the cut's features (0: none), got {guide!r}")
        self.guide = guide
        #: payload channels holding the guide image, space-to-depth'd to the cut's resolution
        self.guide_channels = guide * self.factor ** 2
        self.features = self.in_shape[0] - self.guide_channels
        if self.features < 1:
            raise InputError(f"a cut of {self.in_shape[0]} channels cannot carry a guide of "
                             f"{guide} image channel(s) (space-to-depth by {self.factor}: "
                             f"{self.guide_channels} channels) and features; use guide=0 or "
                             "a guided backbone (segnet(guided=True))")
        # the guide's per-pixel, per-class affine map of the full-resolution image, added to
        # the upsampled scores: boundaries follow the image, not the coarse cut
        self.refine = nn.Conv2d(guide, num_classes, 1) if guide else None

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.num_classes, *self.out_size)

    def config(self) -> dict:
        config = {**super().config(), "out_size": list(self.out_size)}
        if self.guide:
            config["guide"] = self.guide
        return config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.refine is None:
            return self.upsample(self.body(x))
        image = x[:, : self.guide_channels]
        scores = self.upsample(self.body(x[:, self.guide_channels:]))
        if self.factor > 1:
            image = F.pixel_shuffle(image, self.factor)
        return scores + self.refine(image * GUIDE_GAIN)

    def upsample(self, scores: torch.Tensor) -> torch.Tensor:
        if self.factor == 1:
            return scores
        return F.interpolate(scores, size=self.out_size, mode="bilinear", align_corners=False)


def register_dense_head(name: str):
    """Class decorator adding a dense head type to :data:`DENSE_HEADS` (and setting the class's
    ``kind`` to ``name``)."""
    return DENSE_HEADS.register(name, stamp="kind")


def create_dense_head(kind: str, in_shape, num_classes: int, out_size: Sequence[int] | None = None,
                      **kwargs) -> DenseHead:
    """Build a registered dense head for the cut's per-sample shape ``in_shape`` (or
    ``payload_shapes(x)[cut]``) giving ``(num_classes, *out_size)`` maps.

    Raises:
        InputError: an unknown kind (the known ones listed), no ``out_size``, or a cut whose
            spatial size cannot be upsampled to ``out_size``.
    """
    return DENSE_HEADS.get(kind)(head_in_shape(in_shape), num_classes, out_size=out_size,
                                 **kwargs)


@register_dense_head("pointwise")
class PointwiseHead(DenseHead):
    """FCN's score layer: one 1x1 convolution to class maps, then upsampling."""

    def __init__(self, in_shape, num_classes, out_size=None, guide: int = 0):
        super().__init__(in_shape, num_classes, out_size, guide)
        self.body = nn.Conv2d(self.features, num_classes, 1)


def _check_ints(**values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"a dense head's {name} must be an int >= 1, got {v!r}")


@register_dense_head("conv")
class ConvDenseHead(DenseHead):
    """``depth`` 3x3 conv-BN-ReLU layers of ``channels`` (dilated by ``dilation``), a 1x1
    classifier, then upsampling: MESS's convolutional exit head. With ``depthwise=True``
    each 3x3 conv is depthwise-separable (cheaper for the same receptive field)."""

    def __init__(self, in_shape, num_classes, out_size=None, channels: int | None = None,
                 depth: int = 1, dilation: int = 1, depthwise: bool = False, guide: int = 0):
        super().__init__(in_shape, num_classes, out_size, guide)
        channels = channels or self.features
        _check_ints(channels=channels, depth=depth, dilation=dilation)
        self.channels, self.depth, self.dilation = channels, depth, dilation
        self.depthwise = bool(depthwise)
        layers: list[nn.Module] = []
        c = self.features
        for _ in range(depth):
            if self.depthwise:
                layers += [nn.Conv2d(c, c, 3, 1, dilation, dilation=dilation, groups=c,
                                     bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                           nn.Conv2d(c, channels, 1, bias=False)]
            else:
                layers.append(nn.Conv2d(c, channels, 3, 1, dilation, dilation=dilation,
                                        bias=False))
            layers += [nn.BatchNorm2d(channels), nn.ReLU()]
            c = channels
        self.body = nn.Sequential(*layers, nn.Conv2d(c, num_classes, 1))

    def extra_config(self) -> dict:
        return {"channels": self.channels, "depth": self.depth, "dilation": self.dilation,
                "depthwise": self.depthwise}


@register_dense_head("depthwise")
class DepthwiseDenseHead(ConvDenseHead):
    """:class:`ConvDenseHead` with depthwise-separable convolutions."""

    def __init__(self, in_shape, num_classes, out_size=None, channels: int | None = None,
                 depth: int = 1, dilation: int = 1, depthwise: bool = True, guide: int = 0):
        super().__init__(in_shape, num_classes, out_size, channels, depth, dilation, True, guide)
