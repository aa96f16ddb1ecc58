"""One threshold per exit, chosen for the cost of leaving at each exit."""

import pytest
import torch

from splitexit.calibration import choose_operating_point, per_exit_thresholds, sweep
from splitexit.errors import InputError
from splitexit.multiexit import simulate_exits
from splitexit.policies import Entropy, MaxProb, Patience


def _logits(n: int = 2000, seed: int = 0):
    """Three exits over 10 classes: exit 0 confident and right on the easy third, exit 1
    right more often but less sure of itself, the final exit right almost always."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    easy = torch.rand(n, generator=g) < 0.35

    def exit_logits(p_right: torch.Tensor, scale: float) -> torch.Tensor:
        z = torch.randn(n, 10, generator=g)
        right = torch.rand(n, generator=g) < p_right
        target = torch.where(right, y, (y + 1) % 10)
        z[torch.arange(n), target] += scale
        return z

    l0 = exit_logits(torch.where(easy, 0.97, 0.35), 4.0)
    l1 = exit_logits(torch.full((n,), 0.85), 2.0)
    l2 = exit_logits(torch.full((n,), 0.97), 5.0)
    return [l0, l1, l2], y


@pytest.mark.parametrize("policy", [MaxProb(), Entropy()])
def test_never_worse_than_one_threshold_and_meets_the_target(policy):
    logits, y = _logits()
    cost = [0.1, 0.7, 1.0]  # the middle exit's path costs almost as much as the final one
    reference = float((logits[-1].argmax(1) == y).double().mean())
    one = choose_operating_point(sweep(logits, y, cost, policy), reference_accuracy=reference,
                                 max_drop=0.01)
    per = per_exit_thresholds(logits, y, cost, policy, reference_accuracy=reference,
                              max_drop=0.01, num=40)
    assert isinstance(per.policy.threshold, tuple) and len(per.policy.threshold) == 2
    assert per.accuracy >= reference - 0.01 - 1e-12
    assert per.mean_macs <= one.mean_macs + 1e-12
    # the point it reports is what the policy does when replayed
    replay = simulate_exits(logits, per.policy)
    assert per.accuracy == pytest.approx(replay.accuracy(y))
    fractions = replay.exit_fractions(3)
    assert per.exit_fractions == pytest.approx(fractions)
    assert per.mean_macs == pytest.approx(sum(f * c for f, c in zip(fractions, cost)))


def test_costs_decide_the_thresholds():
    """A costly middle exit is worth little: its threshold rises when its path costs as
    much as the final one, and the first exit takes more samples when it is cheap."""
    logits, y = _logits()
    reference = float((logits[-1].argmax(1) == y).double().mean())
    costly = per_exit_thresholds(logits, y, [0.1, 0.99, 1.0], MaxProb(),
                                 reference_accuracy=reference, max_drop=0.01, num=40)
    cheap = per_exit_thresholds(logits, y, [0.1, 0.2, 1.0], MaxProb(),
                                reference_accuracy=reference, max_drop=0.01, num=40)
    assert costly.exit_fractions[1] < cheap.exit_fractions[1]


def test_one_early_exit_is_the_single_threshold():
    logits, y = _logits()
    two = [logits[0], logits[-1]]
    reference = float((logits[-1].argmax(1) == y).double().mean())
    per = per_exit_thresholds(two, y, [0.1, 1.0], MaxProb(), reference_accuracy=reference,
                              max_drop=0.02)
    one = choose_operating_point(sweep(two, y, [0.1, 1.0], MaxProb()),
                                 reference_accuracy=reference, max_drop=0.02)
    assert per.mean_macs == pytest.approx(one.mean_macs)


def test_bad_input_is_refused():
    logits, y = _logits(200)
    with pytest.raises(InputError, match="max-prob, entropy or margin"):
        per_exit_thresholds(logits, y, [1, 2, 3], Patience(), reference_accuracy=0.9,
                            max_drop=0.01, num=40)
    with pytest.raises(InputError, match="exit costs"):
        per_exit_thresholds(logits, y, [1, 2], MaxProb(), reference_accuracy=0.9,
                            max_drop=0.01, num=40)
    with pytest.raises(InputError, match="max_drop"):
        per_exit_thresholds(logits, y, [1, 2, 3], MaxProb(), reference_accuracy=0.9,
                            max_drop=5)
    with pytest.raises(InputError, match="no threshold keeps accuracy"):
        per_exit_thresholds(logits, y, [1, 2, 3], MaxProb(), reference_accuracy=1.0,
                            max_drop=0.0)
