"""Operating points of a dense multi-exit model on the calibration split: per-exit summaries
(per-sample confusion matrices and policy statistics, streamed so no logit map is kept), the
threshold sweep over mIoU and mean MACs, and the oracle bound.

The sweep replays a plain threshold policy (``pixelshare``, ``meanconf``): a sample leaves at
the first exit whose statistic reaches the threshold, exactly as the exit loop decides (tested
against :func:`~splitexit.runtime.loop.simulate_exits`); mIoU is not a mean over samples, so it
is computed from the summed confusion matrices of where each sample left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..calibration import OperatingPoint
from ..errors import InputError
from ..policies import ThresholdPolicy
from .metrics import miou, pixel_accuracy, sample_confusions

__all__ = ["ExitSummary", "summarize_exits", "summarize_logits", "dense_sweep", "dense_oracle",
           "first_exits", "stack_summaries", "policy_key"]


@dataclass
class ExitSummary:
    """What the sweeps need of a model's exits on a data set.

    Attributes:
        confusions: ``(exits, N, C, C)`` per-sample confusion matrices of every exit.
        stats: ``{policy key: (exits - 1, N)}`` the policy statistics of the early exits.
    """

    confusions: torch.Tensor
    stats: dict[str, torch.Tensor]

    @property
    def num_exits(self) -> int:
        return int(self.confusions.shape[0])

    def exit_miou(self) -> list[float]:
        """mIoU of every exit when every sample stops there (the anytime view)."""
        return [float(miou(c.sum(0))) for c in self.confusions]

    def exit_pixel_accuracy(self) -> list[float]:
        return [float(pixel_accuracy(c.sum(0))) for c in self.confusions]


def policy_key(policy: ThresholdPolicy) -> str:
    """A policy without its threshold, as a key of :attr:`ExitSummary.stats`."""
    cfg = policy.config()
    cfg.pop("threshold", None)
    return ",".join(f"{k}={v}" for k, v in sorted(cfg.items()))


def summarize_logits(logits: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int,
                     policies: Sequence[ThresholdPolicy], with_final: bool = True
                     ) -> ExitSummary:
    """:class:`ExitSummary` of every exit's logits ``[(N, C, H, W), ...]``; the last is the
    final exit (no statistic) unless ``with_final`` is false (early exits only)."""
    confusions = torch.stack([sample_confusions(lg.argmax(1), labels, num_classes)
                              for lg in logits])
    early = logits[:-1] if with_final else logits
    stats = {policy_key(p): torch.stack([p.statistic(p.scaled(e, lg))
                                         for e, lg in enumerate(early)])
             if len(early) else torch.zeros(0, len(labels)) for p in policies}
    return ExitSummary(confusions, stats)


@torch.no_grad()
def summarize_exits(model, x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    policies: Sequence[ThresholdPolicy], batch_size: int = 100) -> ExitSummary:
    """:class:`ExitSummary` of ``model`` (a dense :class:`MultiExitModel`, eval mode) over
    ``x`` with label maps ``labels``, in batches."""
    if tuple(labels.shape) != (x.shape[0], *x.shape[2:]):
        raise InputError(f"label maps {tuple(labels.shape)} do not match images "
                         f"{tuple(x.shape)}; give one (H, W) map per image")
    model.eval()
    parts = [summarize_logits(model(x[i: i + batch_size]), labels[i: i + batch_size],
                              num_classes, policies) for i in range(0, len(x), batch_size)]
    return ExitSummary(torch.cat([p.confusions for p in parts], 1),
                       {k: torch.cat([p.stats[k] for p in parts], 1) for k in parts[0].stats})


def first_exits(stats: torch.Tensor, thresholds: torch.Tensor,
                higher_is_confident: bool = True) -> torch.Tensor:
    """``(T, N)``: the exit each sample leaves at for each threshold (the first whose statistic
    reaches it; the final exit, ``len(stats)``, when none does). The thresholds are compared
    in the statistics' dtype: float32 statistics in float32, as every runtime compares a
    float32 statistic with a Python float threshold (numpy, torch and the ONNX graphs)."""
    exits, n = stats.shape
    if exits == 0:
        return torch.zeros(len(thresholds), n, dtype=torch.long)
    t = thresholds.to(stats.dtype).view(-1, 1, 1)
    fire = stats[None] >= t if higher_is_confident else stats[None] <= t
    fire = torch.cat([fire, torch.ones(len(thresholds), 1, n, dtype=torch.bool)], 1)
    return fire.to(torch.uint8).argmax(1)


def _points(summary_conf: torch.Tensor, first: torch.Tensor, exit_macs: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mIoU, pixel accuracy, mean MACs and exit fractions per row of ``first`` (T, N)."""
    exits, n, c, _ = summary_conf.shape
    flat = summary_conf.reshape(exits, n, c * c).double()
    # (T, C, C): per threshold, the confusions of the exit every sample left at, summed; one
    # (T, N) x (N, C*C) product per exit (exact: pixel counts are far below 2**53)
    per_t = sum((first == e).double() @ flat[e] for e in range(exits)).view(-1, c, c)
    fractions = torch.stack([torch.bincount(f, minlength=exits) for f in first]).double() / n
    return miou(per_t), pixel_accuracy(per_t), exit_macs[first].mean(1), fractions


