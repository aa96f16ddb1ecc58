"""Deployment: ONNX export of every piece and an ONNX Runtime early-exit pipeline."""

from .onnx import DEFAULT_OPSET, OrtPiece, export_piece
from .pipeline import DeviceOutcome, OrtExitPipeline, export_multiexit, parity

__all__ = ["export_piece", "OrtPiece", "DEFAULT_OPSET", "export_multiexit", "OrtExitPipeline",
           "DeviceOutcome", "parity"]
