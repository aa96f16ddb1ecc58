"""Predefined sparsity: connectivity fixed before training, stored and run sparse for real.

Every output unit gets the same fan-in and every input unit a fan-out as equal as the shape
allows (exactly equal when ``out * fan_in`` is a multiple of ``in``); for convolutions the
pattern is over (output channel, input channel) pairs and keeps whole kernels. The pattern is
chosen once, before training, as a randomly permuted cyclic ("clash-free") pattern, and kept
by reparametrisation: layers compute with ``weight * mask``, so no optimiser step can grow a
pruned connection, and the stored weights of pruned connections stay exactly zero.

Two patterns (``pattern=``):

- ``"cyclic"`` (default): a randomly permuted cyclic pattern, as in the published work; any
  density the shape allows.
- ``"block"``: inputs randomly permuted, then cut into ``g = 1 / density`` equal groups, and
  the outputs into ``g`` contiguous groups; output group ``j`` sees input group ``j`` only.
  Fan-in and fan-out are exactly fixed, as the published patterns require, and the next
  layer's own input permutation mixes the groups. Its point is speed: the layer runs as one
  gather plus ``g`` dense products (a batched matmul, or a grouped convolution), with
  ``1 / g`` of the dense work and none of a sparse format's indexing. It needs ``g`` to
  divide both the input and the output count.

Because the fan-in is fixed, the weights are stored in ELLPACK form, with no row pointers:
one ``(out, fan_in)`` table of input indices in the smallest integer type that fits plus the
values (:func:`save_sparse`); a block pattern stores only its input permutation instead of
the table. At inference a layer runs the dense kernel on its masked weight, a CSR sparse
kernel (``torch.sparse``) or, for block patterns, the grouped kernel; :func:`choose_kernels`
times them on the layer's real input and keeps the fastest, per layer.
"""

from __future__ import annotations

import fnmatch
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..cost import count_macs
from ..errors import CorruptFileError, InputError

__all__ = ["PATTERNS", "fixed_fan_mask", "SparseLinear", "SparseConv1d", "SparseConv2d", "sparsify",
           "sparse_layers", "apply_masks_", "choose_kernels", "effective_macs", "save_sparse",
           "load_sparse", "dense_weight_bytes", "KERNELS"]

KERNELS = ("dense", "csr", "grouped")
PATTERNS = ("cyclic", "block", "auto")
_FORMAT = "splitexit-sparse-ell-v1"


