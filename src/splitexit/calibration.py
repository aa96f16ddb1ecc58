"""Thresholds chosen, not guessed: sweeps on the calibration split, Pareto front, oracle.

Everything here works on saved per-exit logits of the *calibration* split and the cost
table's ``exit_macs``; the chosen policy is then evaluated once on the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .cost import mean_macs
from .errors import InputError
from .multiexit import simulate_exits
from .policies import ExitPolicy, Patience, ThresholdPolicy

__all__ = ["OperatingPoint", "sweep", "pareto_front", "oracle", "choose_operating_point",
           "candidate_thresholds"]


@dataclass
class OperatingPoint:
    """One policy setting and what it gives on the data it was measured on."""

    policy: ExitPolicy
    accuracy: float
    mean_macs: float
    exit_fractions: list[float]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["policy"] = self.policy.config()
        return d


def candidate_thresholds(policy: ExitPolicy, logits: Sequence[torch.Tensor], num: int = 100
                         ) -> list:
    """Threshold values worth trying: quantiles of the policy's statistic over early exits."""
    if isinstance(policy, Patience):
        return list(range(1, len(logits)))
    if not isinstance(policy, ThresholdPolicy):
        raise InputError(f"policy {policy.name!r} has no threshold to sweep")
    stats = torch.cat([policy.statistic(policy.scaled(e, lg)) for e, lg in
                       enumerate(logits[:-1])]).double()
    qs = torch.linspace(0, 1, num, dtype=torch.float64)
    values = torch.quantile(stats, qs).tolist()
    lo, hi = policy.valid_range
    extreme = hi if policy.higher_is_confident else lo
    values = [min(max(v, lo), hi) for v in values]
    if extreme not in (float("inf"), float("-inf")):
        values.append(extreme)
    return sorted(set(values))


def sweep(logits: Sequence[torch.Tensor], labels: torch.Tensor, exit_macs: Sequence[float],
          policy: ExitPolicy, thresholds: Sequence | None = None, num: int = 100
          ) -> list[OperatingPoint]:
    """Replay ``policy`` at many thresholds; one operating point each."""
    if len(logits) != len(exit_macs):
        raise InputError(f"{len(logits)} exits of logits but {len(exit_macs)} exit costs")
    if thresholds is None:
        thresholds = candidate_thresholds(policy, logits, num)
    points = []
    for t in thresholds:
        p = (Patience(patience=int(t), temperature=policy.temperature)
             if isinstance(policy, Patience) else policy.with_threshold(t))
        result = simulate_exits(logits, p)
        points.append(OperatingPoint(p, result.accuracy(labels),
                                     mean_macs(result.exit_index, exit_macs),
                                     result.exit_fractions(len(logits))))
    return points


def pareto_front(points: Sequence[OperatingPoint]) -> list[OperatingPoint]:
    """Points no other point beats on both accuracy and mean MACs, by increasing MACs."""
    front: list[OperatingPoint] = []
    for p in sorted(points, key=lambda p: (p.mean_macs, -p.accuracy)):
        if not front or p.accuracy > front[-1].accuracy:
            front.append(p)
    return front


def oracle(logits: Sequence[torch.Tensor], labels: torch.Tensor, exit_macs: Sequence[float]
           ) -> dict:
    """Each sample leaves at the earliest exit that is right (the final one if none is).

    The lower bound on cost and upper bound on accuracy for a given set of heads.
    """
    correct = torch.stack([lg.argmax(1) == labels for lg in logits])  # (E, N)
    any_right = correct.any(0)
    first = torch.where(any_right, correct.float().argmax(0), torch.full_like(labels,
                                                                             len(logits) - 1))
    fractions = torch.bincount(first, minlength=len(logits)).double() / len(labels)
    return {"accuracy": float(any_right.double().mean()),
            "mean_macs": mean_macs(first, exit_macs),
            "exit_fractions": fractions.tolist()}


def choose_operating_point(points: Sequence[OperatingPoint], *,
                           reference_accuracy: float | None = None,
                           max_drop: float | None = None,
                           macs_budget: float | None = None) -> OperatingPoint:
    """Pick the cheapest point within ``max_drop`` of ``reference_accuracy``, or the most
    accurate point within ``macs_budget`` mean MACs.

    Raises:
        InputError: neither or both targets given, or no point meets the target.
    """
    if (max_drop is None) == (macs_budget is None):
        raise InputError("give exactly one target: max_drop (with reference_accuracy) or "
                         "macs_budget")
    if max_drop is not None:
        if reference_accuracy is None:
            raise InputError("max_drop needs reference_accuracy (e.g. the final exit's or the "
                             "baseline's calibration accuracy)")
        if not 0 <= max_drop <= 1:
            raise InputError(f"max_drop is a fraction in [0, 1] (0.005 = 0.5 pt), got {max_drop}")
        ok = [p for p in points if p.accuracy >= reference_accuracy - max_drop - 1e-12]
        if not ok:
            raise InputError(f"no threshold keeps accuracy within {max_drop:.4f} of "
                             f"{reference_accuracy:.4f}; relax max_drop or train better exits")
        return min(ok, key=lambda p: (p.mean_macs, -p.accuracy))
    ok = [p for p in points if p.mean_macs <= macs_budget]
    if not ok:
        cheapest = min(p.mean_macs for p in points)
        raise InputError(f"no threshold meets a budget of {macs_budget:.0f} MACs (cheapest "
                         f"point: {cheapest:.0f}); raise the budget")
    return max(ok, key=lambda p: (p.accuracy, -p.mean_macs))

