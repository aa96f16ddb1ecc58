"""Deployment pieces: ONNX export of any piece and the batch-1 exit graph.

Exit programs on ONNX Runtime run in :mod:`splitexit.runtime` (:class:`OrtProgram`, over the
pieces :func:`splitexit.program.export_pieces` writes); whole deployments are bundles
(:mod:`splitexit.deploy`). :func:`parity` compares any runtime with the PyTorch model.
"""

from .exit_graph import OnnxOps, export_exit_graph
from .onnx import DEFAULT_OPSET, OrtPiece, export_piece
from .pipeline import parity

__all__ = ["export_piece", "OrtPiece", "DEFAULT_OPSET", "parity", "export_exit_graph",
           "OnnxOps"]
