"""ONNX export of any piece (stage, exit head, device / server half, converter) and its runner.

A piece has one contract: a payload in (one tensor or a tuple of tensors), a payload out. Each
tensor of the payload becomes one graph input / output (``in0``, ``in1``, ... / ``out0``, ...),
with a dynamic batch dimension, so the same graph runs the shrinking batches of early exits.
:class:`OrtPiece` runs an exported graph with ONNX Runtime and speaks numpy or torch.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import InputError
from ..runtime.ort import OrtSession
from ..stages import Payload, Stage, StagedModel, payload_tensors

__all__ = ["export_piece", "OrtPiece", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17

class _PieceAdapter(nn.Module):
    """Presents a piece as ``forward(*tensors) -> tensor | tuple`` for the exporter."""

    def __init__(self, module: nn.Module, num_inputs: int, as_payload: bool):
        super().__init__()
        self.module = module
        self.num_inputs = num_inputs
        self.as_payload = as_payload

    def forward(self, *tensors: torch.Tensor):
        if not self.as_payload:
            return self.module(*tensors)
        return self.module(tensors[0] if self.num_inputs == 1 else tuple(tensors))


def _takes_payload(module: nn.Module) -> bool:
    # Stages and staged models take the payload as one argument (a tuple when it has several
    # tensors); heads and plain modules take their tensors as positional arguments.
    return isinstance(module, (Stage, StagedModel))


def _check_example(example: Payload) -> tuple[torch.Tensor, ...]:
    tensors = example if isinstance(example, tuple) else (example,)
    if not tensors:
        raise InputError("example_input is an empty tuple; pass one tensor or a tuple of tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"example_input[{i}] is a {type(t).__name__}, not a torch.Tensor; "
                             "pass a tensor (or a tuple of tensors) shaped like a real batch")
        if t.dim() == 0 or t.shape[0] == 0:
            raise InputError(f"example_input[{i}] has shape {tuple(t.shape)}; it needs a "
                             "non-empty batch dimension first")
    return tensors


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _unsupported_message(exc: BaseException) -> str:
    text = str(exc)
    ops = re.findall(r"operator '([^']+)'", text)
    if ops:
        return (f"the piece uses the operation {ops[0]!r}, which the ONNX exporter does not "
                "support at this opset. Replace it with supported operations (or keep that "
                "piece in PyTorch); exporter message: " + text.splitlines()[0])
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return (f"ONNX export failed ({type(exc).__name__}: {first}). Make the piece's forward "
            "free of data-dependent Python control flow and unsupported operations")


def export_piece(module: nn.Module, example_input: Payload, path: str | Path,
                 dynamic_batch: bool = True, input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None, opset: int = DEFAULT_OPSET,
                 as_payload: bool | None = None) -> Path:
    """Export one piece to an ONNX file and check it with ``onnx.checker``.

    Args:
        module: a stage, exit head, device or server half (a :class:`StagedModel`), converter,
            or any ``nn.Module``. It is exported in eval mode; its mode is restored afterwards.
        example_input: one tensor or a tuple of tensors (a payload) shaped like a real batch.
        path: the ``.onnx`` file to write (parent directories are created).
        dynamic_batch: make dimension 0 of every input and output dynamic.
        input_names: graph input names (default ``in0``, ``in1``, ...).
        output_names: graph output names (default ``out0``, ``out1``, ...).
        opset: ONNX opset version.
        as_payload: whether the module takes the tuple as one payload argument (stages and
            staged models) or its tensors as positional arguments (heads, plain modules);
            decided from the module's type when ``None``.

    Returns:
        The path written.

    Raises:
        InputError: a bad example, wrong number of names, or a piece that cannot be exported
            (the message names the unsupported operation).

    Example:
        >>> device, server = staged.split("block1")
        >>> export_piece(device, torch.randn(2, 1, 28, 28), "device.onnx")
    """
    tensors = _check_example(example_input)
    if dynamic_batch and tensors[0].shape[0] == 1:
        # A batch of one lets the tracer fold the batch size into reshapes; trace with two.
        tensors = tuple(torch.cat([t, t]) for t in tensors)
    use_payload = _takes_payload(module) if as_payload is None else as_payload
    adapter = _PieceAdapter(module, len(tensors), use_payload)
    # Restore every submodule's own mode afterwards: a half built by split() is a new module in
    # training mode around stages in eval mode, and train(flag) would overwrite them all.
    modes = [(m, m.training) for m in module.modules()]
    adapter.eval()
    try:
        with torch.no_grad():
            outputs = payload_tensors(adapter(*tensors))
    except Exception as exc:
        _restore_modes(modes)
        raise InputError(f"the piece fails on example_input ({type(exc).__name__}: {exc}); "
                         "pass a payload shaped like what the piece receives at its cut") from exc
    in_names = list(input_names) if input_names is not None else [
        f"in{i}" for i in range(len(tensors))]
    out_names = list(output_names) if output_names is not None else [
        f"out{i}" for i in range(len(outputs))]
    if len(in_names) != len(tensors):
        raise InputError(f"{len(in_names)} input names for {len(tensors)} input tensors")
    if len(out_names) != len(outputs):
        raise InputError(f"{len(out_names)} output names for {len(outputs)} output tensors")
    dynamic_axes = ({n: {0: "batch"} for n in [*in_names, *out_names]}
                    if dynamic_batch else None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter: the dynamo one needs onnxscript, absent here.
            torch.onnx.export(adapter, tensors, str(path), input_names=in_names,
                              output_names=out_names, dynamic_axes=dynamic_axes,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    except Exception as exc:
        raise InputError(_unsupported_message(exc)) from exc
    finally:
        _restore_modes(modes)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise InputError(f"the exported graph {path} fails onnx.checker: {exc}") from exc
    return path


#: One ONNX graph on ONNX Runtime, payload in, payload out: the runtime's
#: :class:`~splitexit.runtime.ort.OrtSession` (kept under this name for the export API).
OrtPiece = OrtSession
