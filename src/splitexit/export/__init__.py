"""Deployment: ONNX export of every piece and ONNX Runtime early-exit execution."""

from .exit_graph import OrtExitChain, OrtExitGraph, export_exit_chain, export_exit_graph
from .onnx import DEFAULT_OPSET, OrtPiece, export_piece
from .pipeline import DeviceOutcome, OrtExitPipeline, export_multiexit, parity

__all__ = ["export_piece", "OrtPiece", "DEFAULT_OPSET", "export_multiexit", "OrtExitPipeline",
           "DeviceOutcome", "parity", "export_exit_graph", "OrtExitGraph", "export_exit_chain",
           "OrtExitChain"]
