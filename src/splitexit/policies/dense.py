"""Exit policies for dense (per-pixel) exits: a statistic that reduces an exit's logit map to
one confidence per sample, compared with a threshold by the one exit loop.

``pixelshare`` is MESS's: the share of pixels whose top softmax probability reaches
``pixel_threshold``; ``meanconf`` is the mean top probability over the pixels. With
``stride=s`` either reads one pixel per ``s x s`` block (the block's middle one), e.g. the
resolution of a head that upsamples by ``s``: the same decision rule at ``1 / s**2`` of the
work, calibrated like any other threshold (see :func:`grid_pixels`). Both are plain
threshold policies (stateless), so the shared loop, the offline replay and the sweeps treat them
like max-prob; on ``(N, C)`` logits they reduce to a one-pixel map. Torch-free, like every
policy: they run on numpy arrays on the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..runtime.arrays import ops_of
from .base import ThresholdPolicy

__all__ = ["PixelShare", "MeanConfidence", "pixel_confidence", "per_sample_mean",
           "grid_pixels"]


def pixel_confidence(F, z):
    """Top softmax probability of every pixel, ``(N, H, W)`` (``(N,)`` for ``(N, C)``):
    ``1 / sum_k exp(z_k - max_k z)``, the softmax's largest entry without the division of
    every entry and the second reduction (about a third less work on a dense map)."""
    top = F.amax(z)
    return 1.0 / F.sum(F.exp(z - top[:, None]))


def per_sample_mean(a):
    """Mean over every axis but the first (a torch tensor or a numpy array)."""
    return a.reshape(a.shape[0], -1).mean(1)


def grid_pixels(z, stride: int):
    """The pixels a dense statistic with ``stride`` reads: rows and columns ``stride // 2``,
    ``stride // 2 + stride``, ... of a ``(N, C, H, W)`` map (a view, numpy or torch); the map
    itself for ``stride=1`` or ``(N, C)`` logits.

    Raises:
        InputError: a map too small to hold one pixel of the grid.
    """
    if stride == 1 or z.ndim != 4:
        return z
    first = stride // 2
    if z.shape[2] <= first or z.shape[3] <= first:
        raise InputError(f"a dense policy with stride={stride} reads pixels from row and "
                         f"column {first} on, but the logit map is {tuple(z.shape[2:])}; "
                         "use a smaller stride")
    return z[:, :, first::stride, first::stride]


def _check_stride(policy: str, stride) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise InputError(f"{policy} stride is the pixel grid step, an int >= 1 (1: every "
                         f"pixel), got {stride!r}")


@dataclass(frozen=True)
class MeanConfidence(ThresholdPolicy):
    """Exit when the mean over pixels (every ``stride``-th row and column) of the top softmax
    probability is at least ``threshold``."""

    threshold: float | tuple[float, ...] = 0.9
    stride: int = 1
    name = "meanconf"
    valid_range = (0.0, 1.0)

    def __post_init__(self):
        super().__post_init__()
        _check_stride(self.name, self.stride)

    def statistic(self, logits):
        ops = ops_of(logits)
        z = ops.float32(grid_pixels(logits, self.stride))
        return per_sample_mean(pixel_confidence(ops, z))


@dataclass(frozen=True)
class PixelShare(ThresholdPolicy):
    """MESS's policy: exit when at least a share ``threshold`` of the pixels have a top softmax
    probability of at least ``pixel_threshold`` (of every ``stride``-th row and column)."""

    threshold: float | tuple[float, ...] = 0.9
    pixel_threshold: float = 0.9
    stride: int = 1
    name = "pixelshare"
    valid_range = (0.0, 1.0)

    def __post_init__(self):
        super().__post_init__()
        _check_stride(self.name, self.stride)
        p = self.pixel_threshold
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise InputError(f"pixelshare pixel_threshold is a probability in [0, 1], got {p!r}")

    def statistic(self, logits):
        ops = ops_of(logits)
        z = ops.float32(grid_pixels(logits, self.stride))
        confident = pixel_confidence(ops, z) >= self.pixel_threshold
        return per_sample_mean(ops.float32(confident))
