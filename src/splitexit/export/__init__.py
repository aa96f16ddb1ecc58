"""Deployment: ONNX export of every piece and an ONNX Runtime early-exit pipeline."""

from .onnx import DEFAULT_OPSET, OrtPiece, export_piece

__all__ = ["export_piece", "OrtPiece", "DEFAULT_OPSET"]