def fixed_fan_mask(out_units: int, in_units: int, density: float | None = None,
                   fan_in: int | None = None, seed: int = 0, pattern: str = "cyclic"
                   ) -> torch.Tensor:
    """A ``(out_units, in_units)`` connectivity mask with fixed fan-in and balanced fan-out.

    Every row has exactly ``fan_in`` ones; every column has ``floor`` or ``ceil`` of
    ``out_units * fan_in / in_units`` ones (all equal when that is an integer).

    Args:
        out_units: output units (rows).
        in_units: input units (columns).
        density: fraction of connections kept; ``fan_in = round(density * in_units)``.
        fan_in: connections per output unit (instead of ``density``).
        seed: seed of the random permutations of inputs and outputs.
        pattern: ``"cyclic"``, ``"block"`` (see the module docstring) or ``"auto"`` (block
            where the shape allows it, else cyclic).

    Raises:
        InputError: neither or both of ``density`` / ``fan_in``, a density the shape
            cannot meet (no input per output unit, or some input unit left unconnected), or
            a block pattern whose group count does not divide the layer's shape.
    """
    if pattern not in PATTERNS:
        raise InputError(f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    if (density is None) == (fan_in is None):
        raise InputError("give exactly one of density= or fan_in=")
    if out_units < 1 or in_units < 1:
        raise InputError(f"a layer needs at least one input and output unit, got "
                         f"{out_units}x{in_units}")
    if density is not None:
        if not 0 < density <= 1:
            raise InputError(f"density must be in (0, 1], got {density}")
        fan_in = round(density * in_units)
        if fan_in < 1:
            raise InputError(
                f"density {density} keeps no connection per output unit of a layer with "
                f"{in_units} inputs (fan-in rounds to 0); use density >= {0.5 / in_units:.4g}")
    fan_in = int(fan_in)
    if not 1 <= fan_in <= in_units:
        raise InputError(f"fan-in must be in 1..{in_units}, got {fan_in}")
    if out_units * fan_in < in_units:
        need = math.ceil(in_units / out_units)
        raise InputError(
            f"a {out_units}x{in_units} layer with fan-in {fan_in} leaves "
            f"{in_units - out_units * fan_in} input units unconnected (every input needs "
            f"fan-out >= 1); use fan-in >= {need} (density >= {need / in_units:.4g})")
    g = torch.Generator().manual_seed(seed)
    perm_in = torch.randperm(in_units, generator=g)
    if pattern != "cyclic":
        groups = in_units // fan_in
        if in_units % fan_in == 0 and out_units % groups == 0:
            k, o = fan_in, out_units // groups
            mask = torch.zeros(out_units, in_units, dtype=torch.bool)
            rows = torch.arange(out_units)[:, None]
            mask[rows, perm_in.view(groups, k).repeat_interleave(o, 0)] = True
            return mask
        if pattern == "block":
            options = [f"{1 / d:.4g} (fan-in {in_units // d})" for d in range(1, in_units + 1)
                       if in_units % d == 0 and out_units % d == 0][1:6]
            raise InputError(
                f"a block pattern splits a {out_units}x{in_units} layer into 1/density equal "
                f"groups of inputs and outputs; fan-in {fan_in} makes "
                f"{in_units / fan_in:.4g} groups, which does not divide both. Densities that "
                f"work: {', '.join(options) or 'none below 1'}; or use pattern='cyclic'")
    perm_out = torch.randperm(out_units, generator=g)
    # Row r takes the fan_in consecutive positions r*fan_in ... (mod in): all distinct within
    # a row, and every input is visited floor or ceil(out*fan_in/in) times in total.
    positions = (torch.arange(out_units)[:, None] * fan_in + torch.arange(fan_in)) % in_units
    mask = torch.zeros(out_units, in_units, dtype=torch.bool)
    mask[perm_out[:, None], perm_in[positions]] = True
    return mask


class _SparseMixin:
    """Masked weight, kernel choice and inference caches shared by the sparse layers."""

    mask: torch.Tensor
    weight: nn.Parameter
    kernel: str

    def _init_sparse(self, mask: torch.Tensor) -> None:
        self.register_buffer("mask", mask.to(torch.bool))
        self.kernel = "dense"
        self._cache: tuple | None = None
        with torch.no_grad():
            self.weight.mul_(self._mask_full())

    def _mask_full(self) -> torch.Tensor:
        return self.mask.view(*self.mask.shape, *([1] * (self.weight.dim() - 2)))

    @property
    def fan_in(self) -> int:
        return int(self.mask[0].sum())

    @property
    def density(self) -> float:
        return int(self.mask.sum()) / self.mask.numel()

    @property
    def nnz(self) -> int:
        """Weights kept (whole kernels for convolutions)."""
        return int(self.mask.sum()) * math.prod(self.weight.shape[2:])

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self._mask_full()

    def set_kernel(self, kernel: str) -> None:
        """Select ``"dense"`` (masked dense weight), ``"csr"`` (torch.sparse) or ``"grouped"``
        (block patterns: a gather + batched matmul / grouped convolution) inference."""
        if kernel not in KERNELS:
            raise InputError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}")
        if not self._supports(kernel):
            why = ("its mask is not a block pattern (sparsify with pattern='block')"
                   if kernel == "grouped" else "it has no CSR kernel")
            raise InputError(f"{type(self).__name__} cannot run the {kernel!r} kernel: {why}; "
                             "use 'dense'")
        self.kernel = kernel
        self._cache = None

    def _supports_csr(self) -> bool:
        return True

    def _supports(self, kernel: str) -> bool:
        if kernel == "csr":
            return self._supports_csr()
        if kernel == "grouped":
            return self.block_groups() is not None
        return kernel == "dense"

    def block_groups(self) -> tuple[torch.Tensor, int] | None:
        """``(input permutation, groups)`` when the mask is a block pattern (contiguous
        output groups, each seeing its own equal share of the inputs), else ``None``."""
        key = ("groups", self.mask._version)
        cached = getattr(self, "_groups_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, _block_structure(self.mask))
            self._groups_cache = cached
        return cached[1]

    def _inference_weight(self, kind: str):
        key = (kind, self.weight._version, self.mask._version, self.weight.data_ptr())
        if self._cache is None or self._cache[0] != key:
            w = self.masked_weight().detach()
            if kind == "csr":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                    w = w.reshape(w.shape[0], -1).to_sparse_csr()
            elif kind == "grouped":
                perm, groups = self.block_groups()
                o, k = w.shape[0] // groups, len(perm) // groups
                index = perm.view(groups, 1, k, *([1] * (w.dim() - 2)))
                w = torch.gather(w.view(groups, o, *w.shape[1:]), 2,
                                 index.expand(groups, o, k, *w.shape[2:]))
                w = (perm, w.reshape(groups * o, k, *w.shape[3:]).contiguous())
            self._cache = (key, w)
        return self._cache[1]

    def _fast_path(self) -> bool:
        return (not self.training and not torch.is_grad_enabled()
                and not torch.jit.is_tracing() and not torch.compiler.is_compiling())

    def _grouped_path(self) -> bool:
        """The grouped kernel also runs while tracing (ONNX export), with frozen weights."""
        return (self.kernel == "grouped" and not self.training
                and (not torch.is_grad_enabled() or torch.jit.is_tracing()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fan_in={self.fan_in}, kernel={self.kernel}"


class SparseLinear(_SparseMixin, nn.Linear):
    """``nn.Linear`` with a fixed connectivity mask (fixed fan-in, balanced fan-out).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        mask: ``(out_features, in_features)`` bool mask; :func:`fixed_fan_mask` builds one.
    """

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor,
                 bias: bool = True):
        nn.Linear.__init__(self, in_features, out_features, bias)
        if tuple(mask.shape) != (out_features, in_features):
            raise InputError(f"mask shape {tuple(mask.shape)} != ({out_features}, {in_features})")
        self._init_sparse(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._grouped_path():
            perm, w = self._inference_weight("grouped")  # w: (out, k), rows in groups
            groups = len(perm) // w.shape[1]
            flat = x.reshape(-1, x.shape[-1]).index_select(1, perm)
            xg = flat.view(flat.shape[0], groups, -1).transpose(0, 1)  # (g, N, k)
            out = torch.bmm(xg, w.view(groups, -1, w.shape[1]).transpose(1, 2))  # (g, N, o)
            out = out.transpose(0, 1).reshape(flat.shape[0], self.out_features)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)
        if not self._fast_path():
            return F.linear(x, self.masked_weight(), self.bias)
        if self.kernel == "dense":
            return F.linear(x, self._inference_weight("dense"), self.bias)
        w = self._inference_weight("csr")
        flat = x.reshape(-1, x.shape[-1])
        # A matrix-vector product is torch's fastest CSR path at batch 1.
        out = (w @ flat[0]).unsqueeze(0) if flat.shape[0] == 1 else (w @ flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class _SparseConvNd(_SparseMixin):
    """Channel-level sparsity: output channel ``o`` sees a fixed set of input channels."""

    def _check(self, mask: torch.Tensor) -> None:
        if self.groups != 1:
            raise InputError("predefined sparsity applies to convolutions with groups=1 "
                             "(a grouped or depthwise convolution is already sparse)")
        want = (self.out_channels, self.in_channels)
        if tuple(mask.shape) != want:
            raise InputError(f"mask shape {tuple(mask.shape)} != {want}")

    def _supports(self, kernel: str) -> bool:
        # the grouped convolution pads with zeros; other padding modes stay dense
        if kernel == "grouped" and self.padding_mode != "zeros":
            return False
        return super()._supports(kernel)

    def _grouped_conv(self, x: torch.Tensor, conv) -> torch.Tensor:
        """The block pattern as a channel gather plus one grouped convolution."""
        perm, w = self._inference_weight("grouped")
        groups = len(perm) // w.shape[1]
        return conv(x.index_select(1, perm), w, self.bias, self.stride, self.padding,
                    self.dilation, groups)


class SparseConv1d(_SparseConvNd, nn.Conv1d):
    """``nn.Conv1d`` with a fixed (output channel, input channel) connectivity mask."""

    def __init__(self, *args, mask: torch.Tensor, **kwargs):
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._check(mask)
        self._init_sparse(mask)

    def _supports_csr(self) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._grouped_path():
            return self._grouped_conv(x, F.conv1d)
        w = self._inference_weight("dense") if self._fast_path() else self.masked_weight()
        return self._conv_forward(x, w, self.bias)


class SparseConv2d(_SparseConvNd, nn.Conv2d):
    """``nn.Conv2d`` with a fixed channel connectivity mask; CSR kernel via im2col."""

    def __init__(self, *args, mask: torch.Tensor, **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._check(mask)
        self._init_sparse(mask)

    def _supports_csr(self) -> bool:
        return self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._grouped_path():
            return self._grouped_conv(x, F.conv2d)
        if not self._fast_path():
            return self._conv_forward(x, self.masked_weight(), self.bias)
        if self.kernel == "dense":
            return self._conv_forward(x, self._inference_weight("dense"), self.bias)
        n, _, h, w_in = x.shape
        kh, kw = self.kernel_size
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w_in + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C*kh*kw, N*L)
        out = self._inference_weight("csr") @ cols
        out = out.reshape(self.out_channels, n, oh, ow).transpose(0, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out.contiguous()


SparseLayer = SparseLinear | SparseConv1d | SparseConv2d


def _block_structure(mask: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(input permutation, groups)`` of a block-pattern mask, or ``None``."""
    out_units, in_units = mask.shape
    fan_in = int(mask[0].sum())
    if fan_in == 0 or in_units % fan_in:
        return None
    groups = in_units // fan_in
    if groups == 1 or out_units % groups:
        return None
    blocks = mask.view(groups, out_units // groups, in_units)
    heads = blocks[:, 0]
    if not bool((blocks == heads[:, None]).all()) or not bool((heads.sum(0) == 1).all()):
        return None
    return heads.nonzero()[:, 1].contiguous(), groups


def _make_sparse(layer: nn.Module, mask: torch.Tensor, rescale: bool = False) -> nn.Module:
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


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
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
        _set_submodule(module, name, _make_sparse(layer, mask, rescale_init))
        fan_out = mask.sum(0)
        summary[name] = {"shape": [out_units, in_units], "fan_in": int(mask[0].sum()),
                         "fan_out_min": int(fan_out.min()), "fan_out_max": int(fan_out.max()),
                         "density": int(mask.sum()) / mask.numel(),
                         "pattern": "block" if _block_structure(mask) else "cyclic"}
    return summary


def sparse_layers(module: nn.Module) -> dict[str, SparseLayer]:
    """The sparse layers of ``module`` by name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, _SparseMixin)}


@torch.no_grad()
def apply_masks_(module: nn.Module) -> None:
    """Zero the stored weights of pruned connections (e.g. after editing weights by hand)."""
    for layer in sparse_layers(module).values():
        layer.weight.mul_(layer._mask_full())


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def choose_kernels(module: nn.Module, example: object, repeats: int = 30,
                   min_speedup: float = 1.1) -> dict[str, dict]:
    """Time every kernel a sparse layer supports (dense, CSR, grouped for block patterns) on
    its real input; keep the fastest.

    A sparse kernel is kept only when it is at least ``min_speedup`` times faster than dense,
    so noise does not pick it. Measure at the batch size you deploy at (1 for latency).

    Args:
        module: a model containing sparse layers (run in eval mode).
        example: an input batch for ``module``.
        repeats: timed calls per kernel (median).
        min_speedup: how much faster CSR must be to be chosen.

    Returns:
        ``{layer: {"dense_us", "kernel", and "csr_us" / "grouped_us" where supported}}``.
    """
    layers = sparse_layers(module)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, name=name: inputs.setdefault(name, args[0].clone()))
        for name, layer in layers.items()]
    was_training = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        module(example)
    finally:
        for h in hooks:
            h.remove()
    chosen = {}
    for name, layer in layers.items():
        if name not in inputs:
            continue
        x = inputs[name]
        timings = {}
        for kernel in KERNELS:
            if not layer._supports(kernel):
                continue
            layer.set_kernel(kernel)
            timings[kernel] = _time(lambda layer=layer, x=x: layer(x), repeats)
        fastest = min(timings, key=timings.get)
        best = fastest if timings[fastest] * min_speedup < timings["dense"] else "dense"
        layer.set_kernel(best)
        chosen[name] = {"kernel": best, **{f"{k}_us": 1e6 * v for k, v in timings.items()}}
    for m, mode in was_training:
        m.training = mode
    return chosen


def effective_macs(module: nn.Module, example: object) -> float:
    """MACs of one call on ``example`` counting only kept connections of sparse layers.

    Dense MACs come from torch's flop counter; each sparse layer's share is scaled by its
    density (its MACs are exactly proportional to the kept weights). The example's batch is
    counted whole: pass one sample for per-sample MACs.
    """
    layers = sparse_layers(module)
    saved: list[float] = []

    def hook(m, args, out):
        per_output = m.weight[0].numel()  # in_features, or in_channels * kernel size
        saved.append(out.numel() * per_output * (1 - m.density))

    handles = [layer.register_forward_hook(hook) for layer in layers.values()]
    kernels = {n: layer.kernel for n, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.set_kernel("dense")
        total = count_macs(lambda: module(example))
    finally:
        for h in handles:
            h.remove()
        for n, layer in layers.items():
            layer.set_kernel(kernels[n])
    return total - sum(saved)


def dense_weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers stored dense (masks excluded)."""
    masks = {id(layer.mask) for layer in sparse_layers(module).values()}
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
               if id(t) not in masks)


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
        if not isinstance(layer, _SparseMixin):
            layer = _make_sparse(layer, mask)
            _set_submodule(module, name, layer)
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
