"""Reference backbones with sensible default exit cuts, in one registry.

Every model is a :class:`StagedModel` whose cuts sit where exits and splits make sense:
LeNet / B-LeNet (BranchyNet), ResNet-8 (MLPerf Tiny), a small MobileNet-style network, an
MLP, and a 1-D CNN for audio or sensor signals. ``create_multiexit`` adds exit heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError
from .heads import ModuleHead, create_head
from .multiexit import MultiExitModel
from .registry import Registry
from .stages import Stage, StagedModel, _unknown_cut

__all__ = ["create_model", "create_multiexit", "list_models", "register_model", "ZooEntry",
           "MODELS"]


@dataclass
class ZooEntry:
    """What a builder returns: the backbone, its default exit cuts and default head type.

    A dense model (per-pixel logits, e.g. segmentation) sets ``dense`` and gives the
    ``head_builder`` of its head types (``fn(kind, in_shape, num_classes, **kw)``)."""

    backbone: StagedModel
    default_exits: list[str]
    default_head: str = "conv"
    published_heads: dict[str, Callable[[], nn.Module]] = field(default_factory=dict)
    dense: bool = False
    head_builder: Callable[..., nn.Module] | None = None


#: zoo builders ``fn(num_classes, input_shape, **kw) -> ZooEntry``, by name
MODELS: Registry[Callable[..., ZooEntry]] = Registry("model")


def register_model(name: str):
    """Decorator registering a builder ``fn(num_classes, input_shape, **kw) -> ZooEntry``."""
    return MODELS.register(name)


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Registered model names matching a glob pattern, e.g. ``list_models('res*')``; with
    ``task`` (``"classification"``, ``"segmentation"``) only the models of that task (a
    builder's ``task`` attribute, classification by default)."""
    return [n for n in MODELS.list(pattern)
            if task is None or getattr(MODELS.get(n), "task", "classification") == task]


def _entry(name: str, num_classes: int, input_shape: Sequence[int], **kwargs) -> ZooEntry:
    entry = MODELS.create(name, num_classes=num_classes, input_shape=tuple(input_shape),
                          **kwargs)
    entry.backbone.spec = {"model": name, "num_classes": num_classes,
                           "input_shape": list(input_shape), "model_kwargs": kwargs}
    return entry


def create_model(name: str, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
                 **kwargs) -> StagedModel:
    """The backbone alone (the baseline a multi-exit model is compared with)."""
    return _entry(name, num_classes, input_shape, **kwargs).backbone


def create_multiexit(name: str, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
                     exits: Sequence[str] | None = None, head: str | None = None,
                     head_kwargs: dict | None = None, **kwargs) -> MultiExitModel:
    """A zoo backbone with exit heads at ``exits`` (its default cuts when ``None``).

    Args:
        head: head type for every exit (``"linear"``, ``"sdn"``, ``"conv"``, ``"depthwise"``,
            ``"published"`` for the paper's own branch where the model has one); the model's
            default when ``None``.
    """
    entry = _entry(name, num_classes, input_shape, **kwargs)
    backbone = entry.backbone
    exits = list(entry.default_exits if exits is None else exits)
    head = head or entry.default_head
    shapes = backbone.payload_shapes(torch.zeros(1, *input_shape))
    heads = {}
    for cut in exits:
        if not isinstance(cut, str):
            raise _unknown_cut(cut, backbone.cut_names)
        backbone.cut_index(cut)
        if head == "published":
            if cut not in entry.published_heads:
                raise InputError(f"{name} has no published head at {cut!r}; it has them at "
                                 f"{sorted(entry.published_heads)}")
            heads[cut] = ModuleHead(shapes[cut][0], num_classes, entry.published_heads[cut]())
        else:
            if len(shapes[cut]) != 1:
                raise InputError(f"cut {cut!r} carries {len(shapes[cut])} tensors; attach "
                                 "exit heads at single-tensor cuts")
            build = entry.head_builder or create_head
            heads[cut] = build(head, shapes[cut][0], num_classes, **(head_kwargs or {}))
    model = MultiExitModel(backbone, heads, input_shape=input_shape, dense=entry.dense)
    model.spec = {**backbone.spec, "exits": exits, "head": head,
                  "head_kwargs": head_kwargs or {}}
    return model


def _flat_size(module: nn.Module, shape: Sequence[int]) -> int:
    with torch.no_grad():
        return int(math.prod(module(torch.zeros(1, *shape)).shape[1:]))


def _staged(parts: list[tuple[str, nn.Module]]) -> StagedModel:
    """Stages from ``(cut_name_after_it, module)`` pairs; the last name is unused."""
    stages = [Stage(m, name) for name, m in parts]
    return StagedModel(stages, [name for name, _ in parts[:-1]])


