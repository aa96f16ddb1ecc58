"""Model surgery: give a model's Linear and Conv layers predefined sparse connectivity in place
(:func:`sparsify`), and keep pruned weights at zero (:func:`apply_masks_`)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ...errors import InputError
from .layers import SparseConv1d, SparseConv2d, SparseLinear, sparse_layers
from .masks import PATTERNS, block_structure, fixed_fan_mask

__all__ = ["apply_masks_", "create_sparse", "set_submodule", "sparsify"]


def create_sparse(layer: nn.Module, mask: torch.Tensor, rescale: bool = False) -> nn.Module:
    """The sparse twin of a Linear / Conv layer with ``mask``: same shape, dtype, mode and
    (masked) weights; ``rescale`` scales the kept weights by ``sqrt(in / fan_in)``."""
    if isinstance(layer, nn.Linear):
        new = SparseLinear(layer.in_features, layer.out_features, mask, layer.bias is not None)
    else:
        cls = SparseConv2d if isinstance(layer, nn.Conv2d) else SparseConv1d
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                  layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                  layer.padding_mode, mask=mask)
    new.to(layer.weight.dtype)
    with torch.no_grad():
        # PyTorch's default init scales weights by 1/sqrt(fan-in); with fewer inputs per unit
        # the kept weights are scaled up by sqrt(in / fan-in) so activations keep their size.
        gain = math.sqrt(mask.shape[1] / max(1, int(mask[0].sum()))) if rescale else 1.0
        new.weight.copy_(layer.weight * new._mask_full() * gain)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    new.train(layer.training)
    return new


def _candidates(module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules()
            if name and type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d)
            and getattr(m, "groups", 1) == 1}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted, as in ``named_modules()``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
    # Shared instances (e.g. a stage reused by a device half) point at the same parent,
    # so replacing the attribute there updates every view of the model.


def _units(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    return layer.out_channels, layer.in_channels


def sparsify(module: nn.Module, density: float | Mapping[str, float],
             exclude: Sequence[str] = (), seed: int = 0, rescale_init: bool = True,
             pattern: str = "cyclic") -> dict[str, dict]:
    """Give the Linear and Conv layers of ``module`` predefined sparse connectivity, in place.

    Call it before training. Works on any module: a whole :class:`MultiExitModel`, a zoo
    :class:`StagedModel`, a device or server half, or one exit head. Depthwise and grouped
    convolutions are left as they are.

    Args:
        module: the module whose layers are converted.
        density: one density for every layer, or ``{layer_name_or_glob: density}`` (only
            matching layers are converted; names as in ``module.named_modules()``).
        exclude: layer names or glob patterns to keep dense (e.g. the first layer).
        seed: base seed of the connectivity patterns (each layer gets its own).
        rescale_init: scale the kept weights by ``sqrt(in / fan_in)``, the init a layer with
            that fan-in would get (for an untrained model; pass ``False`` to keep trained
            weights as they are).
        pattern: ``"cyclic"``, ``"block"`` or ``"auto"`` (block where a layer's shape allows
            it, cyclic elsewhere); see :func:`fixed_fan_mask`.

    Returns:
        ``{layer_name: {"shape", "fan_in", "fan_out_min", "fan_out_max", "density",
        "pattern"}}``.

    Raises:
        InputError: a density some layer's shape cannot meet (the message names the layer),
            or a pattern in ``density`` that matches no layer.
    """
    if pattern not in PATTERNS:
        raise InputError(f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    layers = _candidates(module)
    if isinstance(density, Mapping):
        for glob in density:
            if not any(fnmatch.fnmatchcase(n, glob) for n in layers):
                raise InputError(f"{glob!r} matches no Linear/Conv layer; layers: "
                                 f"{', '.join(layers)}")
    summary = {}
    for i, (name, layer) in enumerate(layers.items()):
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if isinstance(density, Mapping):
            matches = [d for p, d in density.items() if fnmatch.fnmatchcase(name, p)]
            if not matches:
                continue
            d = matches[0]
        else:
            d = float(density)
        out_units, in_units = _units(layer)
        try:
            mask = fixed_fan_mask(out_units, in_units, density=d, seed=seed + 7919 * i,
                                  pattern=pattern)
        except InputError as exc:
            raise InputError(f"layer {name!r} ({type(layer).__name__} {in_units}->"
                             f"{out_units}): {exc}; or keep it dense with exclude=[{name!r}]"
                             ) from exc
        set_submodule(module, name, create_sparse(layer, mask, rescale_init))
        fan_out = mask.sum(0)
        summary[name] = {"shape": [out_units, in_units], "fan_in": int(mask[0].sum()),
                         "fan_out_min": int(fan_out.min()), "fan_out_max": int(fan_out.max()),
                         "density": int(mask.sum()) / mask.numel(),
                         "pattern": "block" if block_structure(mask) else "cyclic"}
    return summary


@torch.no_grad()
def apply_masks_(module: nn.Module) -> None:
    """Zero the stored weights of pruned connections (e.g. after editing weights by hand)."""
    for layer in sparse_layers(module).values():
        layer.weight.mul_(layer._mask_full())
