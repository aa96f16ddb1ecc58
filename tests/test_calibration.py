"""Threshold sweeps, Pareto front, oracle and operating points on the calibration split."""

import pytest
import torch

from splitexit import (
    Entropy,
    InputError,
    MaxProb,
    Patience,
    choose_operating_point,
    cost_table,
    oracle,
    pareto_front,
    sweep,
)
from splitexit.policies import fit_temperature


@pytest.fixture(scope="module")
def calib(trained_resnet8, digits):
    model = trained_resnet8
    costs = cost_table(model, digits.calib.x[:16], measure=False)
    return model, model.collect_logits(digits.calib.x), digits.calib.y, costs.exit_macs


def test_sweep_covers_the_range(calib):
    model, logits, y, macs = calib
    points = sweep(logits, y, macs, MaxProb())
    assert len(points) > 10
    cheapest = min(points, key=lambda p: p.mean_macs)
    priciest = max(points, key=lambda p: p.mean_macs)
    assert cheapest.mean_macs < 0.5 * macs[-1]
    assert priciest.exit_fractions[-1] > 0.0
    for p in points:
        assert abs(sum(p.exit_fractions) - 1) < 1e-9


def test_pareto_front_is_monotone(calib):
    _, logits, y, macs = calib
    points = sweep(logits, y, macs, Entropy())
    front = pareto_front(points)
    assert len(front) >= 10  # a real trade-off curve, not one or two points
    assert all(a.mean_macs < b.mean_macs and a.accuracy < b.accuracy
               for a, b in zip(front, front[1:], strict=False))
    # the front spans the sweep: its ends are the cheapest and the most accurate points
    assert front[0].mean_macs == min(p.mean_macs for p in points)
    assert front[-1].accuracy == max(p.accuracy for p in points)
    # and no swept point beats a front point on both counts
    for p in points:
        assert any(f.mean_macs <= p.mean_macs and f.accuracy >= p.accuracy for f in front)
        assert not any((p.mean_macs <= f.mean_macs and p.accuracy > f.accuracy)
                       or (p.mean_macs < f.mean_macs and p.accuracy >= f.accuracy)
                       for f in front)


def test_operating_point_meets_target_on_calibration(calib):
    _, logits, y, macs = calib
    ref = float((logits[-1].argmax(1) == y).double().mean())
    points = sweep(logits, y, macs, MaxProb())
    op = choose_operating_point(points, reference_accuracy=ref, max_drop=0.01)
    assert op.accuracy >= ref - 0.01
    assert op.mean_macs <= macs[-1]
    budget = choose_operating_point(points, macs_budget=0.5 * macs[-1])
    assert budget.mean_macs <= 0.5 * macs[-1]


def test_oracle_bounds_every_policy(calib):
    _, logits, y, macs = calib
    orc = oracle(logits, y, macs)
    for policy in (MaxProb(), Entropy(), Patience()):
        for p in sweep(logits, y, macs, policy):
            assert p.accuracy <= orc["accuracy"] + 1e-12
    assert orc["mean_macs"] <= macs[-1]


def test_impossible_targets_raise(calib):
    _, logits, y, macs = calib
    points = sweep(logits, y, macs, MaxProb())
    assert max(p.accuracy for p in points) < 1.0
    with pytest.raises(InputError, match="no threshold"):
        choose_operating_point(points, reference_accuracy=1.0, max_drop=0.0)
    with pytest.raises(InputError, match="fraction"):  # an accuracy above 1 is a mistake
        choose_operating_point(points, reference_accuracy=1.01, max_drop=0.0)
    with pytest.raises(InputError, match="budget"):
        choose_operating_point(points, macs_budget=1.0)
    with pytest.raises(InputError, match="exactly one"):
        choose_operating_point(points)
    with pytest.raises(InputError, match="fraction"):
        choose_operating_point(points, reference_accuracy=0.9, max_drop=5)


def test_temperature_scaling_lowers_nll(calib):
    _, logits, y, _ = calib
    t = fit_temperature(logits[0], y)
    nll = torch.nn.functional.cross_entropy
    assert nll(logits[0] / t, y) <= nll(logits[0], y) + 1e-6