def dense_sweep(summary: ExitSummary, exit_macs: Sequence[float], policy: ThresholdPolicy,
                thresholds: Sequence[float] | None = None, num: int = 60
                ) -> list[OperatingPoint]:
    """Replay ``policy`` at many thresholds (quantiles of its statistic when ``None``).

    Returns:
        One :class:`~splitexit.calibration.OperatingPoint` per threshold; its ``accuracy``
        holds the **mIoU** (so :func:`~splitexit.calibration.pareto_front` and
        :func:`~splitexit.calibration.choose_operating_point` apply unchanged).

    Raises:
        InputError: the summary lacks the policy's statistic, or costs do not fit its exits.
    """
    key = policy_key(policy)
    if key not in summary.stats:
        raise InputError(f"no statistic for {key!r} in this summary (it has "
                         f"{sorted(summary.stats)}); pass the policy to summarize_exits")
    if len(exit_macs) != summary.num_exits:
        raise InputError(f"{summary.num_exits} exits but {len(exit_macs)} exit costs")
    stats = summary.stats[key]
    if thresholds is None:
        flat = stats.flatten().double()
        grid = torch.quantile(flat, torch.linspace(0, 1, num, dtype=torch.float64)) if len(
            flat) else torch.zeros(1, dtype=torch.float64)
        thresholds = sorted({*grid.tolist(), 1.0})
    t = torch.tensor(list(thresholds), dtype=torch.float64)
    first = first_exits(stats, t, policy.higher_is_confident)  # in float32, as the runtimes
    scores, accs, macs, fractions = _points(summary.confusions, first,
                                            torch.tensor(list(exit_macs), dtype=torch.float64))
    points = []
    for i, value in enumerate(t.tolist()):
        point = OperatingPoint(policy.with_threshold(value), float(scores[i]), float(macs[i]),
                               fractions[i].tolist())
        point.pixel_accuracy = float(accs[i])
        points.append(point)
    return points


def dense_oracle(summary: ExitSummary, exit_macs: Sequence[float]) -> dict:
    """Each sample leaves at the earliest exit whose own mIoU on it is the best of all exits:
    the bound a perfect policy reaches with these heads (quality up, cost down)."""
    per_sample = miou(summary.confusions)  # (exits, N)
    best = per_sample.max(0).values
    first = (per_sample >= best - 1e-12).to(torch.uint8).argmax(0)
    scores, accs, macs, fractions = _points(summary.confusions, first[None],
                                            torch.tensor(list(exit_macs), dtype=torch.float64))
    return {"miou": float(scores[0]), "pixel_accuracy": float(accs[0]),
            "mean_macs": float(macs[0]), "exit_fractions": fractions[0].tolist()}


def stack_summaries(heads: Sequence[ExitSummary], final: ExitSummary) -> ExitSummary:
    """The summary of a model assembled from single-exit summaries: one per early exit (a
    head, in exit order) and the final exit's."""
    n = final.confusions.shape[1]
    keys = heads[0].stats if heads else final.stats
    stats = {k: torch.cat([h.stats[k] for h in heads]) if heads else torch.zeros(0, n)
             for k in keys}
    return ExitSummary(torch.cat([*[h.confusions for h in heads], final.confusions[-1:]]),
                       stats)
