"""Every early-exit method of the catalogue on the real per-sample path, on real digits data.

Each method is trained for a few epochs, must beat chance clearly, and ``infer`` (exited
samples leave the batch) must agree exactly with ``simulate`` over ``forward``'s logits at
batch sizes 1, 7 and 256.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from splitexit.compress.binary import binarize, count_binary_layers
from splitexit.data import load_dataset
from splitexit.errors import InputError
from splitexit.heads import CascadingHead, ClassMeansHead, create_head
from splitexit.methods import early_view_model
from splitexit.policies import (
    AdditiveEnsemble,
    Entropy,
    GeometricEnsemble,
    MaxProb,
    create_policy,
    ensemble_logits,
)
from splitexit.training import (
    ZTW,
    Baseline,
    BoostNet,
    HeadsOnly,
    JointWeighted,
    QuickNets,
    SDNRamp,
    SelfDistillation,
    fit_class_means,
    fit_commitment,
    fit_ztw_ensemble,
    train,
)
from splitexit.zoo import create_model, create_multiexit

WIDTHS = (8, 16, 32)
FAST = {"batch_size": 32, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def digits(one_thread_module):
    return load_dataset("digits")


@pytest.fixture(scope="module")
def backbone(one_thread_module, digits):
    model = create_model("resnet8", 10, digits.input_shape, widths=WIDTHS)
    train(model, digits.train, Baseline(), epochs=5, lr=5e-3, progress=False)
    return model


def multi(digits, backbone, head, **head_kwargs):
    model = create_multiexit("resnet8", 10, digits.input_shape, head=head,
                             head_kwargs=head_kwargs or None, widths=WIDTHS)
    model.backbone.load_state_dict(backbone.state_dict())
    return model


def median_threshold(policy, logits):
    """A threshold at which roughly half the samples leave at the first exit."""
    decision = (ensemble_logits(policy, logits) if isinstance(policy, GeometricEnsemble)
                else logits)
    stat = policy.statistic(decision[0]).sort().values
    mid = len(stat) // 2  # halfway between two samples, so no sample sits on the threshold
    return float((stat[mid - 1] + stat[mid]) / 2)


def check_parity(model, x, policy):
    model.eval()
    logits = model.collect_logits(x)
    reference = model.simulate(logits, policy)
    assert len(set(reference.exit_index.tolist())) >= 2, "policy should split the samples"
    for batch_size in (1, 7, 256):
        n = min(len(x), 70 if batch_size < 256 else len(x))
        preds, exits = [], []
        for i in range(0, n, batch_size):
            r = model.infer(x[i: i + batch_size], policy)
            preds.append(r.predictions)
            exits.append(r.exit_index)
        assert torch.equal(torch.cat(preds), reference.predictions[:n]), batch_size
        assert torch.equal(torch.cat(exits), reference.exit_index[:n]), batch_size


def assert_learned(accs, final=0.8):
    """Every exit clearly above chance (0.1 on ten classes), the deepest one good."""
    assert min(accs) > 0.2 and max(accs) > final, accs


def accuracies(model, split):
    logits = model.collect_logits(split.x)
    return [float((lg.argmax(1) == split.y).double().mean()) for lg in logits]


def test_sdn_ramp(digits, backbone):
    model = multi(digits, backbone, "sdn")
    strategy = SDNRamp()
    weights = []
    strategy_on_epoch = strategy.on_epoch_start

    def spy(m, epoch, n):
        strategy_on_epoch(m, epoch, n)
        weights.append(strategy.current_weights())

    strategy.on_epoch_start = spy
    train(model, digits.train, strategy, epochs=3, lr=3e-3, **FAST)
    assert weights[0][0] == pytest.approx(0.01) and weights[-1][-1] == pytest.approx(0.75)
    assert_learned(accuracies(model, digits.test))
    check_parity(model, digits.test.x, MaxProb(threshold=0.0).with_threshold(
        median_threshold(MaxProb(), model.collect_logits(digits.test.x))))


def test_self_distillation(digits, backbone):
    model = multi(digits, backbone, "conv")
    train(model, digits.train, SelfDistillation(), epochs=3, lr=3e-3, **FAST)
    assert_learned(accuracies(model, digits.test))
    logits = model.collect_logits(digits.test.x)
    check_parity(model, digits.test.x, Entropy(threshold=median_threshold(Entropy(), logits)))


def test_ztw_cascade_and_ensemble(digits, backbone):
    model = multi(digits, backbone, "cascading")
    before = copy.deepcopy(model.backbone.state_dict())
    train(model, digits.train, ZTW(), epochs=4, lr=5e-3, **FAST)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "ZTW must freeze the backbone"
    assert any(float(h.previous.weight.detach().abs().sum()) > 0 for h in model.heads[1:])
    policy = fit_ztw_ensemble(model, digits.train, steps=100)
    assert len(policy.weights) == model.num_exits
    logits = model.collect_logits(digits.test.x)
    combined = ensemble_logits(policy, logits)
    assert float((combined[1].argmax(1) == digits.test.y).double().mean()) > 0.5
    policy = policy.with_threshold(median_threshold(policy, logits))
    check_parity(model, digits.test.x, policy)
    assert create_policy(policy.config()) == policy


def test_cascading_head_uses_previous_logits_per_sample(digits, backbone):
    model = multi(digits, backbone, "cascading").eval()
    for h in model.heads:
        torch.nn.init.normal_(h.previous.weight)
    x = digits.test.x[:9]
    full = model(x)
    # the second head's output depends on the first head's logits of the same sample only
    head, feats = model.heads[1], model.backbone.run(x, 0, model.exit_stages[1] + 1)
    assert torch.allclose(head(feats, full[0]), full[1], atol=1e-5)
    assert torch.allclose(head(feats[3:4], full[0][3:4]), full[1][3:4], atol=1e-5)


def test_boostnet(digits, backbone):
    model = multi(digits, backbone, "conv")
    train(model, digits.train, BoostNet(), epochs=3, lr=3e-3, **FAST)
    logits = model.collect_logits(digits.test.x)
    policy = AdditiveEnsemble(threshold=0.5)
    combined = ensemble_logits(policy, logits)
    accs = [float((c.argmax(1) == digits.test.y).double().mean()) for c in combined]
    assert_learned(accs)
    check_parity(model, digits.test.x,
                 policy.with_threshold(median_threshold(policy, logits)))


def test_boostnet_gradient_rescaling(digits, backbone):
    model = multi(digits, backbone, "linear")
    strategy = BoostNet(reweight=0.0)
    outs = strategy.exit_logits(model, digits.train.x[:16])
    plain = model(digits.train.x[:16])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs, plain))
    stem = model.backbone.stages[0].module.get_submodule("stem.0").weight
    grads = []
    for rescale in (True, False):
        model.zero_grad()
        s = BoostNet(reweight=0.0, rescale_gradients=rescale)
        F.cross_entropy(s.exit_logits(model, digits.train.x[:16])[0],
                        digits.train.y[:16]).backward()
        grads.append(stem.grad.clone())
    # the first exit's gradient reaches the stem scaled by 1 / num_exits
    assert torch.allclose(grads[0], grads[1] / model.num_exits, atol=1e-7)


def test_quicknets(digits, backbone):
    model = multi(digits, backbone, "conv")
    strategy = QuickNets()
    train(model, digits.train, strategy, epochs=8, lr=3e-3, **FAST)
    accs = accuracies(model, digits.test)
    assert_learned(accs, final=0.5)
    policy = fit_commitment(model, digits.calib, precision=0.95)
    assert len(policy.threshold) == len(model.heads)
    check_parity(model, digits.test.x, policy)


def test_quicknets_trains_one_segment_per_phase(digits):
    model = create_multiexit("resnet8", 10, digits.input_shape, head="linear", widths=WIDTHS)
    strategy = QuickNets()
    strategy.prepare(model)
    strategy.on_epoch_start(model, 5, 8)  # phase 2: stage 2 and head 2
    model.zero_grad()
    strategy.loss(model, digits.train.x[:32], digits.train.y[:32]).backward()
    grads = [any(p.grad is not None for p in s.parameters()) for s in model.backbone.stages]
    assert grads == [False, False, True, False]
    assert [h.fc.weight.grad is not None for h in model.heads] == [False, False, True]


def test_e2cm_one_pass_no_gradients(digits, backbone):
    model = multi(digits, backbone, "class-means")
    assert not any(p.requires_grad for h in model.heads for p in h.parameters())
    before = copy.deepcopy(model.state_dict())
    info = fit_class_means(model, digits.train)
    assert info["samples"] == len(digits.train) and info["passes"] == 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone"))
    for head in model.heads:
        assert int(head.counts.sum()) == len(digits.train)
    assert_learned(accuracies(model, digits.test))
    logits = model.collect_logits(digits.test.x)
    check_parity(model, digits.test.x, MaxProb(threshold=median_threshold(MaxProb(), logits)))


def test_class_means_equal_feature_means(digits):
    head = ClassMeansHead((4, 2, 2), 3)
    x = torch.randn(30, 4, 2, 2)
    y = torch.arange(30) % 3
    head.accumulate(x[:11], y[:11])
    head.accumulate(x[11:], y[11:])
    head.finish()
    pooled = x.flatten(2).mean(-1)
    for c in range(3):
        assert torch.allclose(head.means[c], pooled[y == c].mean(0), atol=1e-6)
    assert torch.equal(head(x).argmax(1), torch.cdist(pooled, head.means).argmin(1))


def test_trecx_early_view(digits, backbone):
    model = early_view_model(backbone, "block1", 10, digits.input_shape)
    model.eval()
    assert torch.allclose(model(digits.test.x[:8])[-1], backbone(digits.test.x[:8]))
    train(model, digits.train, JointWeighted([1.0, 1.0]), epochs=3, lr=3e-3, **FAST)
    assist = model.backbone.stages[-1].module.assist
    assert float(assist.weight.detach().abs().sum()) > 0
    assert_learned(accuracies(model, digits.test))
    logits = model.collect_logits(digits.test.x)
    check_parity(model, digits.test.x, MaxProb(threshold=median_threshold(MaxProb(), logits)))


def test_binary_heads(digits, backbone):
    model = multi(digits, backbone, "binary")
    train(model, digits.train, HeadsOnly(), epochs=4, lr=5e-3, **FAST)
    assert count_binary_layers(model.heads) == 2 * len(model.heads)
    assert_learned(accuracies(model, digits.test))
    logits = model.collect_logits(digits.test.x)
    check_parity(model, digits.test.x, Entropy(threshold=median_threshold(Entropy(), logits)))


@pytest.mark.slow
def test_binary_backbone_with_exits(digits):
    model = create_multiexit("resnet8", 10, digits.input_shape, head="binary", widths=WIDTHS)
    binarize(model.backbone)
    assert count_binary_layers(model.backbone) == 8
    train(model, digits.train, JointWeighted(), epochs=5, lr=5e-3, **FAST)
    assert accuracies(model, digits.test)[-1] > 0.3
    weights = [m for m in model.backbone.modules() if type(m).__name__ == "BinaryConv2d"]
    sign = weights[0]
    # what the layer computes uses only the signs of its weights and inputs
    x = torch.randn(2, sign.in_channels, 6, 6)
    scale = sign.weight.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    sign.eval()
    ref = F.conv2d(torch.where(sign.input_norm(x) >= 0, 1.0, -1.0), torch.where(sign.weight >= 0, 1.0, -1.0)
                   * scale, sign.bias, sign.stride, sign.padding)
    assert torch.allclose(sign(x), ref, atol=1e-5)
    logits = model.collect_logits(digits.test.x)
    check_parity(model, digits.test.x, Entropy(threshold=median_threshold(Entropy(), logits)))


# bad input -----------------------------------------------------------------------------------
def test_strategies_reject_models_they_do_not_fit(digits, backbone):
    plain = create_model("resnet8", 10, digits.input_shape, widths=WIDTHS)
    for strategy in (SDNRamp(), SelfDistillation(), ZTW(), BoostNet(), QuickNets()):
        with pytest.raises(InputError, match="has none"):
            strategy.prepare(plain)
    with pytest.raises(InputError, match="CascadingHead"):
        ZTW().prepare(multi(digits, backbone, "sdn"))
    with pytest.raises(InputError, match="ClassMeansHead"):
        fit_class_means(multi(digits, backbone, "sdn"), digits.train)
    for strategy in (BoostNet(), QuickNets()):
        with pytest.raises(InputError, match="cascading"):
            strategy.prepare(multi(digits, backbone, "cascading"))
    frozen = multi(digits, backbone, "sdn")
    frozen.backbone.requires_grad_(False)
    for strategy in (SDNRamp(), SelfDistillation(), BoostNet(), QuickNets()):
        with pytest.raises(InputError, match="frozen"):
            strategy.prepare(frozen)
    cascade = multi(digits, backbone, "cascading")
    cascade.heads.requires_grad_(False)
    with pytest.raises(InputError, match="frozen"):
        ZTW().prepare(cascade)
    with pytest.raises(InputError, match="at least 4 epochs"):
        train(multi(digits, backbone, "linear"), digits.train, QuickNets(), epochs=2,
              **FAST)
    with pytest.raises(InputError, match="4 max_weights"):
        SDNRamp(max_weights=[0.1, 0.2, 0.3, 0.4]).prepare(multi(digits, backbone, "sdn"))


def test_heads_reject_bad_input(digits, backbone):
    model = multi(digits, backbone, "class-means")
    with pytest.raises(InputError, match="fit_class_means"):
        model(digits.test.x[:2])
    head = ClassMeansHead((4,), 3)
    head.accumulate(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(InputError, match=r"classes \[2\]"):
        head.finish()
    with pytest.raises(InputError, match="labels"):
        head.accumulate(torch.randn(2, 4), torch.tensor([0, 5]))
    with pytest.raises(InputError, match="cannot wrap"):
        create_head("cascading", (4, 2, 2), 3, base="cascading")
    cascade = CascadingHead((4, 2, 2), 3)
    with pytest.raises(InputError, match="previous logits"):
        cascade(torch.randn(2, 4, 2, 2), torch.randn(2, 5))
    with pytest.raises(InputError, match="need 1 entries"):
        GeometricEnsemble(weights=((1.0, 2.0),))
    with pytest.raises(InputError, match="fit it on this model"):
        ensemble_logits(GeometricEnsemble(weights=((1.0,),)), [torch.zeros(2, 3)] * 2)
    with pytest.raises(InputError, match="no Linear"):
        binarize(torch.nn.ReLU())
    with pytest.raises(InputError, match="single-tensor|unknown|valid"):
        early_view_model(backbone, "nonexistent", 10, digits.input_shape)


def test_final_decision_skips_the_test_only_where_the_decision_is_the_logits():
    logits = [torch.randn(5, 3), torch.randn(5, 3)]
    plain = MaxProb(0.9)
    assert plain.final_decision(1, logits[1], plain.init_state(5, 3)) is logits[1]
    # an ensemble decides on combined logits: the final decision is the ensemble's
    ens = GeometricEnsemble(weights=((1.0,), (0.5, 1.0)))
    state = ens.init_state(5, 3)
    first = ens.decide(0, logits[0], state)[1]
    final = ens.final_decision(1, logits[1], state)
    assert final.shape == (5, 3) and not torch.equal(final, logits[1])
    assert not torch.equal(first, final)
