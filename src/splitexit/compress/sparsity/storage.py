"""Storage of sparse models in ELLPACK form (safetensors): per sparse layer one
``(out, fan_in)`` index table (or a block pattern's input permutation) and the kept values."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import CorruptFileError, InputError
from .layers import SparseLayer, sparse_layers
from .surgery import create_sparse, set_submodule

__all__ = ["load_sparse", "save_sparse"]

_FORMAT = "splitexit-sparse-ell-v1"


def _index_dtype(n: int) -> torch.dtype:
    if n <= 256:
        return torch.uint8
    if n <= 32768:
        return torch.int16
    return torch.int32


def save_sparse(module: nn.Module, path: str | Path, values: str = "float32",
                metadata: Mapping[str, str] | None = None) -> int:
    """Save ``module``'s weights with its sparse layers in compact ELLPACK form.

    A sparse layer stores ``<name>.cols`` (``(out, fan_in)`` input indices, uint8 / int16 /
    int32 as the input size allows) and ``<name>.values`` (the kept weights or whole kernels);
    a block pattern stores ``<name>.perm`` (its input permutation, one index per input)
    instead of the table. Everything else is stored as usual. No mask and no zeros are
    written.

    Args:
        module: the model (with layers from :func:`sparsify`).
        path: the ``.safetensors`` file.
        values: ``"float32"``, ``"float16"`` or ``"int8"`` (symmetric, one scale per output
            unit, stored in ``<name>.scale``) for the kept weights.
        metadata: extra string metadata.

    Returns:
        Bytes written to disk.
    """
    if values not in ("float32", "float16", "int8"):
        raise InputError(f"values must be float32, float16 or int8, got {values!r}")
    layers = sparse_layers(module)
    tensors: dict[str, torch.Tensor] = {}
    layout = {}
    for name, layer in layers.items():
        fan_in = layer.fan_in
        out_units = layer.mask.shape[0]
        if not bool((layer.mask.sum(1) == fan_in).all()):
            raise InputError(f"layer {name!r} has an uneven fan-in; ELL storage needs fixed "
                             "fan-in masks from fixed_fan_mask")
        cols = layer.mask.nonzero()[:, 1].reshape(out_units, fan_in)
        kept = layer.weight.detach()[torch.arange(out_units)[:, None], cols]
        block = layer.block_groups()
        index = block[0] if block else cols  # block rows' columns (ascending) follow from perm
        tensors[f"{name}.perm" if block else f"{name}.cols"] = index.to(
            _index_dtype(layer.mask.shape[1])).contiguous()
        if values == "int8":
            scale = kept.abs().reshape(out_units, -1).amax(1).clamp_min(1e-12) / 127
            view = scale.view(-1, *([1] * (kept.dim() - 1)))
            tensors[f"{name}.values"] = (kept / view).round().clamp(-127, 127).to(torch.int8)
            tensors[f"{name}.scale"] = scale.float().contiguous()
        else:
            tensors[f"{name}.values"] = kept.to(getattr(torch, values)).contiguous()
        layout[name] = {"kind": type(layer).__name__, "shape": list(layer.weight.shape),
                        "fan_in": fan_in, "kernel": layer.kernel,
                        **({"groups": block[1]} if block else {})}
    skip = {f"{n}.{k}" for n in layers for k in ("weight", "mask")}
    for key, t in module.state_dict().items():
        if key not in skip:
            tensors[key] = t.detach().contiguous()
    meta = {"format": _FORMAT, "layers": json.dumps(layout), "values": values,
            **(dict(metadata) if metadata else {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Shared modules appear under several keys in state_dict; safetensors refuses aliases.
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=meta)
    return path.stat().st_size


def load_sparse(module: nn.Module, path: str | Path) -> nn.Module:
    """Load a :func:`save_sparse` file into ``module`` (same architecture), in place.

    Dense Linear/Conv layers that are sparse in the file are converted; the file's masks
    replace any existing ones. Returns ``module``.

    Raises:
        CorruptFileError: not a sparse checkpoint, or it does not fit the module.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no sparse checkpoint at {path}; write one with save_sparse")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({exc})") from exc
    if meta.get("format") != _FORMAT:
        raise CorruptFileError(f"{path} is not a splitexit sparse checkpoint "
                               f"(format {meta.get('format')!r})")
    layout = json.loads(meta["layers"])
    modules = dict(module.named_modules())
    for name, info in layout.items():
        layer = modules.get(name)
        if layer is None or not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise CorruptFileError(f"{path}: layer {name!r} is not a Linear/Conv layer of the "
                                   "module; load into the same architecture")
        if list(layer.weight.shape) != info["shape"]:
            raise CorruptFileError(f"{path}: layer {name!r} has shape {info['shape']} in the "
                                   f"file but {list(layer.weight.shape)} in the module")
        out_units, in_units = info["shape"][:2]
        try:
            if info.get("groups"):
                cols = _block_cols(tensors.pop(f"{name}.perm").long(), int(info["groups"]),
                                   out_units, in_units, path, name)
            else:
                cols = tensors.pop(f"{name}.cols").long()
            kept = tensors.pop(f"{name}.values")
            if f"{name}.scale" in tensors:
                scale = tensors.pop(f"{name}.scale")
                kept = kept.float() * scale.view(-1, *([1] * (kept.dim() - 1)))
        except KeyError as exc:
            raise CorruptFileError(f"{path}: missing tensor {exc} of layer {name!r}") from exc
        if tuple(cols.shape) != (out_units, info["fan_in"]) or int(cols.max()) >= in_units:
            raise CorruptFileError(f"{path}: index table of {name!r} does not fit its shape")
        mask = torch.zeros(out_units, in_units, dtype=torch.bool)
        rows = torch.arange(out_units)[:, None]
        mask[rows, cols] = True
        if int(mask.sum()) != out_units * info["fan_in"]:
            raise CorruptFileError(f"{path}: repeated indices in layer {name!r}")
        if not isinstance(layer, SparseLayer):
            layer = create_sparse(layer, mask)
            set_submodule(module, name, layer)
            modules = dict(module.named_modules())
        else:
            layer.mask.copy_(mask)
        with torch.no_grad():
            weight = torch.zeros_like(layer.weight)
            weight[rows, cols] = kept.to(weight.dtype)
            layer.weight.copy_(weight)
        layer.set_kernel(info.get("kernel", "dense"))
    missing, unexpected = _load_rest(module, tensors, set(layout))
    if missing or unexpected:
        raise CorruptFileError(f"{path} does not fit the module: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    return module


def _block_cols(perm: torch.Tensor, groups: int, out_units: int, in_units: int, path,
                name: str) -> torch.Tensor:
    """The ``(out, fan_in)`` column table of a block pattern from its input permutation."""
    if (groups < 2 or in_units % groups or out_units % groups or perm.shape != (in_units,)
            or not torch.equal(perm.sort().values, torch.arange(in_units))):
        raise CorruptFileError(f"{path}: the input permutation of {name!r} does not fit "
                               f"{groups} groups of a {out_units}x{in_units} layer")
    cols = perm.view(groups, -1).sort(1).values
    return cols.repeat_interleave(out_units // groups, 0)


def _load_rest(module: nn.Module, tensors: dict[str, torch.Tensor], sparse: set[str]
               ) -> tuple[list[str], list[str]]:
    own = module.state_dict()
    skip = {f"{n}.{k}" for n in sparse for k in ("weight", "mask")}
    missing = [k for k in own if k not in skip and k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    with torch.no_grad():
        for key, value in tensors.items():
            if key in own:
                if own[key].shape != value.shape:
                    return [], [f"{key} (shape {tuple(value.shape)})"]
                own[key].copy_(value)
    return missing, unexpected
