"""GFNet (glance and focus) as a chain of stages whose steps are its exits.

Stage 0, the glance: the whole image downsampled by an average pool through a small CNN;
its pooled features start a recurrent state ``h``. Stage ``t >= 1``, focus step ``t``: the
patch policy picks an unused location of the grid, the full-resolution patch there (a gather)
goes through a second CNN, and a GRU-style cell fuses its features into ``h``. One linear
classifier reads ``h`` after every step; those are the exits. The payload between stages is
the step's state: ``(image, h, glance feature map, used locations, the policy's image-only
scores)``, carrying only what the patch policy reads (the glance image to the first focus
step for a learned localiser, no glance map for a policy without a state term: see
:class:`GlanceStage`); the last step ends in the logits. So
:class:`~splitexit.multiexit.MultiExitModel`'s ``infer`` (real per-sample exits),
``simulate``, calibration, lowering, ONNX export and measurement all apply unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..multiexit import MultiExitModel
from ..stages import Stage, StagedModel
from .grid import PatchGrid, crop_patches
from .patch_policies import (
    PATCH_POLICIES,
    CentrePatchPolicy,
    LearnedPatchPolicy,
    LocaliserPolicy,
    PatchPolicy,
    RandomPatchPolicy,
)

__all__ = ["GFNetConfig", "GFNet", "conv_encoder", "global_pool", "FusionCell", "full_resolution_backbone",
           "GlanceStage", "FocusStage", "FirstFocusStage", "MaplessFocusStage",
           "MaplessFirstFocusStage", "GlanceNet", "FocusNet", "mark_used"]


@dataclass(frozen=True)
class GFNetConfig:
    """Sizes of a GFNet.

    Attributes:
        image: side of the (square) input image.
        glance: side of the downsampled glance (must divide ``image``).
        patch, stride: side of the focus patches and the step of their grid.
        steps: the patch budget, focus steps after the glance (>= 1).
        channels: channels of the CNN blocks (the glance and the focus CNN share the design,
            not the weights; the full-resolution backbone uses the same design).
        hidden: size of the recurrent state.
        num_classes, in_channels: classes and image channels.
        localiser: width of the learned patch policy's localiser (its convolutions on the
            glance image).
        localiser_stride: stride of the localiser's first convolution (1: at the glance's
            resolution; 2: its second convolution on a quarter of the pixels).
        encoder_channels, encoder_strides: the glance and focus CNNs' own design when it
            differs from the backbone's (``None``: ``channels`` and ``strides``); it must end
            in the same feature map shape on a glance.
    """

    image: int = 160
    glance: int = 40
    patch: int = 40
    stride: int = 8
    steps: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 64)
    hidden: int = 128
    num_classes: int = 10
    in_channels: int = 1
    strides: tuple[int, ...] = field(default=(2, 2, 2, 1))
    localiser: int = 8
    localiser_stride: int = 1
    encoder_channels: tuple[int, ...] | None = None
    encoder_strides: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"the patch budget (steps) must be an integer >= 1 (one focus "
                             f"step after the glance at least), got {self.steps!r}; a budget "
                             "of 0 is the glance alone: use the glance network as a classifier")
        grid = self.grid
        if self.steps > grid.locations:
            raise InputError(f"a patch budget of {self.steps} exceeds the {grid.locations} "
                             "patch locations of the grid; use fewer steps")
        if isinstance(self.localiser, bool) or not isinstance(self.localiser, int) or \
                self.localiser < 1:
            raise InputError(f"the localiser width must be an integer >= 1, got "
                             f"{self.localiser!r}")
        s = self.localiser_stride
        if isinstance(s, bool) or not isinstance(s, int) or s < 1 or \
                grid.patch // (grid.factor * s) < 1:
            raise InputError(f"the localiser stride must be an integer >= 1 whose map cell "
                             f"({grid.factor} x stride pixels) fits in a patch of {grid.patch}, "
                             f"got {s!r}")
        for c, st in ((self.channels, self.strides), self.encoder):
            if len(c) != len(st) or not c:
                raise InputError(f"channels {c} and strides {st} must have the same non-zero "
                                 "length")

    @property
    def encoder(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(channels, strides)`` of the glance and focus CNNs."""
        return (self.channels if self.encoder_channels is None else self.encoder_channels,
                self.strides if self.encoder_strides is None else self.encoder_strides)

    @property
    def grid(self) -> PatchGrid:
        return PatchGrid(self.image, self.patch, self.stride, self.glance)

    def to_json(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if d["localiser_stride"] == 1:  # configurations saved before the field existed
            del d["localiser_stride"]    # read back (and hash) the same
        for k in ("encoder_channels", "encoder_strides"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_json(cls, d: dict) -> GFNetConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def conv_encoder(in_channels: int, channels, strides) -> nn.Sequential:
    """3x3 convolutions with batch norm and ReLU (a small all-convolutional CNN)."""
    layers: list[nn.Module] = []
    c = in_channels
    for out, s in zip(channels, strides):
        layers += [nn.Conv2d(c, out, 3, s, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    return nn.Sequential(*layers)


def global_pool(features: torch.Tensor) -> torch.Tensor:
    """Global average pooling to ``(N, C)``: the mean over the pixels (bit-identical to
    ``features.mean((2, 3))`` in PyTorch), written so that it exports as one
    GlobalAveragePool, which ONNX Runtime runs on the CNN's blocked layout instead of first
    reordering the whole feature map for a ReduceMean."""
    return F.adaptive_avg_pool2d(features, 1).flatten(1)


class FusionCell(nn.Module):
    """A GRU cell written with linear layers (it exports to ONNX as plain MatMul/Sigmoid/Tanh).

    ``h' = (1 - z) * n + z * h`` with ``z, r = sigmoid(W [f, h])``, ``n = tanh(W_f f + r * W_h h)``,
    computed as ``n + z * (h - n)`` (one node fewer at batch 1, where every node costs).
    """

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.features = features
        self.gates = nn.Linear(features + hidden, 2 * hidden)
        self.new_f = nn.Linear(features, hidden)
        self.new_h = nn.Linear(hidden, hidden)

    def forward(self, f: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z, r = torch.sigmoid(self.gates(torch.cat([f, h], 1))).chunk(2, 1)
        n = torch.tanh(self.new_f(f) + r * self.new_h(h))
        return n + z * (h - n)

    def from_zero(self, f: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` from the zero state, without the terms that are zero there (the
        glance's cell: four graph nodes fewer; the weight slice folds into a constant)."""
        gates = F.linear(f, self.gates.weight[:, : self.features], self.gates.bias)
        z, r = torch.sigmoid(gates).chunk(2, 1)
        n = torch.tanh(self.new_f(f) + r * self.new_h.bias)
        return n - z * n


class GlanceNet(nn.Module):
    """The glance: average-pool the image by ``factor``, the glance CNN, global average pool,
    the fusion cell from a zero state. Returns ``(h, glance feature map)``."""

    def __init__(self, encoder: nn.Module, cell: FusionCell, factor: int, hidden: int):
        super().__init__()
        self.encoder, self.cell, self.factor, self.hidden = encoder, cell, factor, hidden

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """The glance image: ``x`` average-pooled by the factor."""
        return F.avg_pool2d(x, self.factor) if self.factor > 1 else x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.look(self.downsample(x))

    def look(self, small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The glance on the downsampled image (:meth:`downsample`)."""
        glance_map = self.encoder(small)
        return self.cell.from_zero(global_pool(glance_map)), glance_map


class FocusNet(nn.Module):
    """A focus step's network: crop patch ``location`` of each image (a gather), the focus
    CNN, global average pool, fuse into ``h``. Returns the new ``h``."""

    def __init__(self, encoder: nn.Module, cell: FusionCell, grid: PatchGrid):
        super().__init__()
        self.encoder, self.cell, self.patch = encoder, cell, grid.patch
        self.register_buffer("pixel_index", grid.pixel_index(), persistent=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        patch = crop_patches(x, self.pixel_index, location, self.patch)
        return self.cell(global_pool(self.encoder(patch)), h)


class GFNet(nn.Module):
    """The networks of glance and focus: glance CNN, focus CNN, fusion cell, classifier and the
    learned patch policy (actor-critic). :meth:`multiexit` assembles them, with a patch policy,
    into a :class:`~splitexit.multiexit.MultiExitModel` whose exits are the steps.
    """

    def __init__(self, config: GFNetConfig | None = None):
        super().__init__()
        self.config = config = config or GFNetConfig()
        self.grid = grid = config.grid
        channels, strides = config.encoder
        cell = FusionCell(channels[-1], config.hidden)
        self.glance = GlanceNet(conv_encoder(config.in_channels, channels, strides), cell,
                                grid.factor, config.hidden)
        self.focus = FocusNet(conv_encoder(config.in_channels, channels, strides), cell, grid)
        self.classifier = nn.Linear(config.hidden, config.num_classes)
        with torch.no_grad():
            probe = self.glance.encoder(torch.zeros(1, config.in_channels, config.glance,
                                                    config.glance))
        self.map_shape = tuple(int(d) for d in probe.shape[1:])
        self.policy = LearnedPatchPolicy(grid, self.map_shape, config.hidden,
                                         config.in_channels, localiser=config.localiser,
                                         localiser_stride=config.localiser_stride)

    def patch_policy(self, name: str | PatchPolicy, seed: int = 0) -> PatchPolicy:
        """The patch policy called ``name`` (``learned``, ``localiser``: the learned one's
        localiser alone, ``random``, ``centre``), or the policy object given."""
        if isinstance(name, PatchPolicy):
            return name
        if name == "learned":
            return self.policy
        if name == "localiser":
            return LocaliserPolicy(self.policy)
        if name == "random":
            return RandomPatchPolicy(self.grid, self.config.in_channels, seed).to(
                self.classifier.weight.device)
        if name == "centre":
            return CentrePatchPolicy(self.grid).to(self.classifier.weight.device)
        raise InputError(f"unknown patch policy {name!r}; known: {', '.join(PATCH_POLICIES)}")

    def rollout(self, x: torch.Tensor, policy: str | PatchPolicy = "learned",
                steps: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every step's logits (glance first) and the chosen locations ``(N, steps)``."""
        policy = self.patch_policy(policy)
        steps = self.config.steps if steps is None else steps
        h, glance_map = self.glance(x)
        used = h.new_zeros(x.shape[0], self.grid.locations)
        prior = policy.prior(x)
        logits, chosen = [self.classifier(h)], []
        for _ in range(steps):
            location = policy.choose(prior, h, glance_map, used)
            h = self.focus(x, h, location)
            used = mark_used(used, location)
            logits.append(self.classifier(h))
            chosen.append(location)
        return logits, torch.stack(chosen, 1)

    # the chain of stages ------------------------------------------------------------------
    def multiexit(self, policy: str | PatchPolicy = "learned", steps: int | None = None
                  ) -> MultiExitModel:
        """The glance and ``steps`` focus steps (default: the budget) as a multi-exit model
        with ``policy`` choosing the patches; modules are shared with this GFNet.

        Raises:
            InputError: an unknown policy, or a budget outside ``1 .. config.steps``.
        """
        steps = self.config.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps:
            raise InputError(f"the patch budget must be an integer >= 1, got {steps!r}; a "
                             "budget of 0 is the glance alone")
        if steps > self.grid.locations:
            raise InputError(f"a patch budget of {steps} exceeds the {self.grid.locations} "
                             "patch locations")
        chosen = self.patch_policy(policy)
        small = chosen.uses_glance_image  # the glance image travels to the first focus step
        glance_map = chosen.uses_glance_map  # the glance map travels to every focus step
        stages = [Stage(GlanceStage(self.glance, self.grid.locations, small, glance_map),
                        "glance")] + [
            Stage(_focus_stage(small, glance_map, t == 1)(
                self.focus, chosen, self.classifier if t == steps else None, first=t == 1),
                f"focus{t}", 4 + glance_map + (small and t == 1))
            for t in range(1, steps + 1)]
        cuts = ["glance"] + [f"focus{t}" for t in range(1, steps)]
        c = self.config
        heads = {f"{cut}@{2 if small and cut == 'glance' else 1}": self.classifier
                 for cut in cuts}  # the payload's h
        model = MultiExitModel(StagedModel(stages, cuts), heads,
                               (c.in_channels, c.image, c.image))
        return model.train(self.training)

    # persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Weights (safetensors) and configuration (JSON) into ``directory``."""
        from safetensors.torch import save_model

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_model(self, str(d / "gfnet.safetensors"))
        (d / "gfnet.json").write_text(json.dumps(self.config.to_json(), indent=1))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> GFNet:
        """A GFNet saved by :meth:`save` (no pickle)."""
        from safetensors.torch import load_model

        d = Path(directory)
        net = cls(GFNetConfig.from_json(json.loads((d / "gfnet.json").read_text())))
        load_model(net, str(d / "gfnet.safetensors"))
        return net.eval()


class GlanceStage(nn.Module):
    """Stage 0: image -> ``(image, h, glance map, used, prior)``; the prior (the patch
    policy's image-only scores) is computed by the first focus step, zeros until then.

    The payload carries what the patch policy reads: the glance image right after the image
    when ``small`` (so the first focus step does not average-pool the full-resolution image
    again), the glance map only when ``glance_map`` (a policy with a state term). Every
    exported step then reads every tensor it is given."""

    def __init__(self, glance: GlanceNet, locations: int, small: bool = False,
                 glance_map: bool = True):
        super().__init__()
        self.glance, self.locations = glance, locations
        self.small, self.glance_map = small, glance_map

    def forward(self, x: torch.Tensor):
        small = self.glance.downsample(x)
        h, glance_map = self.glance.look(small)
        zeros = h.new_zeros((h.shape[0], self.locations))
        return ((x, small) if self.small else (x,)) + (h,) + (
            (glance_map,) if self.glance_map else ()) + (zeros, zeros)


class FocusStage(nn.Module):
    """Focus step: ``(image, h, glance map, used, prior)`` -> the same after one patch, or
    the logits (``classifier``) when it is the last. The first step computes the prior.
    Subclasses take the other payload layouts of :class:`GlanceStage`."""

    def __init__(self, focus: FocusNet, policy: PatchPolicy, classifier: nn.Module | None,
                 first: bool):
        super().__init__()
        self.focus, self.patch_policy, self.classifier = focus, policy, classifier
        self.first = first

    def forward(self, x, h, glance_map, used, prior):
        return self.step(x, None, h, glance_map, used, prior)

    def step(self, x, small, h, glance_map, used, prior):
        if self.first:  # + the zeros the glance sent: keeps the input in an exported graph
            prior = self.patch_policy.prior(x, small) + prior
        location = self.patch_policy.choose(prior, h, glance_map, used)
        h = self.focus(x, h, location)
        if self.classifier is not None:
            return self.classifier(h)
        used = mark_used(used, location)
        return (x, h, used, prior) if glance_map is None else (x, h, glance_map, used, prior)


class FirstFocusStage(FocusStage):
    """The first focus step of a policy that reads the glance image: ``(image, glance image,
    h, glance map, used, prior)`` in (see :class:`GlanceStage`), then as :class:`FocusStage`."""

    def forward(self, x, small, h, glance_map, used, prior):
        return self.step(x, small, h, glance_map, used, prior)


class MaplessFocusStage(FocusStage):
    """A focus step of a policy without a state term: ``(image, h, used, prior)``."""

    def forward(self, x, h, used, prior):
        return self.step(x, None, h, None, used, prior)


class MaplessFirstFocusStage(FocusStage):
    """The first focus step of a policy that reads the glance image but not the glance map:
    ``(image, glance image, h, used, prior)``."""

    def forward(self, x, small, h, used, prior):
        return self.step(x, small, h, None, used, prior)


def _focus_stage(small: bool, glance_map: bool, first: bool) -> type[FocusStage]:
    """The focus stage class for a payload layout (see :class:`GlanceStage`)."""
    if first and small:
        return FirstFocusStage if glance_map else MaplessFirstFocusStage
    return FocusStage if glance_map else MaplessFocusStage


def mark_used(used: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
    """``used`` with ``location`` marked (a one-hot written as a comparison, for ONNX)."""
    grid = torch.arange(used.shape[1], device=used.device)
    return used + (location[:, None] == grid[None, :]).to(used.dtype)


def full_resolution_backbone(config: GFNetConfig) -> nn.Sequential:
    """The backbone without exits: the same CNN on the whole full-resolution image, global
    average pooling and a linear classifier (what GFNet is compared with)."""
    return nn.Sequential(conv_encoder(config.in_channels, config.channels, config.strides),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(config.channels[-1], config.num_classes))
