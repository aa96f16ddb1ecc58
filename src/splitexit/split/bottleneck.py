"""Bottleneck injection at a cut (BottleFit): a small encoder on the device, a decoder on the server.

The encoder shrinks the cut's feature map to ``C`` channels (and optionally a lower resolution)
so few bytes cross the link; the decoder restores the shape the rest of the network expects.
:func:`inject_bottleneck` returns a :class:`BottleneckedModel`: a copy of the model with two new
stages after the cut, and a new cut between them (``"<cut>/bottleneck"``) to split at. Training
lives in :mod:`splitexit.training.bottlefit`; quantising what is sent is the codec's job
(:func:`splitexit.split.halves.split_model` with ``codec=``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..stages import Stage, StagedModel, payload_tensors

__all__ = ["BottleneckSpec", "BottleneckEncoder", "BottleneckDecoder", "BottleneckedModel",
           "RoundSTE", "Gain", "FactorizedPrior", "EntropyBottleneckedModel", "inject_entropy_bottleneck",
           "freeze_tables",
           "inject_bottleneck", "bottleneck_cut_name", "decoded_cut_name", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode, then restore every submodule's own mode.

    ``model.train(flag)`` would overwrite the modes of all submodules, e.g. switch the shared,
    eval-mode stages of a trained model back to training mode when a new wrapper is built
    around them.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def bottleneck_cut_name(cut: str) -> str:
    """Name of the cut between encoder and decoder (where the device sends its payload)."""
    return f"{cut}/bottleneck"


def decoded_cut_name(cut: str) -> str:
    """Name of the cut after the decoder (features that mimic the original ones at ``cut``)."""
    return f"{cut}/decoded"


@dataclass(frozen=True)
class BottleneckSpec:
    """Shape of a bottleneck.

    Attributes:
        channels: Channels ``C`` of the transmitted tensor (BottleFit uses 1..12).
        stride: Spatial reduction factor, a power of two (1 keeps the resolution, 4 turns
            28x28 into 7x7). Each factor 2 is one stride-2 convolution in the encoder and one
            stride-2 transposed convolution in the decoder.
        hidden: Width of the encoder's inner layers (device side: keep it small to keep the
            device half small); None uses the cut's channel count.
        decoder_hidden: Width of the decoder's inner layers (server side); None uses the
            cut's channel count.
    """

    channels: int = 2
    stride: int = 1
    hidden: int | None = None
    decoder_hidden: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) \
                or self.channels < 1:
            raise InputError(f"bottleneck channels must be an int >= 1, got {self.channels!r}")
        s = self.stride
        if isinstance(s, bool) or not isinstance(s, int) or s < 1 or s & (s - 1):
            raise InputError(f"bottleneck stride must be a power of two (1, 2, 4, 8 ...), "
                             f"got {s!r}")
        for name in ("hidden", "decoder_hidden"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise InputError(f"bottleneck {name} width must be None or an int >= 1, "
                                 f"got {value!r}")

    @property
    def halvings(self) -> int:
        """Number of stride-2 layers (log2 of the stride)."""
        return self.stride.bit_length() - 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy of the fields."""
        return asdict(self)


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class BottleneckEncoder(nn.Module):
    """Device side: ``halvings`` x (stride-2 conv, BN, ReLU), then a 3x3 conv to ``C`` channels.

    The output is unbounded (no activation), so the codec's int8/int4 quantiser sees a range
    fitted to the data.
    """

    def __init__(self, in_channels: int, spec: BottleneckSpec):
        super().__init__()
        hidden = spec.hidden or in_channels
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(spec.halvings):
            layers += _conv_bn_relu(c, hidden, 2)
            c = hidden
        layers.append(nn.Conv2d(c, spec.channels, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BottleneckDecoder(nn.Module):
    """Server side: 3x3 conv from ``C`` channels, ``halvings`` x (stride-2 transposed conv, BN,
    ReLU), resize to the exact original size if the halvings rounded it, 3x3 conv to the
    original channels, ReLU when the original features are non-negative."""

    def __init__(self, spec: BottleneckSpec, out_channels: int, out_size: tuple[int, int],
                 nonnegative: bool):
        super().__init__()
        hidden = spec.decoder_hidden or out_channels
        layers: list[nn.Module] = _conv_bn_relu(spec.channels, hidden, 1)
        size = list(out_size)
        for _ in range(spec.halvings):
            size = [(s + 1) // 2 for s in size]
        for _ in range(spec.halvings):
            layers += [nn.ConvTranspose2d(hidden, hidden, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(hidden), nn.ReLU()]
            size = [2 * s for s in size]
        if tuple(size) != tuple(out_size):
            layers.append(nn.Upsample(size=tuple(out_size), mode="nearest"))
        layers.append(nn.Conv2d(hidden, out_channels, 3, 1, 1))
        if nonnegative:
            layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


class BottleneckedModel(StagedModel):
    """A StagedModel with an encoder and a decoder stage injected after ``source_cut``.

    Cut names: the original ones before the injection, then ``source_cut`` (original features,
    before the encoder), ``"<source_cut>/bottleneck"`` (encoder output: what the device sends),
    ``"<source_cut>/decoded"`` (decoder output), then the original later cuts.

    Attributes:
        source_cut: The cut of the original model where the bottleneck sits.
        bottleneck_spec: Its :class:`BottleneckSpec`.
    """

    def __init__(self, stages: list[nn.Module], cut_names: list[str], source_cut: str,
                 bottleneck_spec: BottleneckSpec):
        super().__init__(stages, cut_names)
        self.source_cut = source_cut
        self.bottleneck_spec = bottleneck_spec

    @property
    def bottleneck_cut(self) -> str:
        """The cut to split at: between encoder and decoder."""
        return bottleneck_cut_name(self.source_cut)

    @property
    def encoder_index(self) -> int:
        """Index of the encoder stage."""
        return self.cut_index(self.source_cut) + 1

    @property
    def encoder(self) -> BottleneckEncoder:
        """The encoder module (device side)."""
        return self.stages[self.encoder_index].module

    @property
    def decoder(self) -> BottleneckDecoder:
        """The decoder module (server side)."""
        return self.stages[self.encoder_index + 1].module

    def teacher_cut(self, cut: str) -> str | None:
        """The original model's cut whose features the output at ``cut`` should mimic.

        ``"<source>/decoded"`` maps to ``source``; original cuts map to themselves; the
        bottleneck cut has no counterpart (None).
        """
        self.cut_index(cut)
        if cut == self.bottleneck_cut:
            return None
        if cut == decoded_cut_name(self.source_cut):
            return self.source_cut
        return cut


def inject_bottleneck(model: StagedModel, cut: str, spec: BottleneckSpec,
                      example: torch.Tensor) -> BottleneckedModel:
    """A copy of ``model`` with a bottleneck encoder and decoder injected after ``cut``.

    The original model is left untouched (its stages are deep-copied), so it can serve as the
    teacher in BottleFit training. The new encoder/decoder are freshly initialised.

    Args:
        model: The staged model (e.g. ``zoo.create_model("resnet8")``), usually trained.
        cut: A cut of ``model`` whose payload is one 4-D tensor (N, C, H, W).
        spec: Channels, stride and hidden width of the bottleneck.
        example: An input batch, to read the payload's shape and sign at the cut.

    Returns:
        A :class:`BottleneckedModel` in eval mode; split it at ``.bottleneck_cut``.

    Raises:
        CutError: ``cut`` is not a cut of ``model`` (the message lists the valid ones).
        InputError: The payload at ``cut`` is a tuple or not 4-D, or the stride does not fit
            its resolution.

    Example:
        >>> student = inject_bottleneck(resnet, "block1", BottleneckSpec(2, stride=4), x[:8])
        >>> device, server = student.split(student.bottleneck_cut)
    """
    if not isinstance(model, StagedModel):
        raise InputError(f"inject_bottleneck needs a StagedModel, got {type(model).__name__}; "
                         "build one with StagedModel.from_module(module, cuts)")
    if not isinstance(spec, BottleneckSpec):
        raise InputError(f"spec must be a BottleneckSpec, got {type(spec).__name__}")
    index = model.cut_index(cut)
    if isinstance(cut, int):
        cut = model.cut_names[index]
    with eval_mode(model), torch.no_grad():
        payload = model.run(example, 0, index + 1)
    tensors = payload_tensors(payload)
    if len(tensors) != 1 or tensors[0].dim() != 4:
        shapes = [tuple(t.shape) for t in tensors]
        raise InputError(
            f"a bottleneck needs one 4-D tensor (N, C, H, W) at the cut; cut {cut!r} carries "
            f"{shapes}. Choose a cut between blocks (cuts of this model: {model.cut_names})"
        )
    features = tensors[0]
    _, channels, height, width = features.shape
    if spec.stride > min(height, width):
        raise InputError(f"bottleneck stride {spec.stride} is larger than the {height}x{width} "
                         f"feature map at cut {cut!r}; use a stride <= {min(height, width)}")
    encoder = BottleneckEncoder(channels, spec)
    decoder = BottleneckDecoder(spec, channels, (height, width),
                                nonnegative=bool((features >= 0).all()))
    stages = copy.deepcopy(list(model.stages))
    new_stages = [*stages[: index + 1],
                  Stage(encoder, f"{cut}/encoder"), Stage(decoder, f"{cut}/decoder"),
                  *stages[index + 1:]]
    names = [*model.cut_names[: index + 1], bottleneck_cut_name(cut), decoded_cut_name(cut),
             *model.cut_names[index + 1:]]
    out = BottleneckedModel(new_stages, names, cut, spec)
    return out.eval()


# ---------------------------------------------------------------------------------------------
# Learned entropy bottleneck (supervised compression, "Entropic Student")
# ---------------------------------------------------------------------------------------------

class RoundSTE(nn.Module):
    """Rounds to integers (half to even, as the entropy codec); identity gradient in training.

    It is the first layer of an entropy bottleneck's decoder stage, so the server side sees
    exactly what :class:`~splitexit.split.entropy.EntropyCodec` decodes, whether the float
    latent arrives through that codec or through any other (e.g. ``fp32``).
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + (torch.round(z) - z).detach()


class Gain(nn.Module):
    """Multiplies by a fixed factor: the entropy bottleneck's encoder output is scaled so that
    its freshly initialised latent (std ~0.05) spans several integers instead of rounding to 0
    everywhere; the encoder then learns the resolution it needs against the rate term."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = float(gain)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.gain


class FactorizedPrior(nn.Module):
    """A factorized prior over an integer latent: one distribution per element (C, H, W).

    Each element's density is a mixture of ``components`` logistics; the probability of an
    integer ``k`` is the mass of ``[k - 1/2, k + 1/2]`` (Ballé et al.'s discretisation), and a
    uniformly noised latent ``y + u`` gets the same expression as its relaxed likelihood.
    """

    def __init__(self, shape: tuple[int, int, int], components: int = 3):
        super().__init__()
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"prior shape must be (C, H, W), got {shape!r}")
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise InputError(f"components must be an int >= 1, got {components!r}")
        self.shape = tuple(int(s) for s in shape)
        k = components
        self.logits = nn.Parameter(torch.zeros(*self.shape, k))
        self.means = nn.Parameter(torch.linspace(-1.0, 1.0, k).expand(*self.shape, k).clone()
                                  if k > 1 else torch.zeros(*self.shape, 1))
        self.log_scales = nn.Parameter(torch.zeros(*self.shape, k))

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """Probability of the unit interval around each element of ``y`` (N, C, H, W)."""
        v = y.unsqueeze(-1)
        inv = torch.exp(-self.log_scales)
        upper = torch.sigmoid((v + 0.5 - self.means) * inv)
        lower = torch.sigmoid((v - 0.5 - self.means) * inv)
        w = torch.softmax(self.logits, -1)
        return ((upper - lower) * w).sum(-1).clamp_min(1e-9)

    def bits(self, y: torch.Tensor) -> torch.Tensor:
        """Code length in bits of each sample of ``y`` (N,)."""
        return -torch.log2(self.likelihood(y)).flatten(1).sum(1)

    @torch.no_grad()
    def pmf(self, lo: int, hi: int) -> torch.Tensor:
        """float64 ``(C*H*W, hi - lo + 1)``: mass of each integer; the tails are folded into
        the end symbols (the codec clamps values beyond them)."""
        ks = torch.arange(lo, hi + 1, dtype=torch.float64)
        edges = torch.cat([ks - 0.5, ks[-1:] + 0.5])
        means = self.means.double().reshape(-1, 1, self.means.shape[-1])
        inv = torch.exp(-self.log_scales.double()).reshape(-1, 1, self.means.shape[-1])
        cdf = torch.sigmoid((edges.reshape(1, -1, 1) - means) * inv)
        w = torch.softmax(self.logits.double(), -1).reshape(-1, 1, self.means.shape[-1])
        cdf = (cdf * w).sum(-1)  # (E, S + 1)
        cdf[:, 0] = 0.0
        cdf[:, -1] = 1.0
        return (cdf[:, 1:] - cdf[:, :-1]).clamp_min(0.0)

    @torch.no_grad()
    def support(self, tail: float = 1e-6, limit: int = 64) -> tuple[int, int]:
        """Smallest integer range holding all but ``tail`` of every element's mass (capped
        at ``limit`` symbols around the medians)."""
        lo, hi = -limit, limit
        p = self.pmf(lo, hi)
        c = p.cumsum(1)
        first = int((c > tail).float().argmax(1).min())
        last = int((c < 1 - tail).float().sum(1).max())
        first, last = lo + first, lo + min(last, p.shape[1] - 1)
        if last - first + 1 > limit:  # keep the densest ``limit`` symbols
            centre = int(torch.round((self.means * torch.softmax(self.logits, -1)).sum(-1)
                                     .median()))
            first, last = centre - limit // 2, centre - limit // 2 + limit - 1
        return first, max(last, first + 1)


class EntropyBottleneckedModel(BottleneckedModel):
    """A :class:`BottleneckedModel` whose bottleneck latent is integer and entropy-coded.

    The encoder's output (the payload at ``bottleneck_cut``) is a float latent; the decoder
    stage starts with :class:`RoundSTE`, and :attr:`prior` models the integers. Freeze the
    prior with :func:`freeze_tables` and split with ``codec=EntropyCodec(tables)``.
    """

    def __init__(self, stages: list[nn.Module], cut_names: list[str], source_cut: str,
                 bottleneck_spec: BottleneckSpec, prior: FactorizedPrior):
        super().__init__(stages, cut_names, source_cut, bottleneck_spec)
        self.prior = prior

    @property
    def encoder(self) -> BottleneckEncoder:
        return self.stages[self.encoder_index].module[0]

    @property
    def decoder(self) -> BottleneckDecoder:
        return self.stages[self.encoder_index + 1].module[1]


def inject_entropy_bottleneck(model: StagedModel, cut: str, spec: BottleneckSpec,
                              example: torch.Tensor, components: int = 3, gain: float = 16.0
                              ) -> EntropyBottleneckedModel:
    """Like :func:`inject_bottleneck`, with an integer latent and a :class:`FactorizedPrior`.

    Train it with :func:`splitexit.training.entropy.entropic_student`; split it with
    ``split_model(model, codec=EntropyCodec(freeze_tables(model)))``.
    """
    base = inject_bottleneck(model, cut, spec, example)
    stages = list(base.stages)
    e = base.encoder_index
    if not gain > 0:
        raise InputError(f"gain must be > 0, got {gain!r}")
    stages[e] = Stage(nn.Sequential(base.stages[e].module, Gain(gain)),
                      f"{base.source_cut}/encoder")
    stages[e + 1] = Stage(nn.Sequential(RoundSTE(), base.stages[e + 1].module),
                          f"{base.source_cut}/decoder")
    with torch.no_grad():
        z = StagedModel(stages[: e + 1]).eval()(example[:2])
    prior = FactorizedPrior(tuple(z.shape[1:]), components)
    out = EntropyBottleneckedModel(stages, list(base.cut_names), base.source_cut, spec, prior)
    return out.eval()


def freeze_tables(model: EntropyBottleneckedModel, precision: int = 16, tail: float = 1e-6,
                  limit: int = 64):
    """The model's prior as integer :class:`~splitexit.split.entropy.EntropyTables`."""
    from .entropy import tables_from_pmf

    if not isinstance(model, EntropyBottleneckedModel):
        raise InputError(f"freeze_tables needs an EntropyBottleneckedModel, got "
                         f"{type(model).__name__}")
    lo, hi = model.prior.support(tail, limit)
    pmf = model.prior.pmf(lo, hi).numpy()
    return tables_from_pmf(pmf, model.prior.shape, lo, precision)
