"""Binary layers: sign weights and sign activations trained with a straight-through estimator.

Binarised networks (XNOR-Net / BNN style) replace multiplications by sign flips; the weights are
scaled per output channel by their mean absolute value so the layer keeps its dynamic range.
:func:`binarize` turns the convolutions and linear layers of a backbone into binary ones
(keeping the first and last full precision, as is usual), so exits can sit on a binary
backbone as well as binary heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

__all__ = ["sign_ste", "BinaryLinear", "BinaryConv1d", "BinaryConv2d", "binarize",
           "count_binary_layers"]


class _SignSTE(torch.autograd.Function):
    """sign(x) in {-1, +1}; the gradient passes where |x| <= 1 (hardtanh's derivative)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binarise ``x`` to +-1 with a straight-through gradient (zero where ``|x| > 1``)."""
    return _SignSTE.apply(x)


def _binary_weight(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().flatten(1).mean(1).view(-1, *([1] * (weight.dim() - 1)))
    return sign_ste(weight) * scale.detach()


class _Binary:
    """Shared forward of the binary layers: normalise the input, binarise it and the weights.

    Inputs are batch-normalised before the sign (``prenorm``), as binary networks do: after a
    ReLU every activation is >= 0 and its sign alone would carry no information.
    """

    def _setup(self, features: int, dims: int, prenorm: bool) -> None:
        norm = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
        self.input_norm = norm(features) if prenorm else nn.Identity()

    def _binary_input(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(self.input_norm(x))


class BinaryLinear(_Binary, nn.Linear):
    """``nn.Linear`` with sign weights (scaled per output) and sign inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 prenorm: bool = True):
        super().__init__(in_features, out_features, bias)
        self._setup(in_features, 0, prenorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._binary_input(x), _binary_weight(self.weight), self.bias)


class BinaryConv1d(_Binary, nn.Conv1d):
    """``nn.Conv1d`` with sign weights (scaled per output channel) and sign inputs."""

    def __init__(self, *args, prenorm: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(self.in_channels, 1, prenorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._binary_input(x), _binary_weight(self.weight), self.bias)


class BinaryConv2d(_Binary, nn.Conv2d):
    """``nn.Conv2d`` with sign weights (scaled per output channel) and sign inputs."""

    def __init__(self, *args, prenorm: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(self.in_channels, 2, prenorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._binary_input(x), _binary_weight(self.weight), self.bias)


_BINARY = {nn.Linear: BinaryLinear, nn.Conv1d: BinaryConv1d, nn.Conv2d: BinaryConv2d}


def _replace(layer: nn.Module) -> nn.Module:
    cls = _BINARY[type(layer)]
    if isinstance(layer, nn.Linear):
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        if layer.padding_mode != "zeros":
            raise InputError(f"cannot binarise a convolution with padding_mode="
                             f"{layer.padding_mode!r}; use zero padding")
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                  layer.padding, layer.dilation, layer.groups, layer.bias is not None)
    new.load_state_dict(layer.state_dict(), strict=False)
    return new


def binarize(module: nn.Module, keep_first: bool = True, keep_last: bool = True) -> nn.Module:
    """Replace every ``Linear``/``Conv1d``/``Conv2d`` in ``module`` by its binary version, in place.

    Args:
        module: any module (a :class:`StagedModel`, a :class:`MultiExitModel`'s backbone ...).
        keep_first: keep the first such layer (it sees the raw input) full precision.
        keep_last: keep the last such layer (the classifier) full precision.

    Returns:
        ``module`` itself, for chaining.

    Raises:
        InputError: the module has no layer to binarise.
    """
    names = [n for n, m in module.named_modules() if type(m) in _BINARY]
    if not names:
        raise InputError("binarize found no Linear/Conv1d/Conv2d layer to replace")
    chosen = names[1 if keep_first else 0: len(names) - 1 if keep_last else len(names)]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, _replace(getattr(parent, child)))
    return module


def count_binary_layers(module: nn.Module) -> int:
    """How many binary layers ``module`` holds."""
    return sum(isinstance(m, (BinaryLinear, BinaryConv1d, BinaryConv2d)) for m in module.modules())
