"""Multi-exit segmentation: generated canvases, dense heads and exits on the one exit loop
(real exits == offline replay), mIoU, the threshold sweep, the head search, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitexit import create_multiexit
from splitexit.cost import cost_table
from splitexit.data.canvas import FOREGROUND_LEVEL, DenseSplit, create_canvases
from splitexit.errors import InputError
from splitexit.multiexit import MultiExitModel, simulate_exits
from splitexit.policies import create_policy
from splitexit.program import lower
from splitexit.segmentation import (
    MeanConfidence,
    PixelShare,
    assemble,
    choose_policy,
    create_dense_head,
    create_segmenter,
    dense_oracle,
    dense_sweep,
    list_dense_heads,
    miou,
    policy_score,
    sample_confusions,
    search_heads,
    segmentation_metrics,
    segmenter_config,
    summarize_candidates,
    summarize_exits,
    train_candidates,
    train_joint,
    train_two_stage,
)
from splitexit.zoo import list_models

pytestmark = pytest.mark.usefixtures("one_thread_module")

SHAPE = (1, 16, 16)
CLASSES = 4  # background + 3 item classes


def _items(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Small item images whose class shows in their pattern (so a net can learn it)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = np.zeros((n, 8, 8), dtype=np.uint8)
    for i, k in enumerate(labels):
        images[i, 1:7, 1:7] = 120 + 40 * k
        if k == 1:
            images[i, 3:5, :] = 0
        if k == 2:
            images[i, :, 3:5] = 0
    return images, labels


@pytest.fixture(scope="module")
def split() -> DenseSplit:
    x, y = create_canvases(*_items(), 48, seed=1, size=16, max_items=2)
    return DenseSplit(torch.from_numpy(x).float() / 255, torch.from_numpy(y))


@pytest.fixture(scope="module")
def model(split) -> MultiExitModel:
    torch.manual_seed(0)
    m = create_segmenter(CLASSES, SHAPE, [{"cut": "down", "kind": "conv"},
                                          {"cut": "block1", "kind": "pointwise"}],
                         model_kwargs={"widths": (4, 8, 8), "dilations": (1, 2, 1)})
    train_two_stage(m, split, 2, 2, progress=False, batch_size=16)
    return m.eval()


# data ---------------------------------------------------------------------------------------
def test_canvases_are_deterministic_and_labels_match_pixels():
    items, labels = _items()
    x1, y1 = create_canvases(items, labels, 30, seed=5, size=24, max_items=3)
    x2, y2 = create_canvases(items, labels, 30, seed=5, size=24, max_items=3)
    x3, _ = create_canvases(items, labels, 30, seed=6, size=24, max_items=3)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    assert x1.shape == (30, 1, 24, 24) and y1.shape == (30, 24, 24) and y1.dtype == np.int64
    # a pixel is labelled as an item exactly where an item is visible, with its class + 1
    assert np.array_equal(y1 > 0, x1[:, 0] >= FOREGROUND_LEVEL)
    assert set(np.unique(y1)) <= {0, 1, 2, 3} and (y1 > 0).any(axis=(1, 2)).all()
    counts = [len(np.unique(m)) - 1 for m in y1]
    assert max(counts) >= 2  # several items (of different classes) on some canvases


def test_canvas_bad_input():
    items, labels = _items()
    with pytest.raises(InputError, match="cannot hold 8x8 items"):
        create_canvases(items, labels, 3, seed=0, size=6)
    with pytest.raises(InputError, match="uint8 images"):
        create_canvases(items.astype(np.float32), labels, 3, seed=0)


def test_label_map_must_match_the_images():
    x = torch.rand(4, 1, 16, 16)
    with pytest.raises(InputError, match=r"do not match images of shape \(4, 1, 16, 16\)"):
        DenseSplit(x, torch.zeros(4, 16, 15, dtype=torch.long))
    with pytest.raises(InputError, match="int64"):
        DenseSplit(x, torch.zeros(4, 16, 16))
    split = DenseSplit(x, torch.zeros(4, 16, 16, dtype=torch.long))
    assert len(split.subset(2, seed=1)) == 2


@pytest.mark.slow
def test_registered_canvas_dataset():
    from splitexit.data import load_dataset

    ds = load_dataset("mnist-canvas", seed=0)
    assert ds.input_shape == (1, 64, 64) and ds.num_classes == 11
    assert ds.class_names[0] == "background" and len(ds.test) == 2000
    assert len(ds.train) + len(ds.calib) == 10_000 and len(ds.calib) == 1000
    assert ds.train.y.shape == (len(ds.train), 64, 64)
    again = load_dataset("mnist-canvas", seed=0)
    assert torch.equal(again.test.y, ds.test.y) and again.train.x is not ds.train.x
    assert not torch.equal(load_dataset("mnist-canvas", seed=1).calib.x[:50], ds.calib.x[:50])


# metrics ------------------------------------------------------------------------------------
def test_miou_on_a_hand_built_case():
    labels = torch.tensor([[[0, 0], [1, 1]]])
    predictions = torch.tensor([[[0, 1], [1, 1]]])
    # class 0: hit 1, union 2 -> 0.5; class 1: hit 2, union 3 -> 2/3; class 2 absent: left out
    got = segmentation_metrics(predictions, labels, 3)
    assert got["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert got["pixel_accuracy"] == pytest.approx(0.75)
    assert got["class_iou"][2] is None
    per = sample_confusions(predictions.repeat(2, 1, 1), labels.repeat(2, 1, 1), 3)
    assert per.shape == (2, 3, 3) and float(miou(per.sum(0))) == pytest.approx(got["miou"])
    with pytest.raises(InputError, match="differ in shape"):
        segmentation_metrics(predictions, labels[:, :1], 3)


# model --------------------------------------------------------------------------------------
def test_zoo_segnet_with_dense_heads():
    assert list_models(task="segmentation") == ["segnet"]
    assert "segnet" not in list_models(task="classification")
    model = create_multiexit("segnet", 5, SHAPE, widths=(4, 8, 8)).eval()
    outs = model(torch.rand(3, *SHAPE))
    assert [tuple(o.shape) for o in outs] == [(3, 5, 16, 16)] * model.num_exits
    with pytest.raises(InputError, match="unknown dense head type 'linear'"):
        create_multiexit("segnet", 5, SHAPE, head="linear")


def test_image_not_divisible_is_refused():
    with pytest.raises(InputError, match="divisible by 4"):
        create_multiexit("segnet", 5, (1, 18, 16))


def test_head_at_a_cut_that_cannot_be_upsampled():
    with pytest.raises(InputError, match=r"cannot be upsampled to the output \(16, 16\)"):
        create_dense_head("conv", (8, 6, 6), 3, out_size=(16, 16))
    with pytest.raises(InputError, match="needs a \\(C, H, W\\) feature map"):
        create_dense_head("pointwise", (8,), 3, out_size=(16, 16))
    with pytest.raises(InputError, match="out_size"):
        create_dense_head("conv", (8, 4, 4), 3)
    backbone = create_multiexit("segnet", 3, SHAPE, exits=[], widths=(4, 8, 8)).backbone
    with pytest.raises(InputError, match="per-pixel logits"):  # a classification head
        from splitexit.heads import create_head

        MultiExitModel(backbone, {"down": create_head("linear", (8, 4, 4), 3)}, SHAPE,
                       dense=True)


def test_guided_segnet_carries_the_image_to_every_head():
    from splitexit.segmentation.heads import GUIDE_GAIN

    torch.manual_seed(0)
    kwargs = {"widths": (4, 8, 8), "dilations": (1, 2), "guided": True, "reduction": 8}
    model = create_segmenter(CLASSES, SHAPE, [{"cut": "down", "kind": "conv", "depth": 2}],
                             model_kwargs=kwargs).eval()
    x = torch.rand(3, *SHAPE)
    # the cuts hold the image space-to-depth'd by 8 (64 channels at 2x2), then the features
    assert model.backbone.payload_shapes(x) == {"down": [(64 + 8, 2, 2)],
                                                "block1": [(64 + 8, 2, 2)]}
    assert "stem" not in model.backbone.cut_names
    with torch.no_grad():
        payloads = [model.backbone.stages[0](x)]
        payloads.append(model.backbone.stages[1](payloads[0]))
        for p in payloads:
            torch.testing.assert_close(p[:, :64], torch.nn.functional.pixel_unshuffle(x, 8))
        head = model.heads[0]
        assert head.config()["guide"] == 1 and head.guide_channels == 64 and head.features == 8
        # the head adds a per-pixel map of the full-resolution image to the upsampled scores
        want = head.upsample(head.body(payloads[0][:, 64:])) + head.refine(x * GUIDE_GAIN)
        torch.testing.assert_close(head(payloads[0]), want)
        outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(3, CLASSES, 16, 16)] * 2
    rebuilt = create_segmenter(**segmenter_config(model))
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x)[0], outs[0])
    # the final classifier as a dense head (with the guide)
    headed = create_segmenter(CLASSES, SHAPE, model_kwargs={
        **kwargs, "classifier": {"kind": "conv", "depth": 2, "dilation": 2}}).eval()
    assert headed.backbone.stages[-1].module[-1].config()["guide"] == 1
    with torch.no_grad():
        assert tuple(headed(x)[0].shape) == (3, CLASSES, 16, 16)
    with pytest.raises(InputError, match="classifier is a dense head"):
        create_segmenter(CLASSES, SHAPE, model_kwargs={**kwargs, "classifier": {"depth": 2}})
    # a guide the cut does not carry, and a reduction the backbone does not have
    with pytest.raises(InputError, match="cannot carry a guide"):
        create_dense_head("conv", (8, 4, 4), 3, out_size=(16, 16), guide=1)
    with pytest.raises(InputError, match="reduction is 4 or 8"):
        create_segmenter(CLASSES, SHAPE, model_kwargs={"reduction": 2})
    with pytest.raises(InputError, match="divisible by 8"):
        create_segmenter(CLASSES, (1, 20, 20), model_kwargs={"reduction": 8})


def test_guided_model_learns_boundaries_and_runs_on_onnx_runtime(split, tmp_path):
    torch.manual_seed(0)
    kwargs = {"widths": (4, 8, 8), "dilations": (1, 2), "guided": True}
    model = create_segmenter(CLASSES, SHAPE, [{"cut": "down", "kind": "pointwise"}],
                             model_kwargs=kwargs)
    train_joint(model, split, 10, progress=False, batch_size=16, lr=3e-2)
    model.eval()
    with torch.no_grad():
        logits = model(split.x)
    # the guide gives pixel-exact foreground at the 1/4-resolution exit: background is
    # predicted where (and only where) the canvas is dark
    dark = split.x[:, 0] < FOREGROUND_LEVEL / 255
    background = logits[0].argmax(1) == 0
    assert float((background == dark).double().mean()) > 0.97
    policy = MeanConfidence(float(MeanConfidence().statistic(logits[0]).median()))
    program = lower(model, policy).on_onnx_runtime(tmp_path)
    got, ref = program.infer(split.x.numpy(), policy), model.infer(split.x, policy)
    np.testing.assert_array_equal(got.exit_index, ref.exit_index.numpy())
    assert (got.predictions == ref.predictions.numpy()).mean() > 0.999


@pytest.mark.parametrize("policy_cls", [PixelShare, MeanConfidence])
@pytest.mark.parametrize(("batch", "stride"), [(1, 1), (7, 1), (48, 1), (1, 4), (48, 4)])
def test_real_exits_equal_the_offline_replay(model, split, policy_cls, batch, stride):
    x = split.x[:batch]
    with torch.no_grad():
        logits = model(split.x)
    # PixelShare's pixel threshold near the median pixel confidence (shares spread out),
    # halfway between two pixels' confidences (no pixel sits on it)
    confidence = logits[0].softmax(1).amax(1).flatten().unique()
    middle = len(confidence) // 2
    pixel = float(confidence[middle - 1: middle + 1].double().mean())
    base = policy_cls(0.5, stride=stride,
                      **({"pixel_threshold": pixel} if policy_cls is PixelShare else {}))
    stats = sorted(set(base.statistic(logits[0]).tolist()))
    # halfway between two samples' statistics: no sample sits on the threshold
    k = max(1, len(stats) // 2)
    policy = base.with_threshold((stats[k - 1] + stats[min(k, len(stats) - 1)]) / 2)
    ref = simulate_exits([lg[:batch] for lg in logits], policy)
    got = model.infer(x, policy)
    assert torch.equal(got.exit_index, ref.exit_index)
    assert torch.equal(got.predictions, ref.predictions)
    assert got.predictions.shape == (batch, 16, 16)
    if batch == 48:
        assert len(set(got.exit_index.tolist())) >= 2  # the batch really shrank
    # the same decisions from the lowered program and on numpy arrays
    assert torch.equal(lower(model, policy).infer(x).exit_index, got.exit_index)
    np.testing.assert_allclose(policy.statistic(logits[0][:batch].numpy()),
                               policy.statistic(logits[0][:batch]).numpy(), atol=1e-6)
    np.testing.assert_array_equal(model.simulate([lg[:batch].numpy() for lg in logits],
                                                 policy).exit_index, ref.exit_index.numpy())


def test_policies_are_registered_and_checked():
    p = create_policy({"name": "pixelshare", "threshold": 0.7, "pixel_threshold": 0.8})
    assert p == PixelShare(0.7, pixel_threshold=0.8) and create_policy(p.config()) == p
    with pytest.raises(InputError, match="pixel_threshold"):
        PixelShare(0.5, pixel_threshold=1.5)
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 0] = 10.0  # sample 0 sure everywhere, sample 1 uniform
    assert PixelShare(0.5, pixel_threshold=0.9).statistic(logits).tolist() == [1.0, 0.0]
    assert MeanConfidence().statistic(logits)[1] == pytest.approx(1 / 3)
    # stride s reads rows and columns s // 2, s // 2 + s, ...: one pixel per s x s block
    strided = MeanConfidence(0.5, stride=2)
    assert create_policy(strided.config()) == strided and MeanConfidence().stride == 1
    z = torch.randn(3, 5, 8, 8)
    assert torch.allclose(strided.statistic(z), MeanConfidence().statistic(z[:, :, 1::2, 1::2]))
    np.testing.assert_allclose(strided.statistic(z.numpy()), strided.statistic(z).numpy(),
                               atol=1e-6)
    share = PixelShare(0.5, pixel_threshold=0.4, stride=4)
    assert torch.equal(share.statistic(z), PixelShare(0.5, pixel_threshold=0.4).statistic(
        z[:, :, 2::4, 2::4]))
    assert not torch.equal(strided.statistic(z), MeanConfidence().statistic(z))
    for bad in (0, 2.0, True):
        with pytest.raises(InputError, match="stride"):
            MeanConfidence(0.5, stride=bad)
    with pytest.raises(InputError, match="use a smaller stride"):
        MeanConfidence(0.5, stride=8).statistic(torch.zeros(1, 3, 4, 4))


def test_sweep_replays_the_policy_and_the_oracle_bounds_it(model, split):
    policy = PixelShare(0.5, pixel_threshold=0.6)
    summary = summarize_exits(model, split.x, split.y, CLASSES, [policy], batch_size=20)
    macs = cost_table(model, split.x[:2], measure=False).exit_macs
    points = dense_sweep(summary, macs, policy, num=12)
    with torch.no_grad():
        logits = model(split.x)
    for point in points[::3]:
        replay = simulate_exits(logits, point.policy)
        expected = segmentation_metrics(replay.predictions, split.y, CLASSES)
        assert point.accuracy == pytest.approx(expected["miou"])
        assert point.pixel_accuracy == pytest.approx(expected["pixel_accuracy"])
        fractions = torch.bincount(replay.exit_index, minlength=3).double() / len(split.x)
        assert point.exit_fractions == pytest.approx(fractions.tolist())
    oracle = dense_oracle(summary, macs)
    assert oracle["miou"] >= max(summary.exit_miou()) - 1e-9
    assert oracle["mean_macs"] <= macs[-1]
    with pytest.raises(InputError, match="dense"):  # per-sample accuracy does not apply
        from splitexit.calibration import sweep

        sweep(logits, split.y, macs, policy)


def test_head_search_and_joint_training(model, split):
    candidates = [{"cut": "down", "kind": "pointwise"}, {"cut": "down", "kind": "conv"},
                  {"cut": "block1", "kind": "depthwise", "depth": 2}]
    bank = train_candidates(model, split, candidates, epochs=1, progress=False, batch_size=16)
    policies = [PixelShare(0.5, pixel_threshold=0.6), MeanConfidence(0.5)]
    heads, final = summarize_candidates(bank, model, split.x, split.y, CLASSES, policies)
    stages = [s.macs for s in cost_table(model.backbone, split.x[:2], measure=False).stages]
    reference = final.exit_miou()[0]
    result = search_heads(bank, heads, final, stages, policies, reference, max_drop=0.01)
    assert len(result.tried) == 5 * 2  # (2 + 1) * (1 + 1) - 1 configurations, 2 policies
    assert result.heads and all(h in candidates for h in result.heads)
    best = min((r for r in result.tried if r["meets_drop"]), key=lambda r: r["calib_mean_macs"],
               default=None)
    if best is not None:
        assert result.calib_mean_macs == pytest.approx(best["calib_mean_macs"])
    chosen = assemble(bank, model, result.heads)
    summary = summarize_exits(chosen, split.x, split.y, CLASSES, [result.policy])
    point = dense_sweep(summary, result.exit_macs, result.policy,
                        thresholds=[result.policy.threshold])[0]
    assert point.accuracy == pytest.approx(result.calib_miou)  # the assembled model agrees
    with pytest.raises(InputError, match="head budget"):
        search_heads(bank, heads, final, stages, policies, reference, head_budget=1.0)
    torch.manual_seed(0)
    joint = create_segmenter(CLASSES, SHAPE, result.heads,
                             model_kwargs={"widths": (4, 8, 8), "dilations": (1, 2, 1)})
    history = train_joint(joint, split, 1, progress=False, batch_size=16)
    assert len(history.loss) == 1 and np.isfinite(history.loss[0])
    assert sorted(list_dense_heads()) == ["conv", "depthwise", "pointwise"]


def test_each_models_policy_is_chosen_on_calibration_by_the_search_rule(model, split):
    policies = [MeanConfidence(0.5), MeanConfidence(0.5, stride=4),
                PixelShare(0.5, pixel_threshold=0.6), PixelShare(0.5, pixel_threshold=0.6,
                                                                 stride=4)]
    summary = summarize_exits(model, split.x, split.y, CLASSES, policies)
    macs = cost_table(model, split.x[:2], measure=False).exit_macs
    reference = summary.exit_miou()[-1]
    scores = [policy_score(dense_sweep(summary, macs, p), reference, 0.01)[0] for p in policies]
    point = choose_policy(summary, macs, policies, reference, max_drop=0.01)
    assert policy_score(dense_sweep(summary, macs, point.policy), reference, 0.01)[0] == min(
        scores)
    assert point.policy.threshold != 0.5  # its threshold comes from the sweep
    # any point meets a drop of 0.99: every policy's cheapest sends all samples to the first
    # exit (the same exits, MACs and mIoU), and the statistic reading fewer pixels wins the tie
    point = choose_policy(summary, macs, policies[:2], reference, max_drop=0.99)
    assert point.exit_fractions[0] == 1.0 and point.policy.stride == 4
    point = choose_policy(summary, macs, policies[:1], reference, max_drop=0.99)
    assert point.policy.stride == 1
    with pytest.raises(InputError, match="at least one policy"):
        choose_policy(summary, macs, [], reference)


def test_the_sweep_compares_thresholds_in_float32_like_the_runtimes(model, split):
    """A threshold above a sample's statistic in float64 but equal to it in float32 lets the
    sample leave in every runtime (float32 comparisons); the sweep's replay agrees."""
    policy = MeanConfidence(0.5)
    summary = summarize_exits(model, split.x, split.y, CLASSES, [policy])
    macs = cost_table(model, split.x[:2], measure=False).exit_macs
    with torch.no_grad():
        stat = policy.statistic(model(split.x)[0])
    s = float(stat.max())  # the most confident sample at the first exit
    t = s + float(np.spacing(np.float32(s))) / 4  # rounds to s in float32
    assert t > s and np.float32(t) == np.float32(s)
    chosen = policy.with_threshold(t)
    real = model.infer(split.x, chosen).exit_index
    assert int((real == 0).sum()) >= 1  # the float32 comparison lets it leave
    point = dense_sweep(summary, macs, chosen, thresholds=[t])[0]
    assert point.exit_fractions[0] == pytest.approx(float((real == 0).double().mean()))


