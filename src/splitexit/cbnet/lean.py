"""A CBNet pipeline run lean: one flat chain of primitive layers, exact rewrites, and a
functional batch-1 forward.

A CBNet is a fixed chain (converter, then the light classifier), so nothing about it needs the
module tree it was trained in. :func:`lean_pipeline` flattens a pipeline (folded or not) into
its primitive layers and applies rewrites that change no output bit:

- a ``ReLU`` moves in front of a ``MaxPool2d``, ``Flatten`` or reshape before it
  (``relu(max(a, b)) == max(relu(a), relu(b))``; an element-wise map commutes with a reshape),
  so it follows the ``Linear`` / ``Conv2d`` that produced its input and ONNX Runtime fuses the
  two (``FusedGemm`` / ``FusedConv``);
- ``Unflatten`` becomes a reshape to a constant shape: the exporter writes one ``Reshape``
  instead of ``Shape``, two ``Slice``, ``Concat`` and ``Reshape``;
- ``Identity`` layers go.

:class:`LeanPipeline` exports to ONNX like any module. In PyTorch its inference forward calls
the functional operators in a precomputed order (no module dispatch per layer; ReLU in place
on tensors it made); with autograd on, it runs the same layers as modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..cost import count_macs
from ..errors import InputError
from ..heads import ModuleHead
from ..stages import Stage, StagedModel
from .converter import ConvertingAutoencoder, _check_images

__all__ = ["LEAN_LAYERS", "LeanPipeline", "Reshape", "lean_layers", "lean_pipeline"]


class Reshape(nn.Module):
    """``x.reshape(-1, *shape)``: a reshape to a constant per-sample shape (one ONNX node)."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


#: primitive layers a lean pipeline runs
LEAN_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Unflatten,
               nn.Identity, nn.Sigmoid, Reshape)
_RESHAPES = (nn.Flatten, Reshape)


def _primitives(module: nn.Module) -> list[nn.Module]:
    """The primitive layers of ``module`` in execution order."""
    if isinstance(module, LEAN_LAYERS):
        return [module]
    if isinstance(module, nn.Sequential):
        return [p for m in module for p in _primitives(m)]
    if isinstance(module, StagedModel):
        if any(s.num_inputs != 1 for s in module.stages):
            raise InputError("a lean pipeline needs stages that pass one tensor each; this "
                             "classifier has a multi-tensor cut")
        return [p for s in module.stages for p in _primitives(s)]
    if isinstance(module, (Stage, ModuleHead)):
        return _primitives(module.module)
    if isinstance(module, ConvertingAutoencoder):
        return _primitives(module.net)
    if hasattr(module, "converter") and hasattr(module, "classifier"):  # a CBNet pipeline
        return _primitives(module.converter) + _primitives(module.classifier)
    raise InputError(f"cannot run {type(module).__name__} lean: a lean pipeline is a chain of "
                     f"{', '.join(t.__name__ for t in LEAN_LAYERS)} (nn.Sequential, StagedModel "
                     "stages and CBNet pipelines of them)")


def lean_layers(module: nn.Module) -> list[nn.Module]:
    """The primitive layers of a chain with the exact rewrites of the module docstring applied
    (the layer objects are shared with ``module``, not copied).

    Raises:
        InputError: a layer that is not one of :data:`LEAN_LAYERS`, or an ``Unflatten`` /
            ``Flatten`` that does not keep the batch dimension first.
    """
    layers: list[nn.Module] = []
    for layer in _primitives(module):
        if isinstance(layer, nn.Identity):
            continue
        if isinstance(layer, nn.Unflatten):
            if layer.dim != 1:
                raise InputError(f"cannot run Unflatten(dim={layer.dim}) lean; only dim=1 "
                                 "(per-sample unflatten) is supported")
            layer = Reshape(layer.unflattened_size)
        elif isinstance(layer, nn.Flatten) and layer.start_dim != 1:
            raise InputError(f"cannot run Flatten(start_dim={layer.start_dim}) lean; only "
                             "start_dim=1 keeps the batch dimension")
        elif isinstance(layer, nn.ReLU):
            k = len(layers)
            while k > 0 and isinstance(layers[k - 1], (nn.MaxPool2d, *_RESHAPES)):
                k -= 1
            layers.insert(k, nn.ReLU())
            continue
        layers.append(layer)
    return layers


