"""GFNet trained with a knowledge-distillation term from a teacher (the full-resolution
backbone): the term is computed from the teacher's logits and weighted by alpha, training with
it runs on real canvases and pulls the steps towards the teacher, bad settings are refused,
and the benchmark's cache keys change only when the option is on."""

from __future__ import annotations

import math

import pytest
import torch

from splitexit import InputError
from splitexit.data.splits import Split
from splitexit.glance import (
    GFNet,
    GFNetConfig,
    GFNetSchedule,
    fit_gfnet,
    full_resolution_backbone,
    train_backbone,
    train_classifier_stages,
)
from splitexit.glance.fitting import batched_logits
from splitexit.training.bottlefit import softened_kl

#: a tiny GFNet on the registered 160x160 canvases: a 4x4 grid of 40-pixel patches
SMALL = GFNetConfig(image=160, glance=40, patch=40, stride=40, steps=2, channels=(4, 8),
                    strides=(2, 2), hidden=16, num_classes=10, localiser=4)


@pytest.fixture(scope="module")
def canvases():
    """96 training canvases of cluttered-mnist (real data) and a backbone trained on them."""
    from splitexit.data import load_dataset

    torch.set_num_threads(1)
    ds = load_dataset("cluttered-mnist", seed=0)
    train = ds.train.subset(96)
    torch.manual_seed(0)
    teacher = full_resolution_backbone(SMALL)
    train_backbone(teacher, train, 3, lr=5e-3, batch_size=32)
    return train, teacher


def _net(seed=0) -> GFNet:
    torch.manual_seed(seed)
    return GFNet(SMALL).eval()


@pytest.mark.slow
def test_the_teacher_term_is_its_softened_kl_weighted_by_alpha(canvases):
    train, teacher = canvases
    soft = batched_logits(teacher, train.x)
    losses = {}
    for alpha in (0.0, 1.0, 2.0):  # lr 0: the same weights and patches, only the loss differs
        log = train_classifier_stages(_net(), train, 1, lr=0.0, batch_size=32,
                                      teacher_logits=soft, kd_alpha=alpha, kd_temperature=3.0)
        losses[alpha] = log[-1]["loss"]
    kd = losses[1.0] - losses[0.0]
    assert kd > 1e-3  # the KL term is on and positive
    assert losses[2.0] - losses[0.0] == pytest.approx(2 * kd, rel=1e-4)
    # alpha 0 is the plain loss: the teacher's logits are not read
    plain = train_classifier_stages(_net(), train, 1, lr=0.0, batch_size=32)
    assert plain[-1]["loss"] == pytest.approx(losses[0.0], rel=1e-6)


@pytest.mark.slow
def test_fit_gfnet_with_the_teacher_trains_and_moves_towards_it(canvases):
    train, teacher = canvases
    soft = batched_logits(teacher, train.x)
    schedule = GFNetSchedule(classifier_epochs=3, policy_iterations=2, policy_batch=32,
                             finetune_epochs=1, batch_size=32, lr=5e-3)
    nets, logs = {}, {}
    for alpha in (0.0, 4.0):
        nets[alpha] = _net()
        logs[alpha] = fit_gfnet(nets[alpha], train, schedule, teacher=teacher, kd_alpha=alpha,
                                kd_temperature=2.0)
    stage1 = [e["loss"] for e in logs[4.0] if e["stage"] == "stage1-classifier"]
    assert len(stage1) == 3 and stage1[-1] < stage1[0]  # it trains
    assert any(e["stage"] == "stage2-ppo" for e in logs[4.0])  # PPO runs as before
    assert any(e["stage"] == "stage3-finetune" for e in logs[4.0])
    a, b = nets[0.0].state_dict(), nets[4.0].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the distilled GFNet's steps are closer to the teacher than the ones trained on labels only
    with torch.no_grad():
        gaps = {alpha: float(sum(softened_kl(lg, soft, 2.0)
                                 for lg in net.rollout(train.x, "learned")[0]))
                for alpha, net in nets.items()}
    assert gaps[4.0] < gaps[0.0]


def test_bad_distillation_settings_are_refused():
    torch.manual_seed(0)
    config = GFNetConfig(image=32, glance=8, patch=16, stride=8, steps=1, channels=(4, 8),
                         strides=(2, 2), hidden=16, num_classes=4)
    net = GFNet(config).eval()
    split = Split(torch.rand(8, 1, 32, 32), torch.zeros(8, dtype=torch.int64))
    soft = torch.zeros(8, 4)
    for alpha in (-0.5, math.nan, math.inf, True, "1"):
        with pytest.raises(InputError, match="kd_alpha"):
            train_classifier_stages(net, split, 1, teacher_logits=soft, kd_alpha=alpha)
    for temperature in (0.0, -2.0, math.inf):
        with pytest.raises(InputError, match="kd_temperature"):
            train_classifier_stages(net, split, 1, teacher_logits=soft, kd_alpha=1.0,
                                    kd_temperature=temperature)
    with pytest.raises(InputError, match="teacher's logits"):
        train_classifier_stages(net, split, 1, kd_alpha=1.0)  # no teacher
    with pytest.raises(InputError, match=r"shape \(8, 4\)"):
        train_classifier_stages(net, split, 1, teacher_logits=torch.zeros(8, 3), kd_alpha=1.0)
    with pytest.raises(InputError, match="teacher"):
        fit_gfnet(net, split, GFNetSchedule(classifier_epochs=1), kd_alpha=0.5)
    with pytest.raises(InputError, match="kd_temperature"):
        fit_gfnet(net, split, teacher=full_resolution_backbone(config), kd_alpha=0.5,
                  kd_temperature=0)


def test_the_benchmark_keys_change_only_with_distillation_on():
    from benchmarks import gfnet

    parser = gfnet.build_parser()
    plain = gfnet.settings(parser.parse_args(["--out", "x", "--kd-alpha", "0"]))
    assert "kd" not in plain  # every cache key written before the option stays valid
    kd = gfnet.settings(parser.parse_args(["--out", "x", "--kd-alpha", "0.5",
                                           "--kd-temperature", "3"]))
    derived = "localiser_distil"  # the stride-2 localiser: fitted to the stride-1 GFNet's
    assert {k: v for k, v in kd.items() if k != derived} == {
        k: v for k, v in plain.items() if k != derived} | {
        "kd": {"teacher": "full-resolution backbone", "alpha": 0.5, "temperature": 3.0}}
    # the backbone (the teacher) is the same model; the GFNets derived from this one follow it
    assert gfnet.backbone_settings(kd) == gfnet.backbone_settings(plain)
    assert gfnet._teacher_settings(kd)["kd"] == kd["kd"]
    assert kd[derived]["teacher"] == gfnet._key(gfnet._teacher_settings(kd))
    assert plain[derived]["teacher"] == gfnet._key(gfnet._teacher_settings(plain))
    assert kd[derived]["teacher"] != plain[derived]["teacher"]
    args = parser.parse_args(["--out", "x", "--kd-alpha", "0.5"])
    assert gfnet.student_settings(args, kd)["kd"] == kd["kd"]
    with pytest.raises(InputError, match="kd_alpha"):
        gfnet.settings(parser.parse_args(["--out", "x", "--kd-alpha", "-1"]))
