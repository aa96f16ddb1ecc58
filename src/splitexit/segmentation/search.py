"""MESS's head search: candidate dense heads (type, width, depth, dilation) at every cut are
trained at once on the frozen backbone, then the number, placement and architecture of the
exits (and the policy) are chosen on the calibration split within a MAC budget."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import OperatingPoint, choose_operating_point
from ..errors import InputError
from ..multiexit import MultiExitModel
from ..policies import ThresholdPolicy
from ..training import Strategy, TrainConfig, train
from ..training.base import freeze
from .heads import create_dense_head
from .model import create_segmenter, head_macs
from .sweep import ExitSummary, dense_sweep, stack_summaries, summarize_logits

__all__ = ["DEFAULT_CANDIDATES", "CandidateBank", "train_candidates", "fit_candidates",
           "summarize_candidates", "search_heads", "SearchResult", "assemble", "choose_policy",
           "policy_score"]

#: head architectures tried at every cut (kind and keyword arguments)
DEFAULT_CANDIDATES: tuple[dict, ...] = (
    {"kind": "pointwise"},
    {"kind": "conv", "depth": 1},
    {"kind": "conv", "depth": 2, "dilation": 2},
    {"kind": "depthwise", "depth": 2, "dilation": 2},
)


class CandidateBank(nn.Module):
    """A frozen dense backbone plus candidate heads at its cuts; ``forward`` gives every
    candidate's logits (in :attr:`candidates` order), running the backbone once."""

    dense = True

    def __init__(self, model: MultiExitModel, candidates: Sequence[Mapping]):
        super().__init__()
        if not getattr(model, "dense", False) or model.input_shape is None:
            raise InputError("the candidate bank needs a dense MultiExitModel with an input "
                             "shape (create_segmenter)")
        self.backbone = model.backbone
        shapes = self.backbone.payload_shapes(torch.zeros(1, *model.input_shape))
        out = tuple(model.input_shape[1:])
        self.candidates = [dict(c) for c in candidates]
        heads = []
        for c in self.candidates:
            spec = {k: v for k, v in c.items() if k not in ("cut", "kind")}
            spec.setdefault("guide", getattr(self.backbone, "guide", 0))
            heads.append(create_dense_head(c["kind"], shapes[c["cut"]], _classes(model), out,
                                           **spec))
        self.heads = nn.ModuleList(heads)
        self._stage_of = [self.backbone.cut_index(c["cut"]) for c in self.candidates]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs: list[torch.Tensor | None] = [None] * len(self.heads)
        payload = x
        last = max(self._stage_of)
        with torch.no_grad():  # the backbone is frozen: no graph through it
            feats = {}
            for k, stage in enumerate(self.backbone.stages[: last + 1]):
                payload = stage(payload)
                feats[k] = payload
        for i, head in enumerate(self.heads):
            outs[i] = head(feats[self._stage_of[i]])
        return outs  # type: ignore[return-value]


def _classes(model: MultiExitModel) -> int:
    config = getattr(model, "segmenter", None)
    if not config:
        raise InputError("build the model with splitexit.segmentation.create_segmenter")
    return int(config["num_classes"])


class _AllCandidates(Strategy):
    """Every candidate's pixel-wise cross-entropy, the backbone frozen (stage 2 of MESS's
    two-stage training, for many heads at once)."""

    name = "mess-candidates"

    def prepare(self, model, data=None):
        freeze([model.backbone])

    def loss(self, model, x, y):
        outs = model(x)
        return sum(F.cross_entropy(o, y) for o in outs)


def fit_candidates(bank: CandidateBank, data, config: TrainConfig | None = None,
                   **overrides) -> CandidateBank:
    """Train every candidate head of ``bank`` on ``data``, its backbone frozen."""
    train(bank, data, _AllCandidates(), config, **overrides)
    return bank.eval()


def train_candidates(model: MultiExitModel, data, candidates: Sequence[Mapping] | None = None,
                     config: TrainConfig | None = None, **overrides) -> CandidateBank:
    """Train candidate heads at every cut of ``model``'s (trained, then frozen) backbone.

    Args:
        candidates: ``{"cut", "kind", **kwargs}`` each; default: :data:`DEFAULT_CANDIDATES`
            at every cut.
    """
    if candidates is None:
        candidates = [{"cut": cut, **c} for cut in model.backbone.cut_names
                      for c in DEFAULT_CANDIDATES]
    return fit_candidates(CandidateBank(model, candidates), data, config, **overrides)


@torch.no_grad()
def summarize_candidates(bank: CandidateBank, model: MultiExitModel, x: torch.Tensor,
                         labels: torch.Tensor, num_classes: int,
                         policies: Sequence[ThresholdPolicy], batch_size: int = 100
                         ) -> tuple[list[ExitSummary], ExitSummary]:
    """Per-candidate single-exit summaries and the final exit's, over ``x``."""
    bank.eval()
    model.eval()
    per: list[list[ExitSummary]] = [[] for _ in bank.heads]
    final: list[ExitSummary] = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i: i + batch_size], labels[i: i + batch_size]
        for j, lg in enumerate(bank(xb)):
            per[j].append(summarize_logits([lg], yb, num_classes, policies, with_final=False))
        final.append(summarize_logits([model.backbone(xb)], yb, num_classes, []))

    def join(parts: list[ExitSummary]) -> ExitSummary:
        return ExitSummary(torch.cat([p.confusions for p in parts], 1),
                           {k: torch.cat([p.stats[k] for p in parts], 1)
                            for k in parts[0].stats})

    return [join(p) for p in per], join(final)


