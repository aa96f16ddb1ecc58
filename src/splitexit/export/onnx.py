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

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ..errors import CorruptFileError, InputError
from ..stages import Payload, Stage, StagedModel, payload_tensors

__all__ = ["export_piece", "OrtPiece", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17

ArrayPayload = np.ndarray | tuple[np.ndarray, ...]


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


class OrtPiece:
    """An exported piece run by ONNX Runtime: payload in, payload out.

    Takes numpy arrays or torch tensors (one, or a tuple for a multi-tensor payload) and
    returns the same kind: a torch payload in gives a torch payload out.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (1 for single-threaded, reproducible timing; ``None`` lets
            ONNX Runtime decide).
        optimization: ONNX Runtime graph optimisation level (``"all"``, ``"extended"``,
            ``"basic"`` or ``"disable"``).

    Example:
        >>> piece = OrtPiece("device.onnx", threads=1)
        >>> features = piece(torch.randn(4, 1, 28, 28))
    """

    _LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
               "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
               "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
               "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}

    def __init__(self, path: str | Path, threads: int | None = 1, optimization: str = "all"):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"no ONNX file at {self.path}; export the piece first with "
                             "splitexit.export.export_piece")
        if optimization not in self._LEVELS:
            raise InputError(f"unknown optimization {optimization!r}; use one of "
                             f"{', '.join(self._LEVELS)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = self._LEVELS[optimization]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CorruptFileError(f"ONNX Runtime cannot load {self.path} ({exc}); re-export "
                                   "the piece") from exc
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()
        self.input_names = [i.name for i in self.inputs]
        self.output_names = [o.name for o in self.outputs]
        self._input_dtypes = [_ORT_DTYPES.get(i.type) for i in self.inputs]

    def __repr__(self) -> str:
        return f"OrtPiece({str(self.path)!r}, inputs={self.input_names}, outputs={self.output_names})"

    def run_arrays(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run on numpy arrays, one per graph input; returns one array per graph output."""
        if len(arrays) != len(self.inputs):
            raise InputError(f"{self.path.name} takes {len(self.inputs)} input tensor(s) "
                             f"({', '.join(self.input_names)}), got {len(arrays)}")
        feed = {}
        for spec, dtype, a in zip(self.inputs, self._input_dtypes, arrays):
            a = np.asarray(a)
            if dtype is not None and a.dtype != dtype:
                if not (np.issubdtype(a.dtype, np.floating) and np.issubdtype(dtype, np.floating)):
                    raise InputError(f"input {spec.name!r} of {self.path.name} needs dtype "
                                     f"{np.dtype(dtype).name}, got {a.dtype}")
                a = a.astype(dtype)
            if a.ndim != len(spec.shape):
                raise InputError(f"input {spec.name!r} of {self.path.name} needs {len(spec.shape)} "
                                 f"dimensions {spec.shape}, got shape {a.shape}")
            feed[spec.name] = np.ascontiguousarray(a)
        try:
            return self.session.run(None, feed)
        except Exception as exc:
            raise InputError(f"ONNX Runtime failed on {self.path.name}: {exc}") from exc

    def __call__(self, payload: Payload | ArrayPayload) -> Payload | ArrayPayload:
        """Run on a payload (numpy or torch; one tensor or a tuple); returns the same kind."""
        items = payload if isinstance(payload, tuple) else (payload,)
        as_torch = isinstance(items[0], torch.Tensor)
        arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t for t in items]
        outs = self.run_arrays(arrays)
        if as_torch:
            outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(double)": np.float64, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
               "tensor(bool)": np.bool_}
