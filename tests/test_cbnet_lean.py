"""Lean CBNet pipelines (issue 17): flat primitive chains, exact rewrites, same logits."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from splitexit import cbnet
from splitexit.errors import InputError
from splitexit.runtime.ort import OrtSession
from splitexit.zoo import create_model, create_multiexit

SHAPE = (1, 28, 28)


def _pipeline(hidden=(32,), output="linear", seed=0):
    torch.manual_seed(seed)
    branchy = create_multiexit("b-lenet", 10, SHAPE, head="published")
    conv = cbnet.ConvertingAutoencoder(SHAPE, "fc", hidden, output=output)
    return cbnet.CBNetPipeline(conv, cbnet.light_classifier(branchy), 10).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(48, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("folded", [False, True])
def test_lean_equals_the_pipeline_bit_for_bit(images, folded):
    pipe = _pipeline((64, 32))
    source = cbnet.fold_pipeline(pipe) if folded else pipe
    lean = cbnet.lean_pipeline(source)
    with torch.inference_mode():
        ref, got = source(images), lean(images)
    assert torch.equal(ref, got)
    with torch.no_grad():  # the module path (also used under autograd) gives the same
        assert torch.equal(lean.net(images), ref)
    lean(images).sum().backward()  # trainable: autograd runs the modules, not in-place steps
    weight = lean.net[-1].weight
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_relu_moves_before_pooling_and_reshapes_to_follow_its_linear_layer():
    layers = cbnet.lean_layers(cbnet.fold_pipeline(_pipeline((32,))))
    kinds = [type(m).__name__ for m in layers]
    # folded: Flatten, Linear, ReLU (encoder), Linear (fold), ReLU moved before the reshape
    # and the pooling, Reshape, MaxPool, Conv2d, ReLU before the pooling, MaxPool, ...
    assert kinds == ["Flatten", "Linear", "ReLU", "Linear", "ReLU", "Reshape", "MaxPool2d",
                     "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    assert layers[5].shape == (5, 30, 30)


def test_lean_onnx_graph_is_one_reshape_and_runs_the_same(images, tmp_path):
    folded = cbnet.fold_pipeline(_pipeline((32,)))
    lean = cbnet.lean_pipeline(folded)
    paths = {n: cbnet.export_onnx(m, tmp_path / f"{n}.onnx", SHAPE)
             for n, m in (("folded", folded), ("lean", lean))}
    ops = {n: [node.op_type for node in onnx.load(str(p)).graph.node] for n, p in paths.items()}
    assert "Shape" in ops["folded"] and "Concat" in ops["folded"]  # what the rewrite removes
    assert "Shape" not in ops["lean"] and "Concat" not in ops["lean"]
    assert ops["lean"].count("Reshape") == 1 and len(ops["lean"]) < len(ops["folded"])
    out = OrtSession(paths["lean"], 1).run_arrays([images.numpy()])[0]
    with torch.inference_mode():
        ref = folded(images).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_lean_lenet_equals_lenet(images):
    torch.manual_seed(0)
    lenet = create_model("lenet", 10, SHAPE).eval()
    lean = cbnet.LeanPipeline(cbnet.lean_layers(lenet), SHAPE, 10).eval()
    with torch.inference_mode():
        assert torch.equal(lean(images), lenet(images))


def test_in_place_relu_never_touches_the_callers_input(images):
    lean = cbnet.LeanPipeline([nn.ReLU(), nn.Flatten(), nn.Linear(784, 10)], SHAPE, 10).eval()
    x = images - 0.0  # a copy
    with torch.inference_mode():
        lean(x)
    assert torch.equal(x, images)


def test_lean_pipeline_rejects_bad_input():
    lean = cbnet.lean_pipeline(_pipeline())
    x = torch.rand(2, *SHAPE)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        lean(x * 3)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        lean(bad)
    with pytest.raises(InputError, match="shape"):
        lean(torch.rand(2, 1, 14, 14))
    with pytest.raises(InputError, match="dtype"):
        lean(x.double())


def test_lean_conv_converter_equals_the_pipeline(images):
    torch.manual_seed(0)
    conv = cbnet.ConvertingAutoencoder(SHAPE, "conv", (32,), channels=(4, 8), output="sigmoid")
    pipe = cbnet.CBNetPipeline(conv, cbnet.light_classifier(
        create_multiexit("b-lenet", 10, SHAPE, head="published")), 10).eval()
    with torch.inference_mode():
        assert torch.equal(cbnet.lean_pipeline(pipe)(images), pipe(images))


def test_layers_a_lean_chain_cannot_run_are_refused():
    pipe = _pipeline()
    pipe.classifier.stages[0].module = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 5, 5,
                                                                                   padding=3))
    with pytest.raises(InputError, match="BatchNorm2d"):
        cbnet.lean_pipeline(pipe)
    with pytest.raises(InputError, match="not a CBNet pipeline"):
        cbnet.lean_pipeline(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    with pytest.raises(InputError, match="dim=1"):
        cbnet.lean_layers(nn.Sequential(nn.Unflatten(2, (2, 14))))


def test_conv_encoder_fc_decoder_converter_folds_and_runs_lean(images, tmp_path):
    """The convfc converter (strided convs, fc decoder, linear output) folds like an fc one:
    its output Linear and the classifier's first conv become one dense layer over the code."""
    torch.manual_seed(0)
    conv = cbnet.ConvertingAutoencoder(SHAPE, "convfc", (32,), channels=(4, 8), output="linear")
    assert [type(m).__name__ for m in conv.net][:5] == ["Conv2d", "ReLU", "Conv2d", "ReLU",
                                                        "Flatten"]
    assert conv(images).shape == images.shape
    pipe = cbnet.CBNetPipeline(conv, cbnet.light_classifier(
        create_multiexit("b-lenet", 10, SHAPE, head="published")), 10).eval()
    folded = cbnet.fold_pipeline(pipe)
    lean = cbnet.lean_pipeline(folded)
    with torch.inference_mode():
        ref, got = pipe(images), lean(images)
    assert torch.allclose(ref, got, atol=1e-4, rtol=1e-4)
    assert torch.equal(ref.argmax(1), got.argmax(1))
    dense = folded.classifier.stages[0].module[0]
    assert isinstance(dense, nn.Linear) and (dense.in_features, dense.out_features) == (
        32, 5 * 30 * 30)
    path = cbnet.export_onnx(lean, tmp_path / "convfc.onnx", SHAPE)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 3  # the encoder's two, the classifier's branch; conv1 folded
    out = OrtSession(path, 1).run_arrays([images.numpy()])[0]
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="divisible by 4"):
        cbnet.ConvertingAutoencoder((1, 30, 30), "convfc")
    with pytest.raises(InputError, match="two positive sizes"):
        cbnet.ConvertingAutoencoder(SHAPE, "convfc", channels=(4,))