def test_onnx_runtime_gives_the_same_exits(model, split, tmp_path):
    with torch.no_grad():
        logits = model(split.x)
    stats = sorted(set(MeanConfidence().statistic(logits[0]).tolist()))
    policy = MeanConfidence((stats[len(stats) // 2 - 1] + stats[len(stats) // 2]) / 2)
    program = lower(model, policy).on_onnx_runtime(tmp_path)
    got, ref = program.infer(split.x.numpy(), policy), model.infer(split.x, policy)
    np.testing.assert_array_equal(got.exit_index, ref.exit_index.numpy())
    assert (got.predictions == ref.predictions.numpy()).mean() > 0.999
    assert got.predictions.shape == (len(split.x), 16, 16)
    for a, b in zip(program.forward(split.x.numpy()), logits, strict=True):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4)


def _splitting_policy(model, split, policy_cls, stride: int):
    """Every exit's logits, and a ``policy_cls`` policy whose threshold at the first exit
    lies halfway between two samples' statistics (some samples leave there, some go on)."""
    with torch.no_grad():
        logits = model(split.x)
    # PixelShare's pixel threshold between the two middle pixel confidences (shares spread)
    confidence = logits[0].softmax(1).amax(1).flatten().unique()
    pixel = float(confidence[len(confidence) // 2 - 1: len(confidence) // 2 + 1].mean())
    kwargs = {"pixel_threshold": pixel} if policy_cls is PixelShare else {}
    base = policy_cls(0.5, stride=stride, **kwargs)
    stats = sorted(set(base.statistic(logits[0]).tolist()))
    middle = len(stats) // 2
    return logits, base.with_threshold((stats[middle - 1] + stats[middle]) / 2)


@pytest.mark.parametrize(("policy_cls", "stride"), [(MeanConfidence, 1), (PixelShare, 4)])
def test_the_batch1_exit_graph_decides_dense_exits_and_answers_the_class_map(
        model, split, policy_cls, stride, tmp_path):
    """The exit graph of a dense model (one ONNX Runtime call per sample, the pixel statistic
    in the graph): the same exits and class maps as PyTorch, sample by sample; its forced
    forms leave where they are forced to."""
    from splitexit.export import export_exit_graph
    from splitexit.policies import leave_at
    from splitexit.runtime.ort import OrtSession

    _, policy = _splitting_policy(model, split, policy_cls, stride)
    program = lower(model, policy, example=split.x[:2]).on_onnx_runtime(tmp_path,
                                                                       exit_graph=True)
    assert program.exit_graph.output_names == ["logits", "exit_index", "classes"]
    ref = model.infer(split.x, policy)
    got = [program.infer(split.x[i: i + 1].numpy(), policy) for i in range(len(split.x))]
    assert [int(r.exit_index[0]) for r in got] == ref.exit_index.tolist()
    assert len(set(ref.exit_index.tolist())) >= 2
    same = [np.array_equal(r.predictions[0], ref.predictions[i].numpy())
            for i, r in enumerate(got)]
    assert sum(same) >= len(same) - 1  # float rounding may move one pixel's tie at most
    assert got[0].predictions.shape == (1, 16, 16) and got[0].predictions.dtype == np.int64
    np.testing.assert_array_equal(got[0].predictions, got[0].logits.argmax(1))
    torch_in = program.infer(split.x[:1], policy)  # torch in, torch out, the same answer
    assert torch.equal(torch_in.predictions, torch.from_numpy(got[0].predictions))
    for k in range(model.num_exits):
        forced = leave_at(policy, k, model.num_exits)
        session = OrtSession(export_exit_graph(model, forced, tmp_path / f"leave{k}.onnx",
                                               example=split.x[:2]))
        exits = {int(session.run_arrays([split.x[i: i + 1].numpy()])[1][0])
                 for i in range(0, len(split.x), 6)}
        assert exits == {k}


@pytest.mark.parametrize(("policy_cls", "stride", "class_map"), [
    (MeanConfidence, 1, "graph"), (PixelShare, 1, "numpy"), (MeanConfidence, 4, "numpy"),
    (PixelShare, 4, "graph")])
def test_dense_steps_decide_and_answer_in_the_graphs(model, split, policy_cls, stride, class_map,
                                                     tmp_path):
    """The pieces in DenseSteps' lean batch-1 loop: the same exits and class maps as
    PyTorch, sample by sample, at every exit; the test and class map as graph nodes agree."""
    from splitexit.runtime.ort import OrtSession
    from splitexit.segmentation import DenseSteps
    from splitexit.segmentation.onnx_steps import exit_test_graph

    logits, policy = _splitting_policy(model, split, policy_cls, stride)
    steps = DenseSteps(model, policy, tmp_path, example=split.x[:2], class_map=class_map)
    ref = model.infer(split.x, policy)
    got = [steps.infer(split.x[i: i + 1].numpy()) for i in range(len(split.x))]
    assert [e for _, e in got] == ref.exit_index.tolist()
    assert len(set(ref.exit_index.tolist())) >= 2
    same = [bool((torch.from_numpy(c[0]) == ref.predictions[i]).all())
            for i, (c, _) in enumerate(got)]
    assert sum(same) >= len(same) - 1  # float rounding may move one pixel's tie at most
    assert got[0][0].shape == (1, 16, 16)
    assert got[0][0].dtype == (np.uint8 if class_map == "graph" else np.int64)
    graph = OrtSession(exit_test_graph(policy, 0, logits[0][:1].shape, tmp_path / "t.onnx"))
    for i in range(len(split.x)):
        z = logits[0][i: i + 1].numpy()
        classes, fire = graph.run_arrays([z])
        assert bool(fire[0]) == bool(policy.statistic(z)[0] >= policy.threshold)
        np.testing.assert_array_equal(classes, z.argmax(1))
    with pytest.raises(InputError, match="one float32 numpy sample"):
        steps.infer(split.x[:2].numpy())
    with pytest.raises(InputError, match="meanconf and pixelshare policies"):
        DenseSteps(model, create_policy("maxprob", threshold=0.5), tmp_path / "other")
    with pytest.raises(InputError, match="class_map is one of"):
        DenseSteps(model, policy, tmp_path / "other", class_map="torch")


def test_dense_predictions_are_the_first_maximum_like_argmax():
    from splitexit.runtime.arrays import NUMPY, TORCH

    logits = torch.randint(0, 3, (5, 4, 6, 6)).float()  # many ties
    assert torch.equal(TORCH.classes(logits), logits.argmax(1))
    np.testing.assert_array_equal(NUMPY.classes(logits.numpy()), logits.argmax(1).numpy())


def test_bundle_of_a_segmentation_model(model, split, tmp_path):
    from splitexit.deploy import bundle, load_bundle

    with torch.no_grad():
        stats = sorted(set(PixelShare(0.5, pixel_threshold=0.5).statistic(
            model(split.x)[0]).tolist()))
    policy = PixelShare((stats[len(stats) // 2 - 1] + stats[len(stats) // 2]) / 2,
                        pixel_threshold=0.5)
    bundle(model, tmp_path / "b", policy=policy, example=split.x)
    loaded = load_bundle(tmp_path / "b")
    assert loaded.policy == policy  # rebuilt by name from the manifest, no code imported
    program = loaded.program()
    ref = model.infer(split.x, policy).exit_index.numpy()
    got = program.infer(split.x.numpy(), loaded.policy)
    np.testing.assert_array_equal(got.exit_index, ref)
    # single samples take the bundle's exit graph (the pixel statistic in the graph)
    assert loaded.manifest["device"]["exit_graph"] == "device/exits.onnx"
    one = [int(program.infer(split.x[i: i + 1].numpy(), loaded.policy).exit_index[0])
           for i in range(len(split.x))]
    assert one == ref.tolist() and program._graph_matches


def test_a_segmenter_with_mixed_heads_round_trips_through_a_checkpoint(model, split, tmp_path):
    from splitexit import checkpoint

    x = split.x[:5]
    checkpoint.save(model, tmp_path / "mess")  # a conv head and a pointwise head
    loaded = checkpoint.load(tmp_path / "mess").eval()
    assert loaded.dense and [type(h).__name__ for h in loaded.heads] == [
        type(h).__name__ for h in model.heads]
    with torch.no_grad():
        for a, b in zip(loaded(x), model(x)):
            torch.testing.assert_close(a, b)
    kept = model.keep_exits([1])  # the block1 head and the final exit
    checkpoint.save(kept, tmp_path / "kept")
    again = checkpoint.load(tmp_path / "kept").eval()
    assert again.head_cuts == ["block1"]
    with torch.no_grad():
        for a, b in zip(again(x), kept(x)):
            torch.testing.assert_close(a, b)
    with pytest.raises(InputError, match="drop the model argument"):
        checkpoint.load(tmp_path / "mess", model="net.py:build")
