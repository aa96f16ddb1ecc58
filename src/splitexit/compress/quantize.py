"""Int8 post-training quantization of exported pieces with ONNX Runtime, checked for accuracy.

:func:`quantize_onnx` runs ONNX Runtime's static quantization (int8 weights per channel, uint8
activations, QDQ format that the CPU provider fuses into integer kernels) with calibration
payloads fed through :class:`PayloadCalibrationReader`. :func:`quantize_piece` exports and
quantizes any piece in one call; :func:`check_quantized` compares the int8 and fp32 graphs on
labelled data and raises :class:`QuantizationCollapseError` (or warns) when accuracy drops
more than the tolerance.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from torch import nn

from ..errors import InputError, SplitexitError
from ..export.onnx import OrtPiece, export_piece
from ..stages import Payload, payload_tensors

__all__ = ["PayloadCalibrationReader", "quantize_onnx", "quantize_piece", "check_quantized",
           "QuantizationCollapseError", "QuantReport", "onnx_weight_bytes"]

_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}


class QuantizationCollapseError(SplitexitError):
    """The int8 model lost more accuracy than the tolerance allows."""


class PayloadCalibrationReader(CalibrationDataReader):
    """Feeds calibration payloads to ONNX Runtime's calibrator, one batch at a time.

    Args:
        input_names: the graph's input names (``OrtPiece(path).input_names``).
        payloads: batches, each one tensor/array or a tuple of them (one per graph input).
    """

    def __init__(self, input_names: Sequence[str], payloads: Iterable[Payload | np.ndarray]):
        self.input_names = list(input_names)
        self._batches = []
        for p in payloads:
            items = p if isinstance(p, tuple) else (p,)
            if len(items) != len(self.input_names):
                raise InputError(f"a calibration payload has {len(items)} tensor(s); the graph "
                                 f"takes {len(self.input_names)} ({', '.join(self.input_names)})")
            arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
                      for t in items]
            self._batches.append({n: a.astype(np.float32, copy=False)
                                  for n, a in zip(self.input_names, arrays)})
        if not self._batches:
            raise InputError("no calibration data: pass at least one batch of real inputs "
                             "(a few hundred samples from the calibration split)")
        self._iter = iter(self._batches)

    def get_next(self) -> dict | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def _batches(data: torch.Tensor | np.ndarray | Iterable, batch_size: int) -> Iterable:
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return [data[i: i + batch_size] for i in range(0, len(data), batch_size)]
    return data


def quantize_onnx(model_path: str | Path, calibration: torch.Tensor | np.ndarray | Iterable,
                  out_path: str | Path, per_channel: bool = True, method: str = "minmax",
                  batch_size: int = 64, exclude_nodes: Sequence[str] = ()) -> Path:
    """Static int8 quantization of an ONNX graph with calibration data.

    Args:
        model_path: the fp32 ``.onnx`` file.
        calibration: calibration inputs: one tensor/array (split into ``batch_size`` batches)
            or an iterable of payloads. Use the calibration split, never the test split.
        out_path: the int8 ``.onnx`` file to write.
        per_channel: one weight scale per output channel (better accuracy).
        method: ``"minmax"``, ``"entropy"`` or ``"percentile"`` activation ranges.
        batch_size: batch size when ``calibration`` is one tensor.
        exclude_nodes: node names to keep in float.

    Returns:
        ``out_path``.

    Raises:
        InputError: unknown method, calibration data that does not fit the graph, or a graph
            ONNX Runtime cannot quantize.
    """
    if method not in _METHODS:
        raise InputError(f"unknown calibration method {method!r}; use one of "
                         f"{', '.join(_METHODS)}")
    model_path, out_path = Path(model_path), Path(out_path)
    piece = OrtPiece(model_path)
    reader = PayloadCalibrationReader(piece.input_names, _batches(calibration, batch_size))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            with _quiet():
                quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
                quantize_static(str(prepared), str(out_path), reader,
                                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=_METHODS[method],
                                nodes_to_exclude=list(exclude_nodes),
                                extra_options={"CalibTensorRangeSymmetric": False})
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"ONNX Runtime could not quantize {model_path.name}: "
                             f"{type(exc).__name__}: {exc}") from exc
    return out_path


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def quantize_piece(module: nn.Module, calibration: Payload | Iterable, directory: str | Path,
                   name: str = "piece", **options) -> tuple[Path, Path]:
    """Export ``module`` to ONNX and quantize it to int8 with calibration payloads.

    Args:
        module: any piece (stage, head, device or server half, whole model).
        calibration: a batch of inputs (split into batches) or an iterable of payloads.
        directory: where ``<name>.onnx`` and ``<name>.int8.onnx`` go.
        name: file stem.
        **options: passed to :func:`quantize_onnx`.

    Returns:
        ``(fp32_path, int8_path)``.
    """
    directory = Path(directory)
    if isinstance(calibration, (torch.Tensor, tuple)):
        example = tuple(t[:2] for t in payload_tensors(calibration))
        example = example[0] if len(example) == 1 else example
        batches = [calibration]
    else:
        batches = list(calibration)
        if not batches:
            raise InputError("no calibration data: pass at least one batch")
        example = batches[0]
    fp32 = export_piece(module, example, directory / f"{name}.onnx")
    int8 = quantize_onnx(fp32, batches if not isinstance(calibration, torch.Tensor)
                         else calibration, directory / f"{name}.int8.onnx", **options)
    return fp32, int8


@dataclass
class QuantReport:
    """fp32 vs int8 on the same data."""

    fp32_accuracy: float
    int8_accuracy: float
    accuracy_drop: float
    fp32_bytes: int
    int8_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _accuracy(piece: OrtPiece, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = payload_tensors(piece(x[i: i + batch_size]))[0]
        correct += int((logits.argmax(1) == y[i: i + batch_size]).sum())
    return correct / len(x)


def onnx_weight_bytes(path: str | Path) -> int:
    """Bytes of the initializers (weights, scales, zero points) stored in an ONNX file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def check_quantized(fp32_path: str | Path, int8_path: str | Path, x: torch.Tensor,
                    y: torch.Tensor, tolerance: float = 0.01, on_collapse: str = "raise",
                    batch_size: int = 256) -> QuantReport:
    """Compare an int8 graph with its fp32 original on labelled data.

    Args:
        fp32_path, int8_path: the two graphs (outputs: logits).
        x, y: inputs and labels (use a held-out split).
        tolerance: largest accepted accuracy drop (a fraction: 0.01 is one point).
        on_collapse: ``"raise"`` (:class:`QuantizationCollapseError`), ``"warn"`` or
            ``"ignore"`` when the drop exceeds ``tolerance``.

    Returns:
        Both accuracies, the drop and both graphs' weight bytes.

    Raises:
        QuantizationCollapseError: the drop exceeds ``tolerance`` and ``on_collapse="raise"``.
    """
    if on_collapse not in ("raise", "warn", "ignore"):
        raise InputError(f"on_collapse must be raise, warn or ignore, got {on_collapse!r}")
    if not 0 <= tolerance <= 1:
        raise InputError(f"tolerance is an accuracy fraction in [0, 1], got {tolerance}")
    fp32_acc = _accuracy(OrtPiece(fp32_path), x, y, batch_size)
    int8_acc = _accuracy(OrtPiece(int8_path), x, y, batch_size)
    report = QuantReport(fp32_acc, int8_acc, fp32_acc - int8_acc,
                         onnx_weight_bytes(fp32_path), onnx_weight_bytes(int8_path))
    if report.accuracy_drop > tolerance:
        message = (f"int8 accuracy collapsed: {int8_acc:.4f} vs {fp32_acc:.4f} in fp32 (drop "
                   f"{100 * report.accuracy_drop:.2f} pt > tolerance {100 * tolerance:.2f} pt) "
                   f"for {Path(int8_path).name}. Calibrate on more representative data (the "
                   "calibration split, a few hundred samples), try method='percentile' or "
                   "'entropy', or keep the sensitive nodes in float with exclude_nodes=")
        if on_collapse == "raise":
            raise QuantizationCollapseError(message)
        if on_collapse == "warn":
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    return report