@pytest.mark.parametrize("kind, kernel", [("patchfc", 4), ("stridefc", 7)])
def test_one_conv_encoder_converter_folds_and_runs_lean(images, tmp_path, kind, kernel):
    """The patchfc / stridefc converters (one stride-4 conv, fc decoder, linear output) fold
    and run lean with the pipeline's logits, in PyTorch and on ONNX Runtime."""
    torch.manual_seed(0)
    conv = cbnet.ConvertingAutoencoder(SHAPE, kind, (24,), channels=(16,), output="linear")
    first = conv.net[0]
    assert isinstance(first, nn.Conv2d) and (first.kernel_size, first.stride) == (
        (kernel, kernel), (4, 4))
    assert conv.net[3].in_features == 16 * 7 * 7 and conv(images).shape == images.shape
    pipe = cbnet.CBNetPipeline(conv, cbnet.light_classifier(
        create_multiexit("b-lenet", 10, SHAPE, head="published")), 10).eval()
    lean = cbnet.lean_pipeline(cbnet.fold_pipeline(pipe))
    with torch.inference_mode():
        ref, got = pipe(images), lean(images)
    assert torch.allclose(ref, got, atol=1e-4, rtol=1e-4)
    path = cbnet.export_onnx(lean, tmp_path / f"{kind}.onnx", SHAPE)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 2  # the patch conv and the classifier's; conv1 folded
    out = OrtSession(path, 1).run_arrays([images.numpy()])[0]
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="one positive channel count"):
        cbnet.ConvertingAutoencoder(SHAPE, kind, channels=(4, 8))
    with pytest.raises(InputError, match="divisible by 4"):
        cbnet.ConvertingAutoencoder((1, 30, 30), kind, channels=(4,))
