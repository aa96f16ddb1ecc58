"""GFNet's calibration set and the rule that picks the every-step variant judged: the held-out
canvases share nothing with the registered set's splits, the calibration outputs are cached
and read back as computed, and the rule takes the fastest variant whose guard holds."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest
import torch

from splitexit import InputError
from splitexit.data.splits import Dataset, Split
from splitexit.glance import GFNet, GFNetConfig, full_resolution_backbone

TINY = GFNetConfig(image=32, glance=8, patch=16, stride=8, steps=2, channels=(4, 8),
                   strides=(2, 2), hidden=16, num_classes=4)


@pytest.mark.slow
def test_holdout_canvases_share_no_item_with_the_registered_set():
    from splitexit.data.cluttered import (
        _fashion_canvases,
        _fashion_dir,
        _fashion_items,
        cluttered_fashion_holdout,
    )

    a = cluttered_fashion_holdout(40)
    assert a.x.shape == (40, 1, 160, 160) and a.x.dtype == np.uint8
    directory, source = _fashion_dir(None)
    train, test = _fashion_canvases(str(directory), source)
    assert not set(a.source_index.tolist()) & set(train.source_index.tolist())
    assert len(set(a.source_index.tolist())) == 40  # each unused image is one canvas's item
    (_, train_y), _ = _fashion_items(directory, source)
    assert np.array_equal(a.y, train_y[a.source_index])  # labels follow the items
    b = cluttered_fashion_holdout(40)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)  # deterministic
    with pytest.raises(InputError, match="at most 48000"):
        cluttered_fashion_holdout(48001)


def _tiny_setup(tmp_path, n=30):
    torch.manual_seed(0)
    net = GFNet(TINY).eval()
    backbone = full_resolution_backbone(TINY).eval()
    g = torch.Generator().manual_seed(1)
    split = Split(torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))
    ds = Dataset("tiny", split, split, split, 4, (1, 32, 32), list("abcd"))
    args = argparse.Namespace(out=str(tmp_path), holdout_calib=0, dataset="tiny")
    return net, backbone, ds, args


def _settings(seed=0) -> dict:
    return {"dataset": "tiny", "calib_fraction": 0.5, "seed": seed, "train_samples": None,
            "backbone_epochs": 1, "config": TINY.to_json(),
            "schedule": {"lr": 1e-3, "batch_size": 8, "seed": seed}}


def test_calibration_outputs_are_computed_then_read_back_from_the_cache(tmp_path):
    from benchmarks.gfnet import calibration_outputs

    net, backbone, ds, args = _tiny_setup(tmp_path)
    models = {"learned": net.multiexit("learned"), "centre": net.multiexit("centre")}
    s = _settings()
    first = calibration_outputs(args, ds, s, None, backbone, models)
    with torch.no_grad():
        want = models["centre"](ds.calib.x)
        right = backbone(ds.calib.x).argmax(1) == ds.calib.y
    assert torch.equal(first["y"], ds.calib.y) and torch.equal(first["backbone"], right)
    assert len(first["logits"]["centre"]) == TINY.steps + 1
    for got, ref in zip(first["logits"]["centre"], want):
        torch.testing.assert_close(got, ref)
    assert len(list((tmp_path / "models").glob("calib-*.safetensors"))) == 1
    with torch.no_grad():  # a changed model would give other logits: the cache must answer
        net.classifier.weight.mul_(3)
    again = calibration_outputs(args, ds, s, None, backbone, models)
    for got, ref in zip(again["logits"]["learned"], first["logits"]["learned"]):
        assert torch.equal(got, ref)
    other = calibration_outputs(args, ds, _settings(seed=1), None, backbone, models)
    assert not torch.equal(other["logits"]["learned"][0], first["logits"]["learned"][0])
    with pytest.raises(SystemExit, match="holdout-calib 0"):
        calibration_outputs(replace_args(args, holdout_calib=5), ds, s, None, backbone, models)


def replace_args(args, **changes):
    return argparse.Namespace(**(vars(args) | changes))


def _variant(name, owner, y, wrong):
    """A variant whose last step is right except on the samples in ``wrong``."""
    logits = torch.nn.functional.one_hot(y, 4).float() * 5
    logits[wrong] = torch.nn.functional.one_hot((y[wrong] + 1) % 4, 4).float() * 5
    return name, owner, [logits]


def test_variant_rule_takes_the_fastest_variant_whose_guard_holds():
    from benchmarks.gfnet import _choice_note, _choose_variant

    net = GFNet(TINY)
    small = GFNet(replace(TINY, encoder_channels=(2, 8), encoder_strides=(2, 2)))
    n = 4000
    y = torch.arange(n) % 4
    ref = torch.ones(n, dtype=torch.bool)
    ref[:200] = False  # the backbone is wrong on 200 samples
    variants = [_variant("same", net, y, torch.arange(200)),           # drop 0: bound 0
                _variant("close", small, y, torch.arange(210)),        # drop 0.25 pt
                _variant("worse", small, y, torch.arange(300))]        # drop 2.5 pt
    rows = [{"method": m, "mean_macs": macs} for m, macs in
            (("same", 3.0), ("close", 2.0), ("worse", 1.0))]
    latency = {"same": {"calib_onnx_latency_ratio": 0.5, "calib_onnx_latency_p50_ratio": 0.5},
               "close": {"calib_onnx_latency_ratio": 0.3, "calib_onnx_latency_p50_ratio": 0.45},
               "worse": {"calib_onnx_latency_ratio": 0.1, "calib_onnx_latency_p50_ratio": 0.1}}
    choice = {e["method"]: e for e in _choose_variant(variants, rows, y, ref, latency)}
    assert [m for m, e in choice.items() if e["guard_met"]] == ["same", "close"]
    assert choice["close"]["chosen"] and not choice["worse"]["chosen"]
    assert choice["close"]["cnn_channels"] == [2, 8]
    note = _choice_note(list(choice.values()))
    assert "2 of 3 hold 0.5 pt; judged: close" in note and "4000 canvases" in note
    # the worse of mean and median decides: a slow median loses to a faster one
    latency["close"]["calib_onnx_latency_p50_ratio"] = 0.55
    choice = {e["method"]: e for e in _choose_variant(variants, rows, y, ref, latency)}
    assert choice["same"]["chosen"]
    # none qualifies: the lowest upper bound, whatever its latency
    ref[:] = True
    choice = {e["method"]: e for e in _choose_variant(variants, rows, y, ref, latency)}
    assert not any(e["guard_met"] for e in choice.values())
    assert choice["same"]["chosen"]
    note = _choice_note(list(choice.values()))
    assert "None holds 0.5 pt" in note and "judged (the fallback, the lowest bound): same" in note
