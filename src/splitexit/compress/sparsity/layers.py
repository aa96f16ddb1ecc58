"""The sparse layers: ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` that compute with a fixed
connectivity mask, and run a dense, CSR or grouped kernel at inference."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from .masks import block_structure

__all__ = ["KERNELS", "SparseConv1d", "SparseConv2d", "SparseLayer", "SparseLinear",
           "sparse_layers"]

KERNELS = ("dense", "csr", "grouped")


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
            cached = (key, block_structure(self.mask))
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
    """Channel-level sparsity: output channel ``o`` sees a fixed set of input channels.

    Args:
        *args, **kwargs: as the ``nn.Conv1d`` / ``nn.Conv2d`` it extends.
        mask: ``(out_channels, in_channels)`` bool mask; :func:`fixed_fan_mask` builds one.
    """

    def __init__(self, *args, mask: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)  # the nn.ConvNd next in the method resolution order
        self._check(mask)
        self._init_sparse(mask)

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

    def _supports_csr(self) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._grouped_path():
            return self._grouped_conv(x, F.conv1d)
        w = self._inference_weight("dense") if self._fast_path() else self.masked_weight()
        return self._conv_forward(x, w, self.bias)


class SparseConv2d(_SparseConvNd, nn.Conv2d):
    """``nn.Conv2d`` with a fixed channel connectivity mask; CSR kernel via im2col."""

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


def sparse_layers(module: nn.Module) -> dict[str, SparseLayer]:
    """The sparse layers of ``module`` by name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, _SparseMixin)}
