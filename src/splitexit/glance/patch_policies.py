"""Patch policies of glance and focus: which full-resolution patch to look at next.

Every policy scores the grid's locations from the image (once per image: its prior) and the
step's state (the recurrent state ``h``, the glance's feature map, the locations already
used); the focus step takes the best unused one. All three are deterministic per sample,
so a sample gets the same patches whatever batch it is in (real exits at batch > 1 equal
the offline replay):

- :class:`LearnedPatchPolicy`: an actor-critic over the grid, trained by PPO
  (:mod:`splitexit.glance.ppo`); at inference its most probable location.
- :class:`LocaliserPolicy`: the learned policy's localiser alone (its image-only scores, the
  best unused location each step; no state term: cheaper at batch 1).
- :class:`RandomPatchPolicy`: uniformly random locations without replacement, drawn from a
  hash of the sample's own pixels (integer arithmetic: the same draw on every runtime).
- :class:`CentrePatchPolicy`: the centre first, then outwards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .grid import PatchGrid

__all__ = ["PatchPolicy", "LearnedPatchPolicy", "LocaliserPolicy", "RandomPatchPolicy",
           "CentrePatchPolicy", "masked_scores", "PATCH_POLICIES"]

#: the names :meth:`splitexit.glance.GFNet.multiexit` takes
PATCH_POLICIES = ("learned", "localiser", "random", "centre")


def masked_scores(scores: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """``scores`` with the locations already used (``used > 0.5``) set to ``-inf``."""
    return scores.masked_fill(used > 0.5, float("-inf"))


class PatchPolicy(nn.Module):
    """Scores ``(N, locations)`` of every location; higher is chosen first.

    :meth:`prior` is what depends on the image alone, computed once per image (at the first
    focus step, then carried in the payload); :meth:`forward` adds what depends on the step's
    state.
    """

    name = "policy"
    #: whether :meth:`prior` reads the glance image (``small``); the stages then carry it
    uses_glance_image = False
    #: whether :meth:`forward` reads the glance map; the stages carry it only then
    uses_glance_map = False

    def prior(self, x: torch.Tensor, small: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, locations)`` scores from the image alone (``small``: the image already
        average-pooled by the grid's factor, when the caller has it)."""
        raise NotImplementedError

    def forward(self, prior: torch.Tensor, h: torch.Tensor, glance_map: torch.Tensor,
                used: torch.Tensor) -> torch.Tensor:
        return prior

    def choose(self, prior, h, glance_map, used) -> torch.Tensor:
        """The best unused location of every sample, ``(N,)`` int64."""
        return masked_scores(self(prior, h, glance_map, used), used).argmax(1)


