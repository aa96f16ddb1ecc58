"""The exit gate on real digits data: trained from the model's own exits, real-path parity,
its own cost counted."""

from __future__ import annotations

import pytest
import torch

from splitexit.cost import cost_table
from splitexit.data import load_dataset
from splitexit.errors import InputError
from splitexit.gate import ExitGate, GatedMultiExitModel, calibrate_gate, fit_gate
from splitexit.policies import MaxProb
from splitexit.training import Baseline, JointWeighted, train
from splitexit.zoo import create_multiexit


@pytest.fixture(scope="module")
def gated():
    torch.set_num_threads(1)
    ds = load_dataset("digits")
    model = create_multiexit("resnet8", 10, ds.input_shape, head="sdn", widths=(8, 16, 32))
    train(model.backbone, ds.train, Baseline(), epochs=4, lr=5e-3, progress=False)
    train(model, ds.train, JointWeighted(), epochs=2, lr=3e-3, batch_size=32, progress=False)
    return ds, GatedMultiExitModel.from_multiexit(model.eval())


def test_gate_learns_and_runs_on_the_real_path(gated):
    ds, model = gated
    policy = MaxProb(threshold=0.98)
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
    costs = cost_table(model, ds.test.x[:4], measure=False)
    macs = model.sample_macs(reference.exit_index, hard, costs.exit_macs, costs.backbone_macs)
    gate_cost = model.gate_macs()
    assert gate_cost > 0
    # hard samples skip every head: backbone plus gate, less than running all heads
    assert torch.allclose(macs[hard], torch.full_like(macs[hard],
                                                      costs.backbone_macs + gate_cost))
    assert costs.backbone_macs + gate_cost < costs.exit_macs[-1]


def test_calibrate_gate_never_loses_accuracy_on_calibration(gated):
    ds, model = gated
    costs = cost_table(model, ds.test.x[:4], measure=False)
    policy = MaxProb(threshold=0.98)
    fit_gate(model, ds.train, policy, epochs=5)
    info = calibrate_gate(model, ds.calib, policy, costs.exit_macs, costs.backbone_macs)
    assert info["accuracy"] >= info["ungated_accuracy"] - 1e-12
    assert model.gate_threshold == info["gate_threshold"]


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
