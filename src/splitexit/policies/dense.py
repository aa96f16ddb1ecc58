"""Exit policies for dense (per-pixel) exits: a statistic that reduces an exit's logit map to
one confidence per sample, compared with a threshold by the one exit loop.

``pixelshare`` is MESS's: the share of pixels whose top softmax probability reaches
``pixel_threshold``; ``meanconf`` is the mean top probability over the pixels. Both are plain
threshold policies (stateless), so the shared loop, the offline replay and the sweeps treat them
like max-prob; on ``(N, C)`` logits they reduce to a one-pixel map. Torch-free, like every
policy: they run on numpy arrays on the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..runtime.arrays import ops_of
from .base import ThresholdPolicy

__all__ = ["PixelShare", "MeanConfidence", "pixel_confidence", "per_sample_mean"]


def pixel_confidence(F, z):
    """Top softmax probability of every pixel, ``(N, H, W)`` (``(N,)`` for ``(N, C)``):
    ``1 / sum_k exp(z_k - max_k z)``, the softmax's largest entry without the division of
    every entry and the second reduction (about a third less work on a dense map)."""
    top = F.amax(z)
    return 1.0 / F.sum(F.exp(z - top[:, None]))


def per_sample_mean(a):
    """Mean over every axis but the first (a torch tensor or a numpy array)."""
    return a.reshape(a.shape[0], -1).mean(1)


@dataclass(frozen=True)
class MeanConfidence(ThresholdPolicy):
    """Exit when the mean over pixels of the top softmax probability is at least
    ``threshold``."""

    threshold: float | tuple[float, ...] = 0.9
    name = "meanconf"
    valid_range = (0.0, 1.0)

    def statistic(self, logits):
        ops = ops_of(logits)
        return per_sample_mean(pixel_confidence(ops, ops.float32(logits)))


@dataclass(frozen=True)
class PixelShare(ThresholdPolicy):
    """MESS's policy: exit when at least a share ``threshold`` of the pixels have a top softmax
    probability of at least ``pixel_threshold``."""

    threshold: float | tuple[float, ...] = 0.9
    pixel_threshold: float = 0.9
    name = "pixelshare"
    valid_range = (0.0, 1.0)

    def __post_init__(self):
        super().__post_init__()
        p = self.pixel_threshold
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise InputError(f"pixelshare pixel_threshold is a probability in [0, 1], got {p!r}")

    def statistic(self, logits):
        ops = ops_of(logits)
        confident = pixel_confidence(ops, ops.float32(logits)) >= self.pixel_threshold
        return per_sample_mean(ops.float32(confident))
