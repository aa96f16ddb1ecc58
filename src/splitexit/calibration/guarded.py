"""The guarded mode (Learn-then-Test): a threshold whose accuracy drop is bounded with a
stated probability."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..cost import mean_macs
from ..errors import InputError
from ..multiexit import simulate_exits
from ..policies import ExitPolicy, NeverExit, ThresholdPolicy
from .sweep import (
    OperatingPoint,
    _check,
)


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