def policy_score(points: Sequence[OperatingPoint], reference_miou: float, max_drop: float
                 ) -> tuple[tuple, OperatingPoint]:
    """The search's score of one policy's sweep (lower is better) and its point: the cheapest
    mean MACs within ``max_drop`` of ``reference_miou`` (then the higher mIoU), or, when no
    point is within the drop, the highest mIoU; ties go to the policy whose statistic reads
    fewer pixels (a ``stride`` grid: the same exits at less work)."""
    pixels = 1.0 / getattr(points[0].policy, "stride", 1) ** 2
    try:
        point = choose_operating_point(points, reference_accuracy=reference_miou,
                                       max_drop=max_drop)
        return (0, point.mean_macs, -point.accuracy, pixels), point
    except InputError:
        point = max(points, key=lambda p: (p.accuracy, -p.mean_macs))
        return (1, -point.accuracy, point.mean_macs, pixels), point


def choose_policy(summary: ExitSummary, exit_macs: Sequence[float],
                  policies: Sequence[ThresholdPolicy], reference_miou: float,
                  max_drop: float = 0.01, num_thresholds: int = 60) -> OperatingPoint:
    """The policy and threshold of a model's exits chosen on ``summary`` (calibration) by the
    rule :func:`search_heads` applies to every head configuration (:func:`policy_score`).

    Raises:
        InputError: no policies, or one the summary has no statistic for.
    """
    if not policies:
        raise InputError("choose_policy needs at least one policy")
    scored = [policy_score(dense_sweep(summary, exit_macs, p, num=num_thresholds),
                           reference_miou, max_drop) for p in policies]
    return min(scored, key=lambda sp: sp[0])[1]


@dataclass
class SearchResult:
    """The chosen exits and what every configuration tried gave on calibration."""

    heads: list[dict]
    policy: ThresholdPolicy
    calib_miou: float
    calib_mean_macs: float
    exit_macs: list[float]
    tried: list[dict] = field(default_factory=list)


def search_heads(bank: CandidateBank, summaries: Sequence[ExitSummary], final: ExitSummary,
                 stage_macs: Sequence[float], policies: Sequence[ThresholdPolicy],
                 reference_miou: float, max_drop: float = 0.01,
                 head_budget: float | None = None, max_heads: int | None = None,
                 num_thresholds: int = 40) -> SearchResult:
    """Choose the number, placement and type of exit heads and the policy on calibration.

    Every configuration (at most one candidate per cut, at least one head, total head MACs
    within ``head_budget``) is swept; its score is the cheapest mean MACs whose calibration
    mIoU is within ``max_drop`` of ``reference_miou`` (when none is, the smallest drop). The
    configuration with the best score wins (:func:`policy_score`).

    Args:
        stage_macs: MACs of every backbone stage (the cost table's).
    """
    if not bank.candidates:
        raise InputError("no candidate heads to search")
    cum = list(itertools.accumulate(stage_macs))
    macs = [head_macs(h) for h in bank.heads]
    by_cut: dict[int, list[int]] = {}
    for i, stage in enumerate(bank._stage_of):
        by_cut.setdefault(stage, []).append(i)
    cuts = sorted(by_cut)
    best, tried = None, []
    for choice in itertools.product(*[[None, *by_cut[c]] for c in cuts]):
        chosen = [i for i in choice if i is not None]
        if not chosen or (max_heads and len(chosen) > max_heads):
            continue
        total_head = sum(macs[i] for i in chosen)
        if head_budget is not None and total_head > head_budget:
            continue
        exit_macs = [cum[bank._stage_of[i]] + sum(macs[j] for j in chosen[: n + 1])
                     for n, i in enumerate(chosen)] + [cum[-1] + total_head]
        summary = stack_summaries([summaries[i] for i in chosen], final)
        for policy in policies:
            points = dense_sweep(summary, exit_macs, policy, num=num_thresholds)
            score, point = policy_score(points, reference_miou, max_drop)
            row = {"heads": [bank.candidates[i] for i in chosen], "policy": point.policy.config(),
                   "calib_miou": point.accuracy, "calib_mean_macs": point.mean_macs,
                   "head_macs": total_head, "meets_drop": score[0] == 0}
            tried.append(row)
            if best is None or score < best[0]:
                best = (score, chosen, point, exit_macs)
    if best is None:
        raise InputError(f"no head configuration fits the head budget of {head_budget:.0f} "
                         f"MACs (cheapest head: {min(macs):.0f}); raise it")
    _, chosen, point, exit_macs = best
    return SearchResult([dict(bank.candidates[i]) for i in chosen], point.policy,
                        point.accuracy, point.mean_macs, exit_macs, tried)


def assemble(bank: CandidateBank, model: MultiExitModel, heads: Sequence[Mapping]
             ) -> MultiExitModel:
    """The multi-exit model with ``heads`` (candidates of ``bank``), weights shared with
    ``model``'s backbone and copied from the trained candidates."""
    config = getattr(model, "segmenter", None) or {}
    built = create_segmenter(config.get("num_classes", _classes(model)),
                             tuple(model.input_shape), heads, config.get("model", "segnet"),
                             config.get("model_kwargs"))
    built.backbone.load_state_dict(model.backbone.state_dict())
    index = {_key(c): i for i, c in enumerate(bank.candidates)}
    for e, spec in enumerate(heads):
        built.heads[e].load_state_dict(bank.heads[index[_key(spec)]].state_dict())
    return built.eval()


def _key(spec: Mapping) -> str:
    return repr(sorted(spec.items()))
