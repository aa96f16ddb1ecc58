"""Which exits to keep: subsets chosen by predicted or measured latency under a bound."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..policies import ExitPolicy
from .sweep import (
    OperatingPoint,
    _check,
    _check_fraction,
    choose_operating_point,
    sweep,
)


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
