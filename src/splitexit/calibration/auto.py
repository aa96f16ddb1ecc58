"""calibrate(): the one entry point that chooses between a sweep and the guarded mode, and says
how sure it is."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..errors import InputError
from ..multiexit import simulate_exits
from ..policies import ExitPolicy
from .guarded import (
    _check_reference,
    final_decision,
    guarded_threshold,
    min_calibration_samples,
)
from .sweep import (
    CALIBRATION_MODES,
    CalibrationWarning,
    OperatingPoint,
    _check,
    _check_fraction,
    choose_operating_point,
    paired_drop_ci,
    sweep,
)


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
