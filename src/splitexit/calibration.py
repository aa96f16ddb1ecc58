"""Thresholds chosen, not guessed: sweeps on the calibration split, Pareto front, oracle,
and a statistically guarded mode (Learn-then-Test) that bounds the accuracy drop.

Everything here works on saved per-exit logits of the *calibration* split and the cost
table's ``exit_macs``; the chosen policy is then evaluated once on the test split.

:func:`calibrate` is the one entry point that picks between the two: a plain sweep's point
only meets its drop target on the calibration samples, and on a small calibration set it
misses it on new data about as often as not, so unless the sweep's margin is wide enough
(see :func:`calibrate`) the guarded mode is used, or a :class:`CalibrationWarning` says the
calibration set is too small for either. :func:`paired_drop_ci` gives the 95% interval of an
accuracy drop measured on one set of samples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .cost import mean_macs
from .errors import InputError
from .multiexit import simulate_exits
from .policies import ExitPolicy, NeverExit, Patience, ThresholdPolicy, _per_exit
from .runtime.loop import check_logits, check_policy

__all__ = ["OperatingPoint", "sweep", "pareto_front", "oracle", "choose_operating_point",
           "candidate_thresholds", "GuardedResult", "guarded_threshold", "learn_then_test",
           "min_calibration_samples", "guard_grid", "drop_losses", "final_decision",
           "exit_costs", "select_exits", "ExitSelection", "paired_drop_ci", "calibrate",
           "Calibration", "CalibrationWarning", "CALIBRATION_MODES"]

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
        _check_fraction("reference_accuracy", reference_accuracy, "0.99 = 99 %")
        _check_fraction("max_drop", max_drop, "0.005 = 0.5 pt")
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



def exit_costs(stage_costs: Sequence[float], head_costs: Sequence[float],
               exit_stages: Sequence[int], keep: Sequence[int]) -> list[float]:
    """Cost of leaving at each kept exit, then at the final one, when only heads ``keep`` run.

    Leaving at exit ``e`` costs the stages up to its cut plus every kept head evaluated so far
    (``head_costs`` should include the per-exit decision overhead).
    """
    cum = [sum(stage_costs[: k + 1]) for k in range(len(stage_costs))]
    costs, heads = [], 0.0
    for e in keep:
        heads += head_costs[e]
        costs.append(cum[exit_stages[e]] + heads)
    costs.append(cum[-1] + heads)
    return costs


@dataclass
class ExitSelection:
    """Which exit heads to keep, and the threshold, for the lowest expected cost.

    Attributes:
        exits: indices of the heads to keep (the final exit always stays).
        point: the operating point on the kept exits (``mean_macs`` holds the expected cost,
            in the units of the costs given).
        candidates: every subset tried, with its best expected cost and calibration accuracy.
    """

    exits: list[int]
    point: OperatingPoint
    candidates: list[dict]


def select_exits(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                 costs_for: Callable[[list[int]], Sequence[float]], policy: ExitPolicy, *,
                 reference_accuracy: float, max_drop: float, num: int = 100,
                 max_final_cost: float | None = None) -> ExitSelection:
    """Choose the exit heads and threshold that minimise expected cost within ``max_drop``.

    A head costs time on every sample that reaches it, also when nothing exits there; where
    few samples leave at a head it can cost more than it saves (at batch 1 the per-op overhead
    of a head is often far above its MAC count). This tries every subset of heads (the final
    exit always kept), sweeps the threshold on each with the costs ``costs_for(keep)`` of
    leaving at each kept exit and at the final one, and returns the cheapest point within
    ``max_drop`` of ``reference_accuracy``. With ``max_final_cost``, subsets whose final-exit
    cost (what a sample pays when no exit fires: every kept head and decision, then the whole
    backbone) exceeds it are not considered: a bound on the worst case, e.g. 1.1x the
    plain backbone's latency.

    Args:
        logits: every exit's calibration logits (the last is the final exit).
        costs_for: ``keep -> [cost of leaving at each kept exit..., at the final exit]``;
            e.g. :func:`exit_costs` over a cost table, or latencies measured on the runtime
            that will serve the model (:func:`~splitexit.measure.measure_exit_latency`).

    Raises:
        InputError: a policy with per-exit values (their meaning changes when exits are
            dropped), more than 12 heads, wrong cost lengths, or no subset meets the target.
    """
    _check(logits, labels, policy)
    _check_fraction("reference_accuracy", reference_accuracy, "0.99 = 99 %")
    _check_fraction("max_drop", max_drop, "0.005 = 0.5 pt")
    heads = len(logits) - 1
    if heads > 12:
        raise InputError(f"{heads} heads give {2 ** heads} subsets; select among at most 12")
    per_exit = [getattr(policy, f, None) for f in ("threshold", "temperature")]
    if any(isinstance(v, tuple) for v in per_exit):
        raise InputError("select_exits needs one threshold and temperature for every exit; "
                         "per-exit values would shift when exits are dropped")
    best: tuple[OperatingPoint, list[int]] | None = None
    candidates = []
    for mask in range(2 ** heads):
        keep = [e for e in range(heads) if mask >> e & 1]
        costs = list(costs_for(keep))
        if len(costs) != len(keep) + 1:
            raise InputError(f"costs_for({keep}) returned {len(costs)} costs, expected "
                             f"{len(keep) + 1} (one per kept exit plus the final exit)")
        if max_final_cost is not None and costs[-1] > max_final_cost:
            candidates.append({"exits": keep, "exit_costs": costs, "expected_cost": None,
                               "accuracy": None, "over_final_cost": True})
            continue
        if not keep:  # no head: every sample runs to the final exit
            final = logits[-1].argmax(1) == labels
            points = [OperatingPoint(policy, float(final.double().mean()), costs[0], [1.0])]
        else:
            points = sweep([logits[e] for e in keep] + [logits[-1]], labels, costs, policy,
                           num=num)
        try:
            op = choose_operating_point(points, reference_accuracy=reference_accuracy,
                                        max_drop=max_drop)
        except InputError:
            candidates.append({"exits": keep, "exit_costs": costs, "expected_cost": None,
                               "accuracy": None})
            continue
        candidates.append({"exits": keep, "exit_costs": costs, "expected_cost": op.mean_macs,
                           "accuracy": op.accuracy})
        if best is None or op.mean_macs < best[0].mean_macs:
            best = (op, keep)
    if best is None:
        bound = ("" if max_final_cost is None else
                 f" at a final-exit cost <= {max_final_cost:.4g}")
        raise InputError(f"no subset of exits keeps accuracy within {max_drop:.4f} of "
                         f"{reference_accuracy:.4f}{bound}; relax max_drop"
                         f"{' or max_final_cost' if bound else ''} or train better exits")
    return ExitSelection(best[1], best[0], candidates)


# Guarded calibration (Learn-then-Test) ------------------------------------------------------
def min_calibration_samples(epsilon: float, delta: float) -> int:
    """Fewest calibration samples with which any threshold can be certified.

    Even a threshold with no loss on ``n`` samples only passes the binomial test when
    ``(1 - epsilon) ** n <= delta``.
    """
    _check_guard(epsilon, delta)
    return math.ceil(math.log(delta) / math.log1p(-epsilon))


def _check_guard(epsilon: float, delta: float) -> None:
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise InputError(f"epsilon and delta are fractions in (0, 1) (epsilon=0.01 allows a "
                         f"1 pt drop), got epsilon={epsilon}, delta={delta}")


def guard_grid(policy: ThresholdPolicy, num_classes: int, num: int = 60) -> list[float]:
    """A data-independent threshold grid, most conservative (fewest exits) first.

    Learn-then-Test's fixed-sequence testing is valid when the order of the hypotheses does not
    depend on the calibration data, so the grid is fixed in advance: confidences from 1 down
    to 0 (geometric near 1), or entropies from 0 up to ``log(num_classes)``.
    """
    steps = torch.logspace(-5, 0, num, dtype=torch.float64)
    if policy.higher_is_confident:
        lo, hi = policy.valid_range
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError(f"give thresholds= explicitly for policy {policy.name!r}")
        return [hi - float(v) * (hi - lo) for v in steps]
    return [float(v) * math.log(num_classes) for v in steps]


def final_decision(policy: ExitPolicy, logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The decision logits ``policy`` forms at the last exit when no sample left earlier."""
    n, c = logits[0].shape
    state = policy.init_state(n, c)
    decision = logits[-1]
    for e, lg in enumerate(logits):
        _, decision = policy.decide(e, lg, state)
    return decision


