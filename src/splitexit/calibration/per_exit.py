"""One threshold per exit, chosen for the runtime's cost of leaving at each exit.

A single threshold treats every exit alike. When leaving early is worth more at one exit than
at another (a cheap first head; a middle exit whose path costs almost as much as the final
one), a threshold per exit buys more speed at the same accuracy. :func:`per_exit_thresholds`
finds them by coordinate descent over pairs of exits on the calibration split (an exhaustive
grid search for two early exits), starting from the best single
threshold, so its point is never worse than that one on the calibration split; the costs are
whatever the deployment pays per exit: MACs, or batch-1 latency measured on the runtime.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from ..errors import InputError
from ..policies import ThresholdPolicy, is_plain_threshold
from .sweep import (
    OperatingPoint,
    _check,
    _check_fraction,
    choose_operating_point,
    sweep,
)

__all__ = ["per_exit_thresholds"]


def _quantile_grid(stat: torch.Tensor, policy: ThresholdPolicy, num: int) -> list[float]:
    """Candidate thresholds for one exit: quantiles of its statistic, and the value that never
    fires."""
    values = torch.quantile(stat.double(), torch.linspace(0, 1, num, dtype=torch.float64))
    lo, hi = policy.valid_range
    never = hi if policy.higher_is_confident else lo
    grid = {min(max(float(v), lo), hi) for v in values}
    if never not in (float("inf"), float("-inf")):
        grid.add(never)
    return sorted(grid)


def per_exit_thresholds(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                        exit_costs: Sequence[float], policy: ThresholdPolicy, *,
                        reference_accuracy: float, max_drop: float, num: int = 100,
                        rounds: int = 4) -> OperatingPoint:
    """The cheapest per-exit thresholds within ``max_drop`` of ``reference_accuracy``.

    Args:
        logits: per-exit calibration logits, the final exit last.
        labels: their labels.
        exit_costs: what leaving at each exit costs (MACs, or measured batch-1 latency on the
            deployment runtime); the mean of it is what is minimised.
        policy: a max-prob, entropy or margin policy (its temperatures are kept).
        reference_accuracy: the calibration accuracy the drop is measured from (the
            baseline's, or an equally trained control's).
        max_drop: the largest accuracy drop allowed on the calibration split (a fraction).
        num: candidate thresholds per exit (quantiles of that exit's statistic); the start is
            :func:`~splitexit.calibration.sweep`'s best single threshold.
        rounds: coordinate-descent passes over the pairs of exits (stops early when nothing
            changes).

    Returns:
        An :class:`OperatingPoint` whose policy has one threshold per early exit and whose
        ``mean_macs`` is the mean of ``exit_costs``. It is never costlier on the calibration
        split than the best single threshold (the starting point).

    Raises:
        InputError: not a plain threshold policy, one cost per exit missing, or no threshold
            meets the target.
    """
    _check(logits, labels, policy)
    if not is_plain_threshold(policy):
        raise InputError(f"per-exit thresholds need a max-prob, entropy or margin policy, got "
                         f"{policy.name!r}")
    if len(exit_costs) != len(logits):
        raise InputError(f"{len(logits)} exits of logits but {len(exit_costs)} exit costs")
    _check_fraction("reference_accuracy", reference_accuracy, "0.99 = 99 %")
    _check_fraction("max_drop", max_drop, "0.005 = 0.5 pt")
    if num < 2 or rounds < 1:
        raise InputError(f"num must be >= 2 and rounds >= 1, got num={num}, rounds={rounds}")
    start = choose_operating_point(sweep(logits, labels, exit_costs, policy),
                                   reference_accuracy=reference_accuracy, max_drop=max_drop)
    heads = len(logits) - 1
    if heads < 2:
        return start
    stats = torch.stack([policy.statistic(policy.scaled(e, lg)).float()
                         for e, lg in enumerate(logits[:-1])])  # (heads, n)
    correct = torch.stack([lg.argmax(1) == labels for lg in logits])  # (exits, n)
    costs = torch.tensor(list(exit_costs), dtype=torch.float64)
    n, floor = len(labels), reference_accuracy - max_drop - 1e-12

    columns = torch.arange(n)

    def evaluate(thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Accuracy, mean cost and exit per sample for each row of thresholds (G, heads)."""
        fire = (stats[None] >= thr[:, :, None] if policy.higher_is_confident
                else stats[None] <= thr[:, :, None])  # (G, heads, n)
        first = torch.full((len(thr), n), heads, dtype=torch.long)  # (G, n): the final exit
        for e in range(heads - 1, -1, -1):  # the earliest exit that fires
            first = torch.where(fire[:, e], e, first)
        return (correct[first, columns].double().mean(1), costs[first].mean(1), first)

    grids = [torch.tensor(_quantile_grid(stats[e], policy, num), dtype=torch.float32)
             for e in range(heads)]
    thr = torch.full((heads,), float(start.policy.threshold), dtype=torch.float32)
    a, c, _ = evaluate(thr[None])
    acc, cost = float(a[0]), float(c[0])
    for _ in range(rounds):
        changed = False
        # a pair at a time: lowering one exit's threshold usually costs accuracy that only
        # raising another's buys back, which one exit at a time never finds
        for e, f in itertools.combinations(range(heads), 2):
            for ve in grids[e]:
                trials = thr.repeat(len(grids[f]), 1)
                trials[:, e], trials[:, f] = ve, grids[f]
                a, c, _ = evaluate(trials)
                ok = a >= floor
                if not bool(ok.any()):
                    continue
                # the cheapest trial that keeps the accuracy (the most accurate among equals)
                key = torch.where(ok, c, torch.inf)
                best = int(torch.argmin(key - 1e-12 * a))
                if (float(c[best]), -float(a[best])) < (cost, -acc):
                    thr, acc, cost, changed = trials[best].clone(), float(a[best]), \
                        float(c[best]), True
        if not changed:
            break
    a, c, first = evaluate(thr[None])
    acc, cost, first = float(a[0]), float(c[0]), first[0]
    if acc < floor or (cost, -acc) >= (start.mean_macs, -start.accuracy):
        return start  # nothing cheaper within the target than the single threshold
    chosen = policy.with_threshold(tuple(float(t) for t in thr))
    return OperatingPoint(chosen, acc, cost,
                          (torch.bincount(first, minlength=len(logits)).double() / n).tolist())
