"""The exit gate on real digits data: trained from the model's own exits, real-path parity,
its own cost counted, MACs saved."""

from __future__ import annotations

import copy

import pytest
import torch

from splitexit.cost import cost_table, count_macs
from splitexit.data import load_dataset
from splitexit.errors import InputError
from splitexit.methods import ExitGate, GatedMultiExitModel, calibrate_gate, fit_gate
from splitexit.policies import MaxProb
from splitexit.training import Baseline, JointWeighted, train
from splitexit.zoo import create_multiexit

# conv heads cost more than the backbone: a sample that runs every head to the final exit
# costs twice the bare backbone, so sending the hard ones past the heads saves MACs
POLICY = MaxProb(threshold=0.7)


@pytest.fixture(scope="module")
def trained(one_thread_module):
    torch.manual_seed(0)
    ds = load_dataset("digits")
    model = create_multiexit("resnet8", 10, ds.input_shape, head="conv", widths=(8, 16, 32))
    train(model.backbone, ds.train, Baseline(), epochs=4, lr=5e-3, progress=False)
    train(model, ds.train, JointWeighted(), epochs=3, lr=3e-3, batch_size=32, progress=False)
    return ds, model.eval()


@pytest.fixture
def gated(trained, one_thread):
    """A fresh, seeded gate on a copy of the trained model for every test: no test sees
    another's fitted gate or threshold, whatever the order."""
    ds, model = trained
    torch.manual_seed(1)
    return ds, GatedMultiExitModel.from_multiexit(copy.deepcopy(model))


def test_gate_learns_and_runs_on_the_real_path(gated):
    ds, model = gated
    policy = POLICY
    info = fit_gate(model, ds.train, policy, epochs=15)
    assert 0.05 < info["hard_fraction"] < 0.95
    assert info["balanced_accuracy"] > 0.6  # chance is 0.5
    model.gate_threshold = 0.5
    logits = model.collect_logits(ds.test.x)
    hard = model.is_hard(model.hard_probability(ds.test.x))
    assert 0 < int(hard.sum()) < len(hard)
    reference = model.simulate_gated(logits, hard, policy)
    assert bool((reference.exit_index[hard] == model.num_exits - 1).all())
    for batch_size in (1, 7, 256):
        n = 70 if batch_size < 256 else len(ds.test.x)
        parts = [model.infer(ds.test.x[i: i + batch_size], policy)
                 for i in range(0, n, batch_size)]
        assert torch.equal(torch.cat([p.predictions for p in parts]), reference.predictions[:n])
        assert torch.equal(torch.cat([p.exit_index for p in parts]), reference.exit_index[:n])
    # the cost model equals the MACs the real path runs, the gate's own included
    costs = cost_table(model, ds.test.x[:4], measure=False)
    macs = model.sample_macs(reference.exit_index, hard, costs.exit_macs, costs.backbone_macs)
    assert count_macs(lambda: model.infer(ds.test.x, policy)) == pytest.approx(float(macs.sum()))
    # MACs saved on the real path: the samples the gate sends past the heads that the ungated
    # model would have run to its final exit cost less gated than ungated
    ungated = model.simulate(logits, policy)
    skipped = ds.test.x[hard & (ungated.exit_index == model.num_exits - 1)]
    assert len(skipped) > 0
    with_gate = count_macs(lambda: model.infer(skipped, policy))
    model.gate_threshold = 1.0  # never gates: every head runs
    without_gate = count_macs(lambda: model.infer(skipped, policy))
    assert with_gate < 0.6 * without_gate


def test_calibrated_gate_saves_macs_without_losing_accuracy(gated, trained):
    ds, model = gated
    _, plain = trained  # the same weights, no gate
    costs = cost_table(model, ds.test.x[:4], measure=False)
    policy = POLICY
    fit_gate(model, ds.train, policy, epochs=5)
    info = calibrate_gate(model, ds.calib, policy, costs.exit_macs, costs.backbone_macs)
    assert info["accuracy"] >= info["ungated_accuracy"] - 1e-12
    assert info["mean_macs"] < 0.75 * info["ungated_mean_macs"]
    # measured on the real path at the chosen threshold, against the model without a gate
    x = ds.calib.x
    gated_macs = count_macs(lambda: model.infer(x, policy)) / len(x)
    plain_macs = count_macs(lambda: plain.infer(x, policy)) / len(x)
    assert gated_macs == pytest.approx(info["mean_macs"])
    assert plain_macs == pytest.approx(info["ungated_mean_macs"])
    assert gated_macs < 0.75 * plain_macs
    result = model.infer(x, policy)
    assert result.accuracy(ds.calib.y) >= info["ungated_accuracy"] - 1e-12


def test_gate_bad_input(gated):
    ds, model = gated
    with pytest.raises(InputError, match="probability"):
        model.gate_threshold = 1.5
    with pytest.raises(InputError, match=r"\(C, L\)"):
        ExitGate((10,))
    with pytest.raises(InputError, match="shape"):
        model.infer(torch.rand(2, 1, 28, 28), MaxProb())
    plain = create_multiexit("resnet8", 10, ds.input_shape, widths=(8, 16, 32))
    with pytest.raises(InputError, match="GatedMultiExitModel"):
        fit_gate(plain, ds.train, MaxProb())
