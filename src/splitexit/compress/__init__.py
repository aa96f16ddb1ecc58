"""Compression: predefined sparsity that really saves bytes and time, int8 quantization."""

from .quantize import (
    PayloadCalibrationReader,
    QuantizationCollapseError,
    QuantReport,
    check_quantized,
    onnx_weight_bytes,
    quantize_onnx,
    quantize_piece,
)
from .sparsity import (
    PATTERNS,
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

__all__ = ["PATTERNS", "fixed_fan_mask", "SparseLinear", "SparseConv1d", "SparseConv2d", "sparsify",
           "sparse_layers", "apply_masks_", "choose_kernels", "effective_macs", "save_sparse",
           "load_sparse", "dense_weight_bytes", "PayloadCalibrationReader", "quantize_onnx",
           "quantize_piece", "check_quantized", "QuantizationCollapseError", "QuantReport",
           "onnx_weight_bytes"]
