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

from .auto import Calibration, calibrate
from .guarded import (
    GuardedResult,
    drop_losses,
    final_decision,
    guard_grid,
    guarded_threshold,
    learn_then_test,
    min_calibration_samples,
)
from .per_exit import per_exit_thresholds
from .selection import ExitSelection, exit_costs, select_exits
from .sweep import (
    CALIBRATION_MODES,
    CalibrationWarning,
    OperatingPoint,
    candidate_thresholds,
    choose_operating_point,
    oracle,
    paired_drop_ci,
    pareto_front,
    sweep,
)

__all__ = ["OperatingPoint", "sweep", "pareto_front", "oracle", "choose_operating_point",
           "candidate_thresholds", "GuardedResult", "guarded_threshold", "learn_then_test",
           "min_calibration_samples", "guard_grid", "drop_losses", "final_decision",
           "exit_costs", "select_exits", "ExitSelection", "paired_drop_ci", "calibrate",
           "Calibration", "CalibrationWarning", "CALIBRATION_MODES", "per_exit_thresholds"]