def _step(layer: nn.Module, fresh: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The functional call of one layer; ``fresh``: its input is a tensor the chain made."""
    if isinstance(layer, nn.Linear):
        return lambda x: F.linear(x, layer.weight, layer.bias)
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise InputError("a lean pipeline runs Conv2d with numeric zero padding only")
        return lambda x: F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding,
                                  layer.dilation, layer.groups)
    if isinstance(layer, nn.ConvTranspose2d):
        if layer.padding_mode != "zeros":
            raise InputError("a lean pipeline runs ConvTranspose2d with zero padding only")
        return lambda x: F.conv_transpose2d(x, layer.weight, layer.bias, layer.stride,
                                            layer.padding, layer.output_padding, layer.groups,
                                            layer.dilation)
    if isinstance(layer, nn.ReLU):
        return torch.relu_ if fresh else torch.relu
    if isinstance(layer, nn.MaxPool2d):
        return lambda x: F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding,
                                      layer.dilation, layer.ceil_mode)
    if isinstance(layer, nn.Flatten):
        return lambda x: x.flatten(1, layer.end_dim)
    if isinstance(layer, Reshape):
        return lambda x: x.reshape(-1, *layer.shape)
    if isinstance(layer, nn.Sigmoid):
        return torch.sigmoid
    raise InputError(f"no lean step for {type(layer).__name__}")


class LeanPipeline(nn.Module):
    """A CBNet pipeline as one flat chain of primitive layers (:func:`lean_pipeline`).

    Same logits as the pipeline it came from (bit for bit for the rewrites; a folded pipeline
    keeps its own float tolerance). Inputs are validated as :class:`CBNetPipeline` validates
    them (type, dtype, shape, finite, values in ``[0, 1]``) unless the module is being traced
    or exported.

    Attributes:
        net: the layers as an ``nn.Sequential`` (state dict, ONNX export, autograd).
    """

    def __init__(self, layers: Sequence[nn.Module], input_shape: Sequence[int],
                 num_classes: int, info: dict | None = None):
        super().__init__()
        self.net = nn.Sequential(*layers)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.info = dict(info or {})
        fresh = [False] + [not isinstance(m, _RESHAPES) for m in layers[:-1]]
        for i in range(1, len(fresh)):  # a reshape of a tensor the chain made is one too
            fresh[i] = fresh[i] or (isinstance(layers[i - 1], _RESHAPES) and fresh[i - 1])
        self._steps = [_step(m, f) for m, f in zip(layers, fresh)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, *input_shape)`` in ``[0, 1]``.

        Raises:
            InputError: wrong type, dtype or shape, non-finite values or values outside [0, 1].
        """
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self.net(x)
        _check_images(x, self.input_shape)
        if torch.is_grad_enabled():
            return self.net(x)
        for step in self._steps:
            x = step(x)
        return x

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class per image."""
        return self(x).argmax(dim=1)

    def macs(self) -> float:
        """Multiply-accumulates of one image through the chain."""
        return count_macs(lambda: self(torch.full((1, *self.input_shape), 0.5)))


def lean_pipeline(pipeline: nn.Module) -> LeanPipeline:
    """The lean form of a CBNet pipeline (:class:`CBNetPipeline` or :class:`FoldedPipeline`).

    The layers are shared with ``pipeline`` (no copy); the lean pipeline is in eval mode.

    Raises:
        InputError: a layer a lean pipeline cannot run (see :func:`lean_layers`), or a pipeline
            without ``input_shape`` / ``num_classes``.
    """
    shape = getattr(pipeline, "input_shape", None)
    classes = getattr(pipeline, "num_classes", None)
    if shape is None or classes is None:
        raise InputError(f"{type(pipeline).__name__} is not a CBNet pipeline (no input_shape / "
                         "num_classes); build one with CBNetPipeline or fold_pipeline")
    layers = lean_layers(pipeline)
    info = {**getattr(pipeline, "info", {}), "lean": True}
    lean = LeanPipeline(layers, shape, classes, info).eval()
    probe = torch.full((1, *shape), 0.5)
    with torch.no_grad():
        out = lean(probe)
    if tuple(out.shape) != (1, classes):
        raise InputError(f"the lean chain gives {tuple(out.shape)} logits, not (1, {classes})")
    return lean