def drop_losses(logits: Sequence[torch.Tensor], labels: torch.Tensor, policies: Sequence[
        ExitPolicy], reference_correct: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses ``1[reference right and the policy wrong]`` and exit indices.

    The reference is ``reference_correct`` (per-sample correctness of another model on the
    same samples, e.g. the backbone trained without exits) or, when ``None``, the final exit:
    what the policy predicts when no sample leaves early (for ensembles, the ensemble at the
    last exit). The losses' mean bounds the accuracy drop vs the reference from above.

    Returns:
        ``(losses, exit_index)``, each of shape ``(len(policies), N)``.
    """
    _check(logits, labels)
    reference_correct = _check_reference(reference_correct, labels)
    losses, exits = [], []
    for p in policies:
        final_right = (final_decision(p, logits).argmax(1) == labels
                       if reference_correct is None else reference_correct)
        result = simulate_exits(logits, p)
        losses.append((final_right & (result.predictions != labels)).double())
        exits.append(result.exit_index)
    return torch.stack(losses), torch.stack(exits)


def _check_reference(reference_correct, labels: torch.Tensor) -> torch.Tensor | None:
    if reference_correct is None:
        return None
    if (not isinstance(reference_correct, torch.Tensor)
            or tuple(reference_correct.shape) != tuple(labels.shape)):
        raise InputError("reference_correct is the reference model's per-sample correctness on "
                         f"the same samples: a bool tensor of shape {tuple(labels.shape)}, "
                         f"e.g. baseline(x).argmax(1) == labels")
    return reference_correct.bool()


def learn_then_test(losses: torch.Tensor, epsilon: float, delta: float) -> int:
    """Fixed-sequence Learn-then-Test over binary losses ``(T, N)``, conservative first.

    Hypothesis ``t`` (risk of threshold ``t`` above ``epsilon``) is rejected when the exact
    binomial p-value ``P(Binom(N, epsilon) <= sum of losses)`` is at most ``delta``; testing
    stops at the first threshold not rejected. With probability at least ``1 - delta`` over
    the calibration draw, every rejected threshold has risk at most ``epsilon``.

    Returns:
        How many leading thresholds were certified (0: none).

    Raises:
        InputError: fewer samples than :func:`min_calibration_samples` needs.
    """
    from scipy.stats import binom

    _check_guard(epsilon, delta)
    n = losses.shape[1]
    need = min_calibration_samples(epsilon, delta)
    if n < need:
        raise InputError(f"{n} calibration samples cannot certify an accuracy drop of at most "
                         f"{epsilon} with confidence {1 - delta}: at least {need} are needed; "
                         "use more calibration data or relax epsilon/delta")
    totals = losses.sum(1).round().long().tolist()
    certified = 0
    for k in totals:
        if binom.cdf(k, n, epsilon) > delta:
            break
        certified += 1
    return certified


@dataclass
class GuardedResult:
    """A threshold certified by Learn-then-Test, and what it gives on the calibration data.

    ``policy`` is :class:`NeverExit` (every sample runs to the backbone's own output) when no
    threshold could be certified (``certified`` 0).
    """

    policy: ExitPolicy
    epsilon: float
    delta: float
    calib_samples: int
    certified: int
    calib_risk: float
    accuracy: float
    mean_macs: float
    exit_fractions: list[float]

    to_dict = OperatingPoint.to_dict


def guarded_threshold(logits: Sequence[torch.Tensor], labels: torch.Tensor,
                      exit_macs: Sequence[float], policy: ThresholdPolicy, epsilon: float,
                      delta: float, thresholds: Sequence[float] | None = None,
                      reference_correct: torch.Tensor | None = None) -> GuardedResult:
    """The cheapest threshold whose accuracy drop vs the final exit is at most ``epsilon``
    with probability at least ``1 - delta`` (Learn-then-Test, Angelopoulos et al. 2021).

    The loss of a sample is 1 when the final exit is right and the early-exit prediction is
    wrong; its expectation bounds the accuracy drop. Thresholds are tested in a fixed order
    from the most conservative (:func:`guard_grid` unless given), on calibration logits only.

    Args:
        logits: per-exit logits of the calibration split (i.i.d. with the traffic served).
        labels: their classes.
        exit_macs: the cost table's ``exit_macs``.
        policy: a threshold policy (its threshold is replaced).
        epsilon: tolerated accuracy drop, a fraction (0.01 = 1 pt).
        delta: tolerated probability that the guarantee fails.
        thresholds: candidate thresholds (sorted most conservative first for you).
        reference_correct: bound the drop vs another model (its per-sample correctness on
            the calibration samples, e.g. the backbone trained without exits) instead of
            vs the final exit.

    Raises:
        InputError: bad epsilon/delta, a policy without a threshold, or too few calibration
            samples for epsilon/delta (the message says how many are needed).
    """
    _check_guard(epsilon, delta)
    if not isinstance(policy, ThresholdPolicy):
        raise InputError(f"guarded calibration needs a threshold policy, got "
                         f"{getattr(policy, 'name', type(policy).__name__)!r}")
    _check(logits, labels, policy)
    if len(logits) != len(exit_macs):
        raise InputError(f"{len(logits)} exits of logits but {len(exit_macs)} exit costs")
    n = len(labels)
    need = min_calibration_samples(epsilon, delta)
    if n < need:
        raise InputError(f"{n} calibration samples cannot certify an accuracy drop of at most "
                         f"{epsilon} with confidence {1 - delta}: at least {need} are needed; "
                         "use more calibration data or relax epsilon/delta")
    grid = list(thresholds) if thresholds is not None else guard_grid(policy,
                                                                       logits[0].shape[1])
    grid = sorted(set(float(t) for t in grid), reverse=policy.higher_is_confident)
    candidates = [policy.with_threshold(t) for t in grid]
    losses, exits = drop_losses(logits, labels, candidates, reference_correct)
    certified = learn_then_test(losses, epsilon, delta)
    if certified == 0:
        chosen: ExitPolicy = NeverExit(temperature=policy.temperature)
        exit_index = torch.full_like(labels, len(logits) - 1)
        risk = 0.0
    else:
        macs = [mean_macs(exits[i], exit_macs) for i in range(certified)]
        best = min(range(certified), key=lambda i: (macs[i], i))
        chosen, exit_index, risk = candidates[best], exits[best], float(losses[best].mean())
    result = simulate_exits(logits, chosen)
    return GuardedResult(chosen, epsilon, delta, n, certified, risk, result.accuracy(labels),
                         mean_macs(exit_index, exit_macs),
                         result.exit_fractions(len(logits)))


# One entry point: sweep or guarded, whichever the calibration set supports ----------------
@dataclass
class Calibration:
    """The operating point :func:`calibrate` chose, how it was chosen, and what the
    calibration split says about its accuracy drop.

    Attributes:
        mode: ``"sweep"`` or ``"guarded"``: the mode used (``"auto"`` resolved).
        reason: why that mode, in words.
        policy, accuracy, mean_macs, exit_fractions: the chosen point (on calibration).
        target: ``{"max_drop": fraction}`` or ``{"macs_budget": MACs}``.
        reference_accuracy: the reference's calibration accuracy.
        calib_samples: calibration samples used.
        calib_drop_pt: the point's accuracy drop vs the reference on the calibration split.
        calib_drop_ci95_pt: its 95% paired interval ``[low, high]`` (:func:`paired_drop_ci`).
        delta: the guarded mode's tolerated failure probability.
        min_guarded_samples: fewest calibration samples with which any early exit can be
            certified within the drop target at confidence ``1 - delta`` (drop targets only).
        certified: thresholds certified by the guarded mode (``None`` for a sweep).
        warning: set when nothing shows that the point holds its target on new data (the
            calibration set is too small); also issued as a :class:`CalibrationWarning`.
        points: every swept point (for a Pareto front; empty in the guarded mode).
    """

    mode: str
    reason: str
    policy: ExitPolicy
    accuracy: float
    mean_macs: float
    exit_fractions: list[float]
    target: dict
    reference_accuracy: float
    calib_samples: int
    calib_drop_pt: float
    calib_drop_ci95_pt: list[float]
    delta: float
    min_guarded_samples: int | None
    certified: int | None = None
    warning: str | None = None
    points: list[OperatingPoint] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "points"}
        d["policy"] = self.policy.config()
        return d


def calibrate(logits: Sequence[torch.Tensor], labels: torch.Tensor,
              exit_macs: Sequence[float], policy: ExitPolicy, *,
              max_drop: float | None = None, macs_budget: float | None = None,
              reference_correct: torch.Tensor | None = None, mode: str = "auto",
              delta: float = 0.05, num: int = 100) -> Calibration:
    """Choose an operating point for a drop target or a MACs budget, and say how sure it is.

    Modes:

    - ``"sweep"``: the cheapest swept threshold whose calibration accuracy is within
      ``max_drop`` of the reference (or the most accurate within ``macs_budget``). It meets
      the target on the calibration samples only; on new data it may not.
    - ``"guarded"``: Learn-then-Test (:func:`guarded_threshold`): the drop vs the reference
      is at most ``max_drop`` with probability at least ``1 - delta``. Needs at least
      :func:`min_calibration_samples` ``(max_drop, delta)`` samples.
    - ``"auto"`` (default), for a drop target:

      1. fewer samples than the guarded mode needs: no early exit can be shown to hold the
         target, so the sweep's point is kept and a :class:`CalibrationWarning` (also in
         ``warning``) gives its calibration interval and how many samples would be needed;
      2. else the sweep's point when the upper end of the 95% interval of its calibration
         drop (:func:`paired_drop_ci`) is within the target: the calibration set shows a
         margin (on large calibration sets; the guarded mode would only be more cautious);
      3. else the guarded mode: the sweep's point lies too close to the target for this many
         samples to tell it apart, and a sweep would miss the target on new data about half
         the time.

      A MACs budget is always a sweep (no drop is promised).

    An explicit ``mode`` is always honoured: ``"sweep"`` warns as in 1 or 3, ``"guarded"``
    raises :class:`InputError` when the calibration set is too small for it.

    Args:
        logits: per-exit calibration logits (the last is the final exit).
        labels: their classes.
        exit_macs: the cost table's ``exit_macs``.
        policy: the policy whose threshold is chosen (a threshold policy for guarded).
        max_drop: tolerated accuracy drop vs the reference, a fraction (0.01 = 1 pt).
        macs_budget: instead, mean MACs at most this.
        reference_correct: per-sample correctness of the reference on the calibration
            samples (e.g. the backbone trained without exits); the final exit's when ``None``.
        mode: ``"auto"``, ``"sweep"`` or ``"guarded"``.
        delta: the guarded mode's tolerated probability that its bound fails.

    Raises:
        InputError: bad targets, mode or delta; no threshold meets the target; the guarded
            mode asked for with too few samples or a policy without a threshold.
    """
    if mode not in CALIBRATION_MODES:
        raise InputError(f"unknown calibration mode {mode!r}: use one of "
                         f"{', '.join(CALIBRATION_MODES)}")
    if (max_drop is None) == (macs_budget is None):
        raise InputError("give exactly one target: max_drop (a fraction, 0.01 = 1 pt) or "
                         "macs_budget (mean MACs)")
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta < 1:
        raise InputError(f"delta is a probability in (0, 1) (0.05: the bound holds with 95% "
                         f"confidence), got {delta!r}")
    _check(logits, labels, policy)
    reference = _check_reference(reference_correct, labels)
    if reference is None:
        reference = final_decision(policy, logits).argmax(1) == labels
    ref_acc = float(reference.double().mean())
    n = len(labels)

    def interval(chosen: ExitPolicy) -> list[float]:
        right = simulate_exits(logits, chosen).predictions == labels
        return list(paired_drop_ci(reference, right))

    if macs_budget is not None:
        if mode == "guarded":
            raise InputError("the guarded mode bounds an accuracy drop: give max_drop, or use "
                             "mode='sweep' for a MACs budget")
        points = sweep(logits, labels, exit_macs, policy, num=num)
        op = choose_operating_point(points, macs_budget=macs_budget)
        drop, lo, hi = interval(op.policy)
        return Calibration("sweep", "a MACs budget: the most accurate swept point within it",
                           op.policy, op.accuracy, op.mean_macs, op.exit_fractions,
                           {"macs_budget": macs_budget}, ref_acc, n, drop, [lo, hi], delta,
                           None, points=points)

    _check_fraction("max_drop", max_drop, "0.005 = 0.5 pt")
    need = min_calibration_samples(max_drop, delta) if 0 < max_drop < 1 else None
    target = {"max_drop": max_drop}
    if mode == "guarded":
        return _guarded(logits, labels, exit_macs, policy, max_drop, delta, reference, ref_acc,
                        need, interval, "asked for")
    points = sweep(logits, labels, exit_macs, policy, num=num)
    op = choose_operating_point(points, reference_accuracy=ref_acc, max_drop=max_drop)
    drop, lo, hi = interval(op.policy)
    shown = hi <= 100 * max_drop + 1e-9
    too_few = max_drop == 0 or (need is not None and n < need)  # (max_drop 1: always held)
    unguarded = None  # why auto could not use the guarded mode
    if mode == "auto" and not too_few and not shown:
        try:
            return _guarded(logits, labels, exit_macs, policy, max_drop, delta, reference,
                            ref_acc, need, interval, f"the sweep's point drops {drop:.2f} pt "
                            f"on the {n} calibration samples (95% interval {lo:.2f}..{hi:.2f} "
                            f"pt), too close to the {100 * max_drop:g} pt target for a sweep "
                            "to hold it")
        except InputError as exc:  # e.g. a policy without a threshold to guard
            unguarded = str(exc)
    warning = None
    trivial = reference_correct is None and op.exit_fractions[-1] == 1.0  # the final exit
    if too_few and not trivial:
        warning = (f"{n} calibration samples are too few to show that a {100 * max_drop:g} pt "
                   f"drop target holds on new data: the chosen point drops {drop:.2f} pt on "
                   f"them (95% interval {lo:.2f}..{hi:.2f} pt)")
        warning += (f", and the guarded mode needs at least {need} samples to certify any "
                    f"early exit at confidence {1 - delta:g}; use a larger calibration split, "
                    "relax the target, or treat the target as unmet" if need else
                    "; a 0 pt target cannot be certified from samples: relax max_drop")
        reason = "too few calibration samples for the guarded mode"
    elif not shown and not trivial:
        warning = (f"the sweep's point drops {drop:.2f} pt on the {n} calibration samples (95% "
                   f"interval {lo:.2f}..{hi:.2f} pt): the calibration set cannot show that it "
                   f"stays within the {100 * max_drop:g} pt target on new data; "
                   + (f"mode='guarded' certifies the target with confidence {1 - delta:g}"
                      if unguarded is None else f"the guarded mode does not apply: {unguarded}"))
        reason = "asked for" if unguarded is None else "the guarded mode does not apply"
    else:
        reason = (f"the 95% interval of the sweep's calibration drop ({lo:.2f}..{hi:.2f} pt) "
                  f"lies within the {100 * max_drop:g} pt target")
        if mode == "sweep":
            reason = "asked for; " + reason
    if warning:
        warnings.warn(warning, CalibrationWarning, stacklevel=2)
    return Calibration("sweep", reason, op.policy, op.accuracy, op.mean_macs, op.exit_fractions,
                       target, ref_acc, n, drop, [lo, hi], delta, need, warning=warning,
                       points=points)


def _guarded(logits, labels, exit_macs, policy, max_drop, delta, reference, ref_acc, need,
             interval, reason: str) -> Calibration:
    g = guarded_threshold(logits, labels, exit_macs, policy, max_drop, delta,
                          reference_correct=reference)
    drop, lo, hi = interval(g.policy)
    if g.certified == 0:
        reason += "; no threshold could be certified, so no sample exits early"
    return Calibration("guarded", reason, g.policy, g.accuracy, g.mean_macs, g.exit_fractions,
                       {"max_drop": max_drop}, ref_acc, len(labels), drop, [lo, hi], delta,
                       need, certified=g.certified)
