"""Compression: predefined sparsity that really saves bytes and time, int8 quantization."""

from .sparsity import (
    SparseConv1d,
    SparseConv2d,
    SparseLinear,
    apply_masks_,
    choose_kernels,
    dense_weight_bytes,
    effective_macs,
    fixed_fan_mask,
    load_sparse,
    save_sparse,
    sparse_layers,
    sparsify,
)

__all__ = ["fixed_fan_mask", "SparseLinear", "SparseConv1d", "SparseConv2d", "sparsify",
           "sparse_layers", "apply_masks_", "choose_kernels", "effective_macs", "save_sparse",
           "load_sparse", "dense_weight_bytes"]
