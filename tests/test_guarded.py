"""Guarded calibration: Learn-then-Test keeps the accuracy drop below epsilon w.p. >= 1-delta.

The stated rate is checked on many random calibration draws from a pool of real logits
(digits, a trained multi-exit ResNet-8). Calibration sets are drawn with replacement from the
pool, so the pool is the population and the "true" drop of a chosen threshold is its drop on
the whole pool: the guarantee must then hold in at least 1 - delta of the draws.
"""

from __future__ import annotations

import math

import pytest
import torch

from splitexit.calibration import (
    drop_losses,
    guard_grid,
    guarded_threshold,
    learn_then_test,
    min_calibration_samples,
    sweep,
)
from splitexit.cost import cost_table
from splitexit.data import load_dataset
from splitexit.errors import InputError
from splitexit.multiexit import simulate_exits
from splitexit.policies import Entropy, MaxProb, Patience
from splitexit.training import Baseline, HeadsOnly, train
from splitexit.zoo import create_multiexit

EPSILON, DELTA = 0.01, 0.1


@pytest.fixture(scope="module")
def pool(one_thread_module):
    # fixed seed and thread count: the pool must not depend on which tests ran before
    torch.manual_seed(0)
    ds = load_dataset("digits")
    model = create_multiexit("resnet8", 10, ds.input_shape, head="sdn", widths=(8, 16, 32))
    train(model.backbone, ds.train, Baseline(), epochs=4, lr=5e-3, progress=False)
    # briefly trained heads: early exits worse than the final one, so the threshold matters
    # and a careless choice does lose accuracy
    train(model, ds.train, HeadsOnly(), epochs=1, lr=1e-2, batch_size=32, progress=False)
    x = torch.cat([ds.calib.x, ds.test.x])
    y = torch.cat([ds.calib.y, ds.test.y])
    logits = model.collect_logits(x)
    costs = cost_table(model, x[:8], measure=False)
    return logits, y, costs.exit_macs


def test_guarded_rate_holds_on_many_calibration_draws(pool):
    logits, y, exit_macs = pool
    policy = MaxProb()
    candidates = [policy.with_threshold(t) for t in guard_grid(policy, 10)]
    losses, exits = drop_losses(logits, y, candidates)  # (T, pool): the population
    correct = torch.stack([simulate_exits(logits, p).predictions == y for p in candidates])
    final_right = logits[-1].argmax(1) == y
    # the true (population) accuracy drop of every threshold vs the final exit
    population_drop = final_right.double().mean() - correct.double().mean(1)
    assert bool((population_drop <= losses.mean(1) + 1e-12).all())  # the loss bounds the drop
    macs_table = torch.tensor(exit_macs, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    trials, n = 1000, 400
    violations, naive_violations, early = 0, 0, []
    for _ in range(trials):
        idx = torch.randint(0, len(y), (n,), generator=gen)
        cost = macs_table[exits[:, idx]].mean(1)
        certified = learn_then_test(losses[:, idx], EPSILON, DELTA)
        if certified:
            best = int(cost[:certified].argmin())
            violations += bool(population_drop[best] > EPSILON)
            early.append(float((exits[best] < len(logits) - 1).double().mean()))
        # unguarded: the cheapest threshold whose calibration drop is within epsilon
        calib_drop = final_right[idx].double().mean() - correct[:, idx].double().mean(1)
        ok = (calib_drop <= EPSILON).nonzero().flatten()
        naive = int(ok[cost[ok].argmin()])
        naive_violations += bool(population_drop[naive] > EPSILON)
    slack = 3 * math.sqrt(DELTA * (1 - DELTA) / trials)
    assert violations / trials <= DELTA + slack
    # the guard is not vacuous: it certifies thresholds that send samples out early
    assert len(early) > 0.9 * trials and sum(early) / len(early) > 0.3
    # and the check can fail: choosing on the calibration drop alone violates epsilon far more
    # often (how often depends on the model; 7% to 14% on the pools we tried)
    assert naive_violations > 3 * max(violations, 1)


def test_guarded_threshold_end_to_end(pool):
    logits, y, exit_macs = pool
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(y), generator=gen)
    cal, test = perm[:250], perm[250:]
    for policy in (MaxProb(), Entropy()):
        result = guarded_threshold([lg[cal] for lg in logits], y[cal], exit_macs, policy,
                                   EPSILON, DELTA)
        assert result.certified > 0 and result.calib_samples == 250
        assert result.mean_macs < exit_macs[-1]
        assert result.calib_risk <= EPSILON
        assert result.to_dict()["policy"]["name"] == policy.name
        final = (logits[-1][test].argmax(1) == y[test]).double().mean()
        points = sweep([lg[test] for lg in logits], y[test], exit_macs, result.policy,
                       thresholds=[result.policy.threshold])
        assert float(final) - points[0].accuracy <= EPSILON + 0.03  # test-split noise


def test_too_few_calibration_samples_is_an_error(pool):
    logits, y, exit_macs = pool
    need = min_calibration_samples(0.01, 0.05)
    assert need == math.ceil(math.log(0.05) / math.log(0.99))
    with pytest.raises(InputError, match=f"at least {need} are needed"):
        guarded_threshold([lg[:100] for lg in logits], y[:100], exit_macs, MaxProb(), 0.01, 0.05)
    with pytest.raises(InputError, match="at least"):
        learn_then_test(torch.zeros(3, 10), 0.01, 0.05)


def test_guarded_bad_input(pool):
    logits, y, exit_macs = pool
    with pytest.raises(InputError, match="fractions"):
        guarded_threshold(logits, y, exit_macs, MaxProb(), 1.5, 0.1)
    with pytest.raises(InputError, match="threshold policy"):
        guarded_threshold(logits, y, exit_macs, Patience(), 0.05, 0.1)
    with pytest.raises(InputError, match="exit costs"):
        guarded_threshold(logits, y, exit_macs[:-1], MaxProb(), 0.05, 0.1)


def test_no_certifiable_threshold_falls_back_to_no_exit(pool):
    logits, y, exit_macs = pool
    # early exits that are always wrong: nothing below the final exit can be certified
    bad = [torch.roll(lg, 1, dims=1) * 50 for lg in logits[:-1]] + [logits[-1]]
    result = guarded_threshold(bad, y, exit_macs, MaxProb(), 0.01, 0.1)
    assert result.certified == 0 and result.policy.name == "never"
    assert result.exit_fractions[-1] == 1.0
