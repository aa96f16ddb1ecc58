"""The patch grid of glance and focus: where full-resolution patches may be taken, checked once,
and the crop of a patch as a gather with computed indices (so it exports to ONNX)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

__all__ = ["PatchGrid", "crop_patches"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class PatchGrid:
    """Square patches of side ``patch`` at every ``stride`` pixels of a square image of side
    ``image``, seen at a glance downsampled to side ``glance``.

    Location ``g`` is the patch whose top-left corner is ``(stride * (g // side),
    stride * (g % side))`` with ``side = (image - patch) // stride + 1``.

    Raises:
        InputError: an image smaller than a patch or than the glance; an image whose side is
            not a multiple of the glance's (the glance is an average pool by that factor); a
            stride that does not tile ``image - patch`` (the last patch would not end at the
            image's edge).
    """

    image: int
    patch: int
    stride: int
    glance: int

    def __post_init__(self) -> None:
        image = _positive_int("image size", self.image)
        patch = _positive_int("patch size", self.patch)
        stride = _positive_int("patch stride", self.stride)
        glance = _positive_int("glance size", self.glance)
        if image < patch:
            raise InputError(f"the image ({image}x{image}) is smaller than a patch "
                             f"({patch}x{patch}); use a patch size of at most {image}")
        if glance > image or image % glance:
            raise InputError(f"the glance downsamples the image by an integer factor, but "
                             f"{image} is not divisible by the glance size {glance}; choose a "
                             f"glance size that divides {image} (e.g. {image // 4 or 1})")
        if (image - patch) % stride:
            good = [s for s in range(1, image - patch + 1) if (image - patch) % s == 0]
            raise InputError(f"patches of {patch} at stride {stride} do not tile an image of "
                             f"{image}: {image} - {patch} = {image - patch} is not divisible "
                             f"by {stride}; use a stride in {good or [1]}")

    @property
    def side(self) -> int:
        """Patch positions along each axis."""
        return (self.image - self.patch) // self.stride + 1

    @property
    def locations(self) -> int:
        """Number of patch locations."""
        return self.side * self.side

    @property
    def factor(self) -> int:
        """Downsampling factor of the glance."""
        return self.image // self.glance

    def corners(self) -> torch.Tensor:
        """``(locations, 2)`` top-left ``(row, col)`` of every patch."""
        g = torch.arange(self.locations)
        return torch.stack([g // self.side, g % self.side], 1) * self.stride

    def pixel_index(self) -> torch.Tensor:
        """``(locations, patch * patch)`` flat pixel indices of every patch (row-major)."""
        r = torch.arange(self.patch)
        within = (r[:, None] * self.image + r[None, :]).reshape(-1)
        corners = self.corners()
        return corners[:, :1] * self.image + corners[:, 1:] + within[None, :]

    def centre_order(self) -> torch.Tensor:
        """``(locations,)`` priority of every location: higher nearer the image's centre
        (ties broken by location index)."""
        centre = (self.image - self.patch) / 2
        d = ((self.corners().double() - centre) ** 2).sum(1)
        rank = torch.argsort(torch.argsort(d, stable=True), stable=True)
        return (self.locations - rank).float()


def crop_patches(x: torch.Tensor, index: torch.Tensor, location: torch.Tensor,
                 patch: int) -> torch.Tensor:
    """Patch ``location[i]`` of image ``x[i]``: ``(N, C, patch, patch)``.

    A gather with indices computed from the chosen locations (``index`` is
    :meth:`PatchGrid.pixel_index`), which ONNX expresses as Gather + GatherElements.
    """
    n, c = x.shape[0], x.shape[1]
    pixels = index[location]  # (N, P*P)
    flat = x.reshape(n, c, -1)
    gathered = flat.gather(2, pixels[:, None, :].expand(n, c, pixels.shape[1]))
    return gathered.reshape(n, c, patch, patch)
