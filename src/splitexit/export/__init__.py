"""Deployment pieces: ONNX export of any piece and the batch-1 exit graph.

Exit programs on ONNX Runtime run in :mod:`splitexit.runtime` (:class:`OrtProgram`); whole
deployments are bundles (:mod:`splitexit.deploy`).
"""

from .exit_graph import OnnxOps, export_exit_graph
from .onnx import DEFAULT_OPSET, OrtPiece, export_piece
from .pipeline import DeviceOutcome, OrtExitPipeline, export_multiexit, parity

__all__ = ["export_piece", "OrtPiece", "DEFAULT_OPSET", "export_multiexit", "OrtExitPipeline",
           "DeviceOutcome", "parity", "export_exit_graph", "OnnxOps"]
