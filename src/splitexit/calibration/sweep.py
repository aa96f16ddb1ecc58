"""Threshold sweeps on the calibration split, the Pareto front, the oracle bound, the
operating point for a drop target or a MACs budget, and the paired interval of a drop."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..cost import mean_macs
from ..errors import InputError
from ..multiexit import simulate_exits
from ..policies import ExitPolicy, Patience, ThresholdPolicy, _per_exit
from ..runtime.loop import check_logits, check_policy

CALIBRATION_MODES = ("auto", "sweep", "guarded")


class CalibrationWarning(UserWarning):
    """The calibration set is too small for the operating point's target to be trusted."""


def paired_drop_ci(reference: torch.Tensor, other: torch.Tensor, z: float = 1.96
                   ) -> tuple[float, float, float]:
    """Accuracy drop (points) of ``other`` vs ``reference`` on the same samples, with a CI.

    Args:
        reference, other: per-sample correctness (bool tensors of one length), e.g. a
            baseline's and an early-exit policy's on the test split.
        z: normal quantile (1.96: a two-sided 95% interval).

    Returns:
        ``(drop, low, high)`` in percentage points; the interval is the normal approximation of
        the paired difference (it depends only on the samples where exactly one is right).

    Raises:
        InputError: not two non-empty 1-D tensors of one length.
    """
    if (not isinstance(reference, torch.Tensor) or not isinstance(other, torch.Tensor)
            or reference.shape != other.shape or reference.dim() != 1 or not len(reference)):
        raise InputError("paired_drop_ci needs two non-empty 1-D tensors of one length (the "
                         "per-sample correctness of the reference and of the other model)")
    reference, other = reference.bool(), other.bool()
    n = len(reference)
    lost = int((reference & ~other).sum())
    gained = int((~reference & other).sum())
    drop = (lost - gained) / n
    var = max(0.0, (lost + gained) / n - drop ** 2) / n
    half = z * var ** 0.5
    return 100 * drop, 100 * (drop - half), 100 * (drop + half)


def _check(logits: Sequence[torch.Tensor], labels=None, policy=None) -> None:
    """Finite ``(N, C)`` logits per exit, their labels, a policy that fits their exits."""
    check_logits(logits, labels)
    if policy is not None:
        check_policy(policy, len(logits))


def _check_fraction(name: str, value: float, example: str) -> None:
    try:
        v = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not 0 <= v <= 1:
        hint = f"; if it is a percentage, pass {v / 100:g}" if 1 < v <= 100 else ""
        raise InputError(f"{name} is a fraction in [0, 1] ({example}), got {value!r}{hint}")


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
    _check(logits, None, policy)
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
    """Replay ``policy`` at many thresholds; one operating point each.

    Raises:
        InputError: non-finite logits, labels that are not their classes, a policy that does
            not fit their exits, or one cost per exit missing.
    """
    _check(logits, labels, policy)
    if len(logits) != len(exit_macs):
        raise InputError(f"{len(logits)} exits of logits but {len(exit_macs)} exit costs")
    if thresholds is None:
        thresholds = candidate_thresholds(policy, logits, num)
    if _stateless_threshold(policy):
        return _threshold_sweep(logits, labels, exit_macs, policy, thresholds)
    points = []
    for t in thresholds:
        p = (Patience(patience=int(t), temperature=policy.temperature)
             if isinstance(policy, Patience) else policy.with_threshold(t))
        result = simulate_exits(logits, p)
        points.append(OperatingPoint(p, result.accuracy(labels),
                                     mean_macs(result.exit_index, exit_macs),
                                     result.exit_fractions(len(logits))))
    return points


def _stateless_threshold(policy: ExitPolicy) -> bool:
    """A plain threshold test on a per-exit statistic (max-prob, entropy, margin)."""
    return (isinstance(policy, ThresholdPolicy)
            and type(policy).decide is ThresholdPolicy.decide
            and type(policy).init_state is ExitPolicy.init_state
            and not isinstance(policy.threshold, tuple))


def _threshold_sweep(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                     exit_macs: Sequence[float], policy: ThresholdPolicy,
                     thresholds: Sequence) -> list[OperatingPoint]:
    """:func:`sweep` for stateless threshold policies: the statistic of every exit is computed
    once, then each threshold is one comparison (same results as replaying the policy)."""
    stats = [policy.statistic(policy.scaled(e, lg)) for e, lg in enumerate(logits[:-1])]
    correct = torch.stack([lg.argmax(1) == labels for lg in logits])  # (exits, n)
    n, last = len(labels), len(logits) - 1
    always = torch.ones(1, n, dtype=torch.bool)
    table = torch.tensor(list(exit_macs), dtype=torch.float64)
    points = []
    for t in thresholds:
        p = policy.with_threshold(t)
        thr = _per_exit(p.threshold, 0)
        fire = [(st >= thr) if policy.higher_is_confident else (st <= thr) for st in stats]
        first = torch.cat([torch.stack(fire), always]).to(torch.uint8).argmax(0) if last \
            else torch.zeros(n, dtype=torch.long)
        points.append(OperatingPoint(
            p, float(correct.gather(0, first[None]).double().mean()),
            float(table[first].mean()),
            (torch.bincount(first, minlength=len(logits)).double() / max(1, n)).tolist()))
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
    _check(logits, labels)
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
                           macs_budget: float | None = None,
                           cost: Callable[[OperatingPoint], float] | None = None
                           ) -> OperatingPoint:
    """Pick the cheapest point within ``max_drop`` of ``reference_accuracy``, or the most
    accurate point within ``macs_budget`` mean MACs.

    Cheapest means the fewest mean MACs or, given ``cost`` (e.g. an expected batch-1 latency
    per point), the lowest cost, then the fewest MACs; ties go to the more accurate point.

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
        _check_fraction("reference_accuracy", reference_accuracy, "0.99 = 99 %")
        _check_fraction("max_drop", max_drop, "0.005 = 0.5 pt")
        ok = [p for p in points if p.accuracy >= reference_accuracy - max_drop - 1e-12]
        if not ok:
            raise InputError(f"no threshold keeps accuracy within {max_drop:.4f} of "
                             f"{reference_accuracy:.4f}; relax max_drop or train better exits")
        return min(ok, key=lambda p: (*((cost(p),) if cost else ()), p.mean_macs, -p.accuracy))
    ok = [p for p in points if p.mean_macs <= macs_budget]
    if not ok:
        cheapest = min(p.mean_macs for p in points)
        raise InputError(f"no threshold meets a budget of {macs_budget:.0f} MACs (cheapest "
                         f"point: {cheapest:.0f}); raise the budget")
    return max(ok, key=lambda p: (p.accuracy, -p.mean_macs))