class LearnedPatchPolicy(PatchPolicy):
    """Actor-critic over the grid.

    The actor's logit of a location is a spatial score plus a state term. The spatial score
    comes from a small fully-convolutional localiser on the glance (the image average-pooled
    by the grid's factor): its one-channel map averaged over each patch's footprint, read at
    the patch's place (a gather). The state term and the critic's value come from a trunk on
    the glance CNN's feature map (reduced by a 1x1 convolution), the recurrent state and the
    used-locations mask, so later steps can look elsewhere.

    Args:
        grid: the patch grid.
        map_shape: ``(C, a, b)`` of the glance CNN's feature map.
        hidden: size of the recurrent state.
        in_channels: image channels.
        width: width of the trunk.
        map_channels: channels of the glance map's 1x1 reduction.
        localiser: width of the localiser's two 3x3 convolutions.
        localiser_stride: stride of the localiser's first convolution (2 runs its second
            convolution on a quarter of the glance's pixels; the patch footprint is then
            counted in the localiser map's cells).
    """

    name = "learned"
    uses_glance_image = True
    uses_glance_map = True

    def __init__(self, grid: PatchGrid, map_shape: tuple[int, int, int], hidden: int,
                 in_channels: int = 1, width: int = 128, map_channels: int = 8,
                 localiser: int = 16, localiser_stride: int = 1):
        super().__init__()
        c, a, b = map_shape
        self.factor = grid.factor
        w, s = localiser, localiser_stride
        self.localiser = nn.Sequential(nn.Conv2d(in_channels, w, 3, stride=s, padding=1),
                                       nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(w, 1, 1))
        # every location's footprint on the glance image (what ink_scores reads) ...
        self.footprint, sites = _footprint_sites(grid, grid.glance, grid.factor)
        self.register_buffer("sites", sites, persistent=False)
        # ... and on the localiser's map (the glance at stride s)
        self.map_footprint, map_sites = _footprint_sites(grid, (grid.glance - 1) // s + 1,
                                                         grid.factor * s)
        self.register_buffer("map_sites", map_sites, persistent=False)
        #: the sites are every cell of the pooled map in order: no gather needed
        self.whole_map = bool(torch.equal(map_sites, torch.arange(grid.locations)))
        self.reduce = nn.Conv2d(c, map_channels, 1)
        self.trunk = nn.Sequential(
            nn.Linear(map_channels * a * b + hidden + grid.locations, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU())
        self.actor = nn.Linear(width, grid.locations)
        self.critic = nn.Linear(width, 1)
        nn.init.zeros_(self.actor.weight)  # the policy starts as the localiser alone
        nn.init.zeros_(self.actor.bias)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """The glance image the localiser looks at."""
        return F.avg_pool2d(x, self.factor) if self.factor > 1 else x

    def spatial(self, small: torch.Tensor) -> torch.Tensor:
        """The localiser's score of every location, from the downsampled image."""
        pooled = F.avg_pool2d(self.localiser(small), self.map_footprint, stride=1).flatten(1)
        return pooled if self.whole_map else pooled[:, self.map_sites]

    def prior(self, x: torch.Tensor, small: torch.Tensor | None = None) -> torch.Tensor:
        return self.spatial(self.downsample(x) if small is None else small)

    def _state(self, h, glance_map, used) -> torch.Tensor:
        m = torch.relu(self.reduce(glance_map)).flatten(1)
        return self.trunk(torch.cat([m, h, used], 1))

    def forward(self, prior, h, glance_map, used) -> torch.Tensor:
        return prior + self.actor(self._state(h, glance_map, used))

    def actor_critic(self, small, h, glance_map, used) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits (used locations at -1e9: finite, so the entropy's gradient stays
        finite) and state values, from the downsampled image (:meth:`downsample`) and the
        step's state; what PPO trains."""
        z = self._state(h, glance_map, used)
        logits = self.spatial(small) + self.actor(z)
        return logits.masked_fill(used > 0.5, -1e9), self.critic(z).squeeze(1)


def _footprint_sites(grid: PatchGrid, side: int, scale: int) -> tuple[int, torch.Tensor]:
    """A patch's footprint on a map of ``side`` cells of ``scale`` pixels, and the flat index
    of every location's cell in that map average-pooled by the footprint at stride 1."""
    footprint = max(1, grid.patch // scale)
    pooled = side - footprint + 1
    corners = torch.clamp(torch.round(grid.corners().double() / scale).long(), 0, pooled - 1)
    return footprint, corners[:, 0] * pooled + corners[:, 1]


class LocaliserPolicy(PatchPolicy):
    """A learned policy's localiser alone: its image-only scores rank the locations and each
    step takes the best unused one. The state term (the trunk on the glance map, the
    recurrent state and the used mask, and the actor) is left out: at batch 1 it costs about
    as much as a focus step's crop and CNN. Shares the learned policy's weights."""

    name = "localiser"
    uses_glance_image = True

    def __init__(self, learned: LearnedPatchPolicy):
        super().__init__()
        self.learned = learned

    def prior(self, x: torch.Tensor, small: torch.Tensor | None = None) -> torch.Tensor:
        return self.learned.prior(x, small)


_PRIME = 2147483647  # 2^31 - 1


class RandomPatchPolicy(PatchPolicy):
    """Uniformly random locations without replacement, a fixed function of the sample's pixels.

    The key of a sample is ``sum(round(255 x) * w) mod p`` with fixed random integer weights
    ``w`` (``x`` in ``[0, 1]``); location ``g`` scores ``(key * a_g + b_g) mod p``. All in
    int64 without overflow, so every runtime and every batch composition draws the same.
    """

    name = "random"

    def __init__(self, grid: PatchGrid, channels: int = 1, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        pixels = channels * grid.image * grid.image
        self.register_buffer("weights", torch.randint(1, 2 ** 20, (pixels,), generator=gen))
        self.register_buffer("a", torch.randint(1, 2 ** 30, (grid.locations,), generator=gen))
        self.register_buffer("b", torch.randint(0, 2 ** 30, (grid.locations,), generator=gen))

    def prior(self, x: torch.Tensor, small: torch.Tensor | None = None) -> torch.Tensor:
        levels = torch.round(x.reshape(x.shape[0], -1) * 255.0).to(torch.int64)
        key = torch.remainder((levels * self.weights).sum(1), _PRIME)
        scores = torch.remainder(key[:, None] * self.a[None, :] + self.b[None, :], _PRIME)
        return scores.to(torch.float32) / float(_PRIME)


class CentrePatchPolicy(PatchPolicy):
    """The centre patch first, then the others by distance from the centre."""

    name = "centre"

    def __init__(self, grid: PatchGrid):
        super().__init__()
        self.register_buffer("priority", grid.centre_order())

    def prior(self, x: torch.Tensor, small: torch.Tensor | None = None) -> torch.Tensor:
        return x.new_zeros((x.shape[0], 1)) + self.priority[None, :]
