"""CBNet made fast (issue 17): converter search, folding, the fallback exit, bad input."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from benchmarks.cbnet_plot import pareto_front
from splitexit import cbnet
from splitexit.cbnet.fallback import check_confidence
from splitexit.cbnet.search import ConverterSpec, select_fastest
from splitexit.data import load_dataset
from splitexit.deploy import bundle, load_bundle
from splitexit.errors import InputError
from splitexit.measure import torch_threads
from splitexit.policies import MaxProb
from splitexit.runtime.ort import OrtSession
from splitexit.training import Baseline, train
from splitexit.zoo import create_model


@pytest.fixture(scope="module")
def setup():
    """A small B-LeNet, LeNet, targets and a linear-output fc converter on real digits."""
    ds = load_dataset("mnist5k")
    data = ds.train.subset(600, seed=0)
    with torch_threads(1):
        branchy, _ = cbnet.train_branchynet(data, 10, ds.input_shape, epochs=2, lr=3e-3,
                                            batch_size=32, progress=False)
        torch.manual_seed(0)
        lenet = create_model("lenet", 10, ds.input_shape)
        train(lenet, data, Baseline(), epochs=2, lr=3e-3, batch_size=32, progress=False)
        entropy, pred = cbnet.first_exit_entropy(branchy, data.x)
        targets = cbnet.select_targets(data.x, data.y, entropy, float(entropy.quantile(0.85)),
                                       10, predictions=pred)
        torch.manual_seed(0)
        conv = cbnet.ConvertingAutoencoder(ds.input_shape, "fc", (32,), output="linear")
        cbnet.train_converter(conv, data.x, targets, epochs=4, lr=3e-3, batch_size=32,
                              progress=False)
    pipe = cbnet.CBNetPipeline(conv, cbnet.light_classifier(branchy), 10).eval()
    return ds, data, branchy, lenet.eval(), pipe


def test_fold_equals_unfolded_in_torch_and_onnx(setup, tmp_path):
    ds, _, _, _, pipe = setup
    folded = cbnet.fold_pipeline(pipe)
    x = ds.test.x[:64]
    with torch.no_grad():
        ref, got = pipe(x), folded(x)
    assert torch.allclose(ref, got, atol=1e-4, rtol=1e-4)
    assert torch.equal(ref.argmax(1), got.argmax(1))
    # the converter's output Linear and the classifier's first conv are one dense layer
    dense = folded.classifier.stages[0].module[0]
    assert isinstance(dense, nn.Linear) and dense.in_features == 32
    assert dense.out_features == 5 * 30 * 30
    paths = {n: cbnet.export_onnx(m, tmp_path / f"{n}.onnx", ds.input_shape)
             for n, m in (("unfolded", pipe), ("folded", folded))}
    ops = {n: [node.op_type for node in onnx.load(str(p)).graph.node] for n, p in paths.items()}
    assert ops["unfolded"].count("Conv") == 2 and ops["folded"].count("Conv") == 1
    out = {n: OrtSession(p, 1).run_arrays([x.numpy()])[0] for n, p in paths.items()}
    np.testing.assert_allclose(out["folded"], out["unfolded"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["folded"], ref.numpy(), atol=1e-4, rtol=1e-4)


def test_fold_linear_composes_convolutions():
    torch.manual_seed(0)
    a, b = nn.ConvTranspose2d(3, 2, 4, 2, 1), nn.Conv2d(2, 4, 3, padding=1)
    folded = cbnet.fold_linear([a, b], (3, 5, 5))
    z = torch.randn(7, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(folded(z), b(a(z)), atol=1e-5)


def test_fold_across_nonlinear_layer_is_refused(setup):
    ds, _, branchy, _, _ = setup
    published = cbnet.CBNetPipeline(cbnet.ConvertingAutoencoder(ds.input_shape, "fc", (16,)),
                                    cbnet.light_classifier(branchy), 10)
    with pytest.raises(InputError, match="non-linear layer Sigmoid.*output='linear'"):
        cbnet.fold_pipeline(published)
    with pytest.raises(InputError, match="non-linear layer ReLU"):
        cbnet.fold_linear([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)], (4,))

    class ReluFirst(nn.Module):
        def __init__(self, pipe):
            super().__init__()
            self.converter, self.input_shape, self.num_classes = pipe.converter, (1, 28, 28), 10
            self.classifier = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(784, 10))

    linear = cbnet.ConvertingAutoencoder(ds.input_shape, "fc", (16,), output="linear")
    with pytest.raises(InputError, match="non-linear layer ReLU that starts the classifier"):
        cbnet.fold_pipeline(ReluFirst(cbnet.CBNetPipeline(linear, cbnet.light_classifier(
            branchy), 10)))


def test_converter_that_does_not_fit_the_classifier_is_refused(setup):
    _, _, branchy, _, _ = setup
    light = cbnet.light_classifier(branchy)
    with pytest.raises(InputError, match="classifier cannot take"):
        cbnet.CBNetPipeline(cbnet.ConvertingAutoencoder((1, 32, 32), "fc", (16,)), light, 10)
    wrong_out = cbnet.ConvertingAutoencoder((1, 28, 28), "fc", (16,))
    wrong_out.net[-1] = nn.Unflatten(1, (4, 14, 14))
    with pytest.raises(InputError, match=r"maps \(1, 28, 28\) images to \(4, 14, 14\)"):
        cbnet.CBNetPipeline(wrong_out, light, 10)
    with pytest.raises(InputError, match="use num_classes=10"):
        cbnet.CBNetPipeline(cbnet.ConvertingAutoencoder((1, 28, 28), "fc", (16,)), light, 7)
    with pytest.raises(InputError, match="unknown converter output"):
        cbnet.ConvertingAutoencoder((1, 28, 28), "fc", (16,), output="tanh")


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.9"])
def test_threshold_outside_unit_interval_is_refused(setup, value):
    _, _, _, lenet, pipe = setup
    model = cbnet.fallback_model(pipe, lenet, "original")
    with pytest.raises(InputError, match=r"confidence .* in \[0, 1\]"):
        cbnet.FallbackCBNet(model, value)
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        check_confidence(value)


@pytest.mark.parametrize("on", ["original", "converted"])
def test_fallback_runs_on_the_exit_machinery(setup, tmp_path, on):
    ds, _, _, lenet, pipe = setup
    folded = cbnet.fold_pipeline(pipe)
    model = cbnet.fallback_model(folded, lenet, on)
    x = ds.test.x[:40]
    with torch.no_grad():
        logits = model(x)
        assert torch.allclose(logits[0], pipe(x), atol=1e-4)  # exit 0 is the CBNet pipeline
        if on == "original":
            assert torch.allclose(logits[-1], lenet(x), atol=1e-5)  # final: LeNet, unchanged
    assert torch.equal(model.infer(x, MaxProb(0.0)).predictions, pipe(x).argmax(1))
    everyone_falls_back = model.infer(x, MaxProb(1.0))
    assert everyone_falls_back.exit_fractions(2)[1] > 0.5
    fb = cbnet.FallbackCBNet(model, 0.8, on)
    expected = fb.infer(x)
    program = fb.program().on_onnx_runtime(tmp_path / "ort", exit_graph=True)
    for i in range(len(x)):  # batch 1: the single exit graph
        got = program.infer(x[i: i + 1].numpy(), fb.policy)
        assert int(got.exit_index[0]) == int(expected.exit_index[i])
        assert int(got.predictions[0]) == int(expected.predictions[i])
    b = load_bundle(bundle(model, tmp_path / "bundle", policy=fb.policy, example=x[:2],
                           measure=False))
    res = b.program(1).infer(x.numpy(), b.policy)
    np.testing.assert_array_equal(res.predictions, expected.predictions.numpy())


def test_calibrated_fallback_reaches_the_reference_on_calibration(setup):
    ds, _, _, lenet, pipe = setup
    model = cbnet.fallback_model(pipe, lenet, "original")
    calib = ds.calib.subset(300, seed=0)
    reference = float((lenet(calib.x).argmax(1) == calib.y).double().mean())
    fb = cbnet.calibrate_fallback(model, calib, reference)
    assert 0.0 <= fb.threshold <= 1.0
    result = model.infer(calib.x, fb.policy)
    assert float((result.predictions == calib.y).double().mean()) >= reference - 1e-9
    assert fb.calib_accuracy >= reference - 1e-9
    assert abs(sum(fb.calib_exit_fractions) - 1) < 1e-6
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        cbnet.calibrate_fallback(model, calib, reference, thresholds=[0.5, 2.0])
    assert fb.guarded is None and fb.calib_gain_low_pt is None


def test_guarded_fallback_holds_the_reference_with_confidence(setup):
    from splitexit.calibration import paired_drop_ci

    ds, _, _, lenet, pipe = setup
    model = cbnet.fallback_model(pipe, lenet, "original")
    calib = ds.calib.subset(300, seed=0)
    with torch.no_grad():
        ref_pred = lenet(calib.x).argmax(1)
    reference = float((ref_pred == calib.y).double().mean())
    point = cbnet.calibrate_fallback(model, calib, reference)
    fb = cbnet.calibrate_fallback(model, calib, reference, reference=ref_pred)
    # everything falling back to LeNet on the original image is LeNet: a gain of exactly 0,
    # so a threshold always clears the bound, at a cost of no less than the point target's
    assert fb.guarded is True and fb.calib_gain_low_pt >= -1e-9
    assert fb.threshold >= point.threshold and fb.calib_accuracy >= reference - 1e-9
    pred = model.infer(calib.x, fb.policy).predictions
    _, _, high = paired_drop_ci(ref_pred == calib.y, pred == calib.y, 1.645)
    assert -high == pytest.approx(fb.calib_gain_low_pt)
    assert fb.calib_exit_fractions[1] >= point.calib_exit_fractions[1]
    with pytest.raises(InputError, match="one predicted class per calibration image"):
        cbnet.calibrate_fallback(model, calib, reference, reference=ref_pred[:10])
    with pytest.raises(InputError, match="normal quantile"):
        cbnet.calibrate_fallback(model, calib, reference, reference=ref_pred, z=-1.0)


def test_select_fastest_respects_the_accuracy_floor(setup):
    ds, _, _, lenet, pipe = setup
    calib = ds.calib.subset(200, seed=0)
    candidates = {"cbnet": pipe, "folded": cbnet.fold_pipeline(pipe), "lenet": lenet}
    sel = select_fastest(candidates, calib, 0.0, samples=50)
    assert sel.chosen == min(sel.table, key=lambda r: r["onnx_latency_ms"])["candidate"]
    lenet_acc = next(r["calib_accuracy"] for r in sel.table if r["candidate"] == "lenet")
    best = select_fastest(candidates, calib, lenet_acc, samples=20)
    assert all(r["calib_accuracy"] >= lenet_acc for r in best.table if r["chosen"])
    strict = select_fastest(candidates, calib, 1.0, samples=20)
    assert strict.chosen is None or next(
        r["calib_accuracy"] for r in strict.table if r["chosen"]) == 1.0
    with pytest.raises(InputError, match="fraction"):
        select_fastest(candidates, calib, 89.0)


def test_select_fastest_times_in_warm_chunks(setup, tmp_path):
    """The calibration timing can run each candidate warm over whole groups of images, as the
    test timing does; every image is still timed once per candidate."""
    from splitexit.cbnet.search import onnx_latency

    ds, _, _, lenet, pipe = setup
    calib = ds.calib.subset(120, seed=0)
    candidates = {"cbnet": pipe, "folded": cbnet.fold_pipeline(pipe), "lenet": lenet}
    lat = onnx_latency(candidates, calib.x[:40], tmp_path, chunks=4)
    assert set(lat) == set(candidates)
    assert all(v["samples"] == 40 and v["mean_ms"] > 0 for v in lat.values())
    sel = select_fastest(candidates, calib, 0.0, samples=40, chunks=4)
    assert sel.chosen == min(sel.table, key=lambda r: r["onnx_latency_ms"])["candidate"]


def test_select_fastest_with_a_reference_needs_confidence(setup):
    ds, _, _, lenet, pipe = setup
    calib = ds.calib.subset(200, seed=0)
    candidates = {"cbnet": pipe, "lenet": lenet}
    with torch.no_grad():
        ref = lenet(calib.x).argmax(1)
    floor = float((ref == calib.y).double().mean())
    sel = select_fastest(candidates, calib, floor, samples=20, reference=ref)
    row = next(r for r in sel.table if r["candidate"] == "lenet")
    # the reference against itself: no gain, and a zero-width interval
    assert row["gain_pt"] == 0 and row["gain_low_pt"] == 0
    assert row["meets_accuracy_with_confidence"]
    for r in sel.table:
        assert r["meets_accuracy_with_confidence"] == (r["meets_accuracy"]
                                                       and r["gain_low_pt"] >= 0)
    assert sel.guarded is True and next(r for r in sel.table if r["chosen"])[
        "meets_accuracy_with_confidence"]
    with pytest.raises(InputError, match="one predicted class per calibration image"):
        select_fastest(candidates, calib, floor, samples=5, reference=ref[:10])
    with pytest.raises(InputError, match="quantile"):
        select_fastest(candidates, calib, floor, samples=5, reference=ref, z=-1.0)


def test_distilled_converter_learns_the_teacher(setup):
    ds, data, _, _, pipe = setup
    student = ConverterSpec("s", hidden=(16,), distilled=True).build(ds.input_shape)
    with torch_threads(1):
        h = cbnet.distill_converter(student, pipe.converter, data.x, epochs=3, lr=3e-3,
                                    batch_size=32, progress=False)
    assert h.loss[-1] < 0.7 * h.loss[0]
    with pytest.raises(InputError, match="student converter outputs"):
        bad = cbnet.ConvertingAutoencoder((1, 28, 28), "fc", (8,), output="linear")
        bad.net[-1] = nn.Unflatten(1, (4, 14, 14))
        cbnet.distill_converter(bad, pipe.converter, data.x[:8], epochs=1)


def test_joint_distillation_pulls_the_pipeline_towards_the_teacher(setup):
    import copy

    import torch.nn.functional as F

    from splitexit.cbnet.search import finetune_joint

    ds, data, _, lenet, pipe = setup
    student = copy.deepcopy(pipe)
    x = data.x[:256]

    def kl():
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student.eval()(x) / 4, 1),
                                  F.softmax(lenet(x) / 4, 1), reduction="batchmean"))

    before = kl()
    with torch_threads(1):  # alpha=1: the teacher's soft labels only
        finetune_joint(student, data, epochs=2, lr=2e-3, batch_size=32, teacher=lenet,
                       alpha=1.0, progress=False)
    assert kl() < 0.7 * before
    spec = ConverterSpec("kd", hidden=(16,), joint_epochs=4, joint_teacher="published")
    assert spec.key() == "fc_h16_linear_j4_kd-published"  # cached apart from plain joint runs
    short = ConverterSpec("short", kind="convfc", hidden=(24,), channels=(8, 16),
                          converter_epochs=5, joint_epochs=10, joint_teacher="control")
    assert short.key() == "convfc_h24_linear_c8-16_e5_j10_kd-control"
    one = ConverterSpec("one conv", kind="stridefc", hidden=(24,), channels=(16,))
    assert one.key() == "stridefc_h24_linear_c16"  # channels keyed for every conv encoder
    with pytest.raises(InputError, match="temperature"):
        finetune_joint(copy.deepcopy(pipe), data, epochs=1, teacher=lenet, temperature=0.0)
    with pytest.raises(InputError, match="alpha"):
        finetune_joint(copy.deepcopy(pipe), data, epochs=1, teacher=lenet, alpha=1.5)


def test_pareto_front():
    pts = [(1.0, 0.9), (2.0, 0.95), (1.5, 0.85), (0.5, 0.8), (3.0, 0.94)]
    assert pareto_front(pts) == [3, 0, 1]


def test_cli_exports_a_folded_pipeline(setup, tmp_path, capsys):
    from splitexit.cli import main

    ds, _, _, _, pipe = setup
    cbnet.save_pipeline(pipe, tmp_path / "cb")
    loaded = cbnet.load_pipeline(tmp_path / "cb")
    assert loaded.converter.output == "linear"
    assert main(["cbnet", "export", str(tmp_path / "cb"), "--out", str(tmp_path / "f.onnx"),
                 "--fold"]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    ops = [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node]
    assert ops.count("Conv") == 1
    got = cbnet.OnnxPipeline(tmp_path / "f.onnx").run(ds.test.x[:16])
    with torch.no_grad():
        np.testing.assert_allclose(got, pipe(ds.test.x[:16]).numpy(), atol=1e-4, rtol=1e-4)


def test_random_shift_translates_each_image_and_rejects_bad_shifts():
    from splitexit.cbnet.search import random_shift

    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 3, 4] = 1.0  # one bright pixel per image
    torch.manual_seed(0)
    out = random_shift(x, 2)
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))
    where = out[:, 0].flatten(1).argmax(1)
    dy, dx = where // 8 - 3, where % 8 - 4
    assert dy.abs().max() <= 2 and dx.abs().max() <= 2
    assert len({(int(a), int(b)) for a, b in zip(dy, dx)}) > 10  # offsets differ per image
    edge = torch.zeros(1, 1, 4, 4)
    edge[0, 0, 0, 0] = 1.0
    seen = {float(random_shift(edge, 1).sum()) for _ in range(50)}
    assert seen == {0.0, 1.0}  # shifted off the border: zero fill, nothing wraps around
    assert random_shift(x, 0) is x
    for bad in (-1, 8, 1.5, True):
        with pytest.raises(InputError, match="whole number of pixels"):
            random_shift(x, bad)
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        random_shift(x[0], 1)


def test_joint_finetuning_with_shifts_and_a_final_exit_teacher(setup):
    import copy

    from splitexit.cbnet.search import FinalExit, finetune_joint

    ds, data, branchy, _, pipe = setup
    student = copy.deepcopy(pipe)
    teacher = FinalExit(branchy)
    with torch.no_grad():
        assert torch.equal(teacher(data.x[:4]), branchy(data.x[:4])[-1])
    with torch_threads(1):
        h = finetune_joint(student, data.subset(256, seed=0), epochs=2, lr=2e-3, batch_size=32,
                           teacher=teacher, shift=2, weight_decay=5e-4, progress=False)
    assert h.loss[-1] < h.loss[0]
    changed = [not torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                     pipe.state_dict().values())]
    assert all(changed)  # converter and classifier both trained
    with pytest.raises(InputError, match="whole number of pixels"):
        finetune_joint(copy.deepcopy(pipe), data, epochs=1, shift=-2)
    with pytest.raises(InputError, match="weight_decay"):
        finetune_joint(copy.deepcopy(pipe), data, epochs=1, weight_decay=-1e-4)
    spec = ConverterSpec("r", hidden=(64, 32), joint_epochs=10, joint_teacher="control",
                         joint_shift=2, joint_weight_decay=5e-4)
    assert spec.key() == "fc_h64-32_linear_j10_kd-control_shift2_wd0.0005"
