"""Int8 static quantization with ONNX Runtime: accuracy within tolerance, collapse detected."""

from __future__ import annotations

import pytest
import torch

from splitexit.compress.quantize import (
    PayloadCalibrationReader,
    QuantizationCollapseError,
    check_quantized,
    onnx_weight_bytes,
    quantize_onnx,
    quantize_piece,
)
from splitexit.errors import InputError
from splitexit.export import OrtPiece, export_piece
from splitexit.training import Baseline, train
from splitexit.zoo import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_mlp(one_thread_module, digits):
    torch.manual_seed(0)
    model = create_model("mlp", digits.num_classes, digits.input_shape, hidden=(128, 64))
    train(model, digits.train, Baseline(), epochs=15, lr=5e-3, progress=False)
    return model.eval()


def test_int8_accuracy_within_tolerance(trained_mlp, digits, tmp_path):
    fp32, int8 = quantize_piece(trained_mlp, digits.calib.x, tmp_path, name="mlp")
    report = check_quantized(fp32, int8, digits.test.x, digits.test.y, tolerance=0.01)
    assert report.fp32_accuracy > 0.9
    assert report.accuracy_drop <= 0.01
    assert report.int8_bytes < 0.4 * report.fp32_bytes  # weights really are int8
    assert report.int8_bytes == onnx_weight_bytes(int8)


def test_collapse_is_detected(trained_mlp, digits, tmp_path):
    # Calibration data on the wrong scale: activation ranges far too narrow, outputs saturate.
    fp32, int8 = quantize_piece(trained_mlp, digits.calib.x * 0.01, tmp_path, name="bad")
    with pytest.raises(QuantizationCollapseError, match="collapsed.*representative"):
        check_quantized(fp32, int8, digits.test.x, digits.test.y, tolerance=0.01)
    with pytest.warns(RuntimeWarning, match="collapsed"):
        report = check_quantized(fp32, int8, digits.test.x, digits.test.y, tolerance=0.01,
                                 on_collapse="warn")
    assert report.accuracy_drop > 0.2


def test_quantized_server_half_and_multi_input_graph(trained_mlp, digits, tmp_path):
    device, server = trained_mlp.split("fc1")
    with torch.no_grad():
        calib = device(digits.calib.x)
        test_mid = device(digits.test.x)
    fp32, int8 = quantize_piece(server, calib, tmp_path, name="server")
    report = check_quantized(fp32, int8, test_mid, digits.test.y, tolerance=0.02)
    assert report.int8_accuracy > 0.8
    # several graph inputs: one calibration array per input
    pair = (torch.randn(4, 3), torch.randn(4, 3))
    add = export_piece(_Add(), pair, tmp_path / "add.onnx")
    out = quantize_onnx(add, [pair, pair], tmp_path / "add.int8.onnx")
    assert OrtPiece(out)(pair).shape == (4, 3)


class _Add(torch.nn.Module):
    def forward(self, a, b):
        return torch.nn.functional.linear(a + b, torch.eye(3))


def test_bad_calibration_input(tmp_path):
    path = export_piece(torch.nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "l.onnx")
    with pytest.raises(InputError, match="no calibration data"):
        PayloadCalibrationReader(["in0"], [])
    with pytest.raises(InputError, match="takes 1"):
        quantize_onnx(path, [(torch.randn(2, 4), torch.randn(2, 4))], tmp_path / "q.onnx")
    with pytest.raises(InputError, match="unknown calibration method"):
        quantize_onnx(path, torch.randn(8, 4), tmp_path / "q.onnx", method="magic")
    with pytest.raises(InputError, match="on_collapse"):
        check_quantized(path, path, torch.randn(2, 4), torch.zeros(2, dtype=torch.long),
                        on_collapse="shout")
