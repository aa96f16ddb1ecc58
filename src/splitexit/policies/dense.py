"""Exit policies for dense (per-pixel) exits: a statistic that reduces an exit's logit map to
one confidence per sample, compared with a threshold by the one exit loop.

``pixelshare`` is MESS's: the share of pixels whose top softmax probability reaches
``pixel_threshold``; ``meanconf`` is the mean top probability over the pixels. With
``stride=s`` either reads one pixel per ``s x s`` block (the block's middle one), e.g. the
resolution of a head that upsamples by ``s``: the same decision rule at ``1 / s**2`` of the
work, calibrated like any other threshold (the ``grid`` primitive). Both are plain threshold
policies (stateless), so the shared loop, the offline replay and the sweeps treat them like
max-prob; on ``(N, C)`` logits they reduce to a one-pixel map. Each statistic is written
once over the array primitives (:mod:`splitexit.runtime.arrays`), so numpy, torch and the
ONNX lowering (:class:`~splitexit.export.exit_graph.OnnxOps`) share it. Torch-free, like
every policy: they run on numpy arrays on the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .base import ThresholdPolicy

__all__ = ["PixelShare", "MeanConfidence", "DENSE_POLICIES", "pixel_confidence"]


def pixel_confidence(F, z):
    """Top softmax probability of every pixel, ``(N, H, W)`` (``(N,)`` for ``(N, C)``), in the
    primitives ``F`` (numpy, torch or ONNX): ``1 / sum_k exp(z_k - max_k z)``, the softmax's
    largest entry without the division of every entry and the second reduction (about a third
    less work on a dense map)."""
    return F.reciprocal(F.sum(F.exp(F.sub(z, F.amax(z, keepdims=True)))))


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

    def statistic_over(self, F, z):
        return F.pixel_mean(pixel_confidence(F, F.grid(z, self.stride)))


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

    def statistic_over(self, F, z):
        confident = F.at_least(pixel_confidence(F, F.grid(z, self.stride)),
                               self.pixel_threshold)
        return F.pixel_mean(F.float32(confident))


#: the dense policies (their statistics reduce a logit map to one value per sample)
DENSE_POLICIES = (MeanConfidence, PixelShare)