# LeNet / B-LeNet ----------------------------------------------------------------------------
def _lenet(num_classes: int, input_shape: Sequence[int]) -> tuple[StagedModel, Callable]:
    c = input_shape[0]
    conv1 = nn.Conv2d(c, 5, 5, padding=3)
    block2 = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(),
                           nn.Conv2d(5, 10, 5, padding=3), nn.MaxPool2d(2, ceil_mode=True),
                           nn.ReLU())
    features = nn.Sequential(nn.Conv2d(10, 20, 5, padding=3), nn.MaxPool2d(2, ceil_mode=True),
                             nn.ReLU(), nn.Flatten())
    shape1 = (5, *(s + 2 for s in input_shape[1:]))
    shape2 = (10, *(_flat_shape(block2, shape1)))
    flat = _flat_size(features, shape2)
    classifier = nn.Sequential(features, nn.Linear(flat, 84), nn.ReLU(), nn.Linear(84, num_classes))
    backbone = _staged([("conv1", conv1), ("block2", block2), ("classifier", classifier)])

    def branch() -> nn.Module:
        # BranchyNet's B-LeNet branch: pool, relu, conv 5->10 3x3, pool, relu, linear.
        body = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(),
                             nn.Conv2d(5, 10, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                             nn.ReLU(), nn.Flatten())
        return nn.Sequential(body, nn.Linear(_flat_size(body, shape1), num_classes))

    return backbone, branch


def _flat_shape(module: nn.Module, shape: Sequence[int]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(module(torch.zeros(1, *shape)).shape[2:])


@register_model("lenet")
def lenet(num_classes: int = 10, input_shape=(1, 28, 28)) -> ZooEntry:
    """LeNet as in BranchyNet's code (5-10-20 channels, pad 3, ceil pooling)."""
    backbone, branch = _lenet(num_classes, input_shape)
    return ZooEntry(backbone, ["conv1"], "published", {"conv1": branch})


@register_model("b-lenet")
def b_lenet(num_classes: int = 10, input_shape=(1, 28, 28)) -> ZooEntry:
    """B-LeNet (BranchyNet): LeNet plus its published branch after the first convolution."""
    return lenet(num_classes, input_shape)


# ResNet-8 (MLPerf Tiny) ---------------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Conv2d(c_in, c_out, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """A plain ResNet as one ``nn.Module`` (cut it with ``StagedModel.from_module``)."""

    def __init__(self, num_classes: int, in_channels: int, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c, w, 1 if i == 0 else 2))
            c = w
        self.block1, self.block2, self.block3 = blocks
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


@register_model("resnet8")
def resnet8(num_classes: int = 10, input_shape=(1, 28, 28), widths=(16, 32, 64)) -> ZooEntry:
    """ResNet-8 of MLPerf Tiny (16/32/64 channels, three residual blocks)."""
    net = ResNet(num_classes, input_shape[0], tuple(widths))
    backbone = StagedModel.from_module(net, ["stem", "block1", "block2"])
    return ZooEntry(backbone, ["stem", "block1", "block2"], "depthwise")


# MobileNet-style ----------------------------------------------------------------------------
def _dw_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                         nn.BatchNorm2d(c_in), nn.ReLU(),
                         nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


@register_model("mobilenet")
def mobilenet(num_classes: int = 10, input_shape=(1, 28, 28), width: int = 16) -> ZooEntry:
    """A small MobileNetV1-style network: depthwise-separable blocks at three resolutions."""
    w = width
    parts = [
        ("stem", nn.Sequential(nn.Conv2d(input_shape[0], w, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(w), nn.ReLU(), _dw_block(w, 2 * w, 1))),
        ("block1", nn.Sequential(_dw_block(2 * w, 4 * w, 2), _dw_block(4 * w, 4 * w, 1))),
        ("block2", nn.Sequential(_dw_block(4 * w, 8 * w, 2), _dw_block(8 * w, 8 * w, 1))),
        ("classifier", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(8 * w, num_classes))),
    ]
    return ZooEntry(_staged(parts), ["block1", "block2"], "depthwise")


# MLP ----------------------------------------------------------------------------------------
@register_model("mlp")
def mlp(num_classes: int = 10, input_shape=(1, 28, 28), hidden=(256, 128, 64)) -> ZooEntry:
    """A fully connected network; cuts after every hidden layer."""
    sizes = [math.prod(input_shape), *hidden]
    parts = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers = [nn.Flatten()] if i == 0 else []
        parts.append((f"fc{i + 1}", nn.Sequential(*layers, nn.Linear(a, b), nn.ReLU())))
    parts.append(("out", nn.Linear(sizes[-1], num_classes)))
    return ZooEntry(_staged(parts), [f"fc{i + 1}" for i in range(len(hidden))], "linear")


# 1-D CNN for audio / sensor signals ---------------------------------------------------------
def _conv1d(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, 5, stride, 2, bias=False),
                         nn.BatchNorm1d(c_out), nn.ReLU())


@register_model("cnn1d")
def cnn1d(num_classes: int = 6, input_shape=(3, 128), width: int = 16) -> ZooEntry:
    """A 1-D CNN for (channels, length) signals: three strided conv blocks, pooling, linear."""
    c, w = input_shape[0], width
    parts = [
        ("block1", nn.Sequential(_conv1d(c, w, 1), _conv1d(w, w, 2))),
        ("block2", nn.Sequential(_conv1d(w, 2 * w, 1), _conv1d(2 * w, 2 * w, 2))),
        ("block3", nn.Sequential(_conv1d(2 * w, 4 * w, 1), _conv1d(4 * w, 4 * w, 2))),
        ("classifier", nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                                     nn.Linear(4 * w, num_classes))),
    ]
    return ZooEntry(_staged(parts), ["block1", "block2"], "conv")


from .segmentation import backbone as _segmentation  # noqa: E402,F401  (registers "segnet")
