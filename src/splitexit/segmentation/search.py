"""MESS's head search: candidate dense heads (type, width, depth, dilation) at every cut are
trained at once on the frozen backbone (or, in a one-shot joint bank, with it), then the
number, placement and architecture of the exits (and the policy) are chosen on the
calibration split within a MAC budget: the fewest mean MACs, or the lowest expected batch-1
latency from a table of the exit program's pieces measured on ONNX Runtime
(:class:`LatencyTable`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
from .sweep import ExitSummary, dense_sweep, policy_key, stack_summaries, summarize_logits

__all__ = ["DEFAULT_CANDIDATES", "CandidateBank", "train_candidates", "fit_candidates",
           "summarize_candidates", "search_heads", "SearchResult", "assemble", "choose_policy",
           "policy_score", "choose_point", "LatencyTable", "measure_latency_table",
           "head_label"]

#: head architectures tried at every cut (kind and keyword arguments)
DEFAULT_CANDIDATES: tuple[dict, ...] = (
    {"kind": "pointwise"},
    {"kind": "conv", "depth": 1},
    {"kind": "conv", "depth": 2, "dilation": 2},
    {"kind": "depthwise", "depth": 2, "dilation": 2},
)


class CandidateBank(nn.Module):
    """A dense backbone plus candidate heads at its cuts; ``forward`` gives every candidate's
    logits (in :attr:`candidates` order), running the backbone once.

    The backbone is frozen (MESS's second stage: ``joint=False``), or trained with every
    candidate at once (``joint=True``: a one-shot supernet whose candidates are judged as
    jointly trained heads; see :func:`fit_candidates`)."""

    dense = True

    def __init__(self, model: MultiExitModel, candidates: Sequence[Mapping], joint: bool = False):
        super().__init__()
        self.joint = bool(joint)
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
        return self.run(x)[0]

    def run(self, x: torch.Tensor, final: bool = False
            ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Every candidate's logits and, with ``final``, the backbone's own output."""
        payload = x
        stages = self.backbone.stages if final else self.backbone.stages[
            : max(self._stage_of) + 1]
        # a frozen backbone (two-stage) builds no graph; a joint bank trains through it
        with torch.set_grad_enabled(self.joint and torch.is_grad_enabled()):
            feats = []
            for stage in stages:
                payload = stage(payload)
                feats.append(payload)
        outs = [head(feats[self._stage_of[i]]) for i, head in enumerate(self.heads)]
        return outs, (payload if final else None)


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


class _JointCandidates(Strategy):
    """A joint bank: the final exit's cross-entropy and, per cut, the mean of its candidates'
    (so a cut with many candidates pulls the backbone no harder than one with few), averaged
    over the final exit and the cuts; backbone and heads learn together."""

    name = "mess-joint-candidates"

    def loss(self, model, x, y):
        outs, final = model.run(x, final=True)
        by_cut: dict[int, list[torch.Tensor]] = {}
        for stage, o in zip(model._stage_of, outs):
            by_cut.setdefault(stage, []).append(F.cross_entropy(o, y))
        terms = [F.cross_entropy(final, y), *(sum(v) / len(v) for v in by_cut.values())]
        return sum(terms) / len(terms)


def fit_candidates(bank: CandidateBank, data, config: TrainConfig | None = None,
                   **overrides) -> CandidateBank:
    """Train every candidate head of ``bank`` on ``data``: with its backbone frozen, or, for
    a ``joint`` bank, with the backbone (see :class:`CandidateBank`)."""
    train(bank, data, _JointCandidates() if bank.joint else _AllCandidates(), config,
          **overrides)
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


def choose_point(points: Sequence[OperatingPoint], reference_miou: float, max_drop: float,
                 cost: Callable[[OperatingPoint], float] | None = None,
                 macs_budget: float | None = None) -> OperatingPoint:
    """The point of ``points`` within ``max_drop`` of ``reference_miou`` of the lowest
    ``cost`` (default: mean MACs), then the fewest MACs, then the highest mIoU
    (:func:`~splitexit.calibration.choose_operating_point`), among those within
    ``macs_budget`` mean MACs when given.

    Raises:
        InputError: no point meets the drop and the budget.
    """
    within = [p for p in points if macs_budget is None or p.mean_macs <= macs_budget]
    if not within:
        raise InputError(f"no threshold gives at most {macs_budget:.0f} mean MACs; raise the "
                         "MAC budget")
    return choose_operating_point(within, reference_accuracy=reference_miou,
                                  max_drop=max_drop, cost=cost)


def policy_score(points: Sequence[OperatingPoint], reference_miou: float, max_drop: float,
                 cost: Callable[[OperatingPoint], float] | None = None,
                 macs_budget: float | None = None) -> tuple[tuple, OperatingPoint]:
    """The search's score of one policy's sweep (lower is better) and its point: the lowest
    ``cost`` (default: mean MACs; e.g. a :class:`LatencyTable`'s expected batch-1 latency)
    within ``max_drop`` of ``reference_miou`` and ``macs_budget`` (:func:`choose_point`), or,
    when no point is, the highest mIoU; ties go to the policy whose statistic reads fewer
    pixels (a ``stride`` grid: the same exits at less work)."""
    pixels = 1.0 / getattr(points[0].policy, "stride", 1) ** 2
    try:
        point = choose_point(points, reference_miou, max_drop, cost, macs_budget)
        value = point.mean_macs if cost is None else cost(point)
        return (0, value, point.mean_macs, -point.accuracy, pixels), point
    except InputError:
        point = max(points, key=lambda p: (p.accuracy, -p.mean_macs))
        return (1, -point.accuracy, point.mean_macs, pixels), point


def choose_policy(summary: ExitSummary, exit_macs: Sequence[float],
                  policies: Sequence[ThresholdPolicy], reference_miou: float,
                  max_drop: float = 0.01, num_thresholds: int = 60,
                  cost: Callable[[OperatingPoint], float] | None = None,
                  macs_budget: float | None = None) -> OperatingPoint:
    """The policy and threshold of a model's exits chosen on ``summary`` (calibration) by the
    rule :func:`search_heads` applies to every head configuration (:func:`policy_score`).

    Raises:
        InputError: no policies, or one the summary has no statistic for.
    """
    if not policies:
        raise InputError("choose_policy needs at least one policy")
    scored = [policy_score(dense_sweep(summary, exit_macs, p, num=num_thresholds),
                           reference_miou, max_drop, cost, macs_budget) for p in policies]
    return min(scored, key=lambda sp: sp[0])[1]


@dataclass
class SearchResult:
    """The chosen exits and what every configuration tried gave on calibration
    (``calib_latency_ratio``: the expected batch-1 latency of the chosen point by the
    :class:`LatencyTable` the search minimised, when it had one)."""

    heads: list[dict]
    policy: ThresholdPolicy
    calib_miou: float
    calib_mean_macs: float
    exit_macs: list[float]
    tried: list[dict] = field(default_factory=list)
    calib_latency_ratio: float | None = None


def search_heads(bank: CandidateBank, summaries: Sequence[ExitSummary], final: ExitSummary,
                 stage_macs: Sequence[float], policies: Sequence[ThresholdPolicy],
                 reference_miou: float, max_drop: float = 0.01,
                 head_budget: float | None = None, max_heads: int | None = None,
                 num_thresholds: int = 40, latency: LatencyTable | None = None,
                 macs_budget: float | None = None) -> SearchResult:
    """Choose the number, placement and type of exit heads and the policy on calibration.

    Every configuration (at most one candidate per cut, at least one head, total head MACs
    within ``head_budget``) is swept; its score is the cheapest point whose calibration mIoU
    is within ``max_drop`` of ``reference_miou`` (and whose mean MACs are within
    ``macs_budget``, when given); when none is, the smallest drop. Cheapest means the fewest
    mean MACs or, given a ``latency`` table, the lowest expected batch-1 latency
    (:meth:`LatencyTable.expected`, then the fewer MACs). The configuration with the best
    score wins (:func:`policy_score`).

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
        heads = [bank.candidates[i] for i in chosen]
        cost = None if latency is None else (
            lambda p, h=heads: latency.expected(h, p.policy, p.exit_fractions))
        for policy in policies:
            points = dense_sweep(summary, exit_macs, policy, num=num_thresholds)
            score, point = policy_score(points, reference_miou, max_drop, cost, macs_budget)
            row = {"heads": heads, "policy": point.policy.config(),
                   "calib_miou": point.accuracy, "calib_mean_macs": point.mean_macs,
                   "head_macs": total_head, "meets_drop": score[0] == 0}
            if cost is not None:
                row["calib_latency_ratio"] = cost(point)
            tried.append(row)
            if best is None or score < best[0]:
                best = (score, chosen, point, exit_macs, row.get("calib_latency_ratio"))
    if best is None:
        raise InputError(f"no head configuration fits the head budget of {head_budget:.0f} "
                         f"MACs (cheapest head: {min(macs):.0f}); raise it")
    _, chosen, point, exit_macs, ratio = best
    return SearchResult([dict(bank.candidates[i]) for i in chosen], point.policy,
                        point.accuracy, point.mean_macs, exit_macs, tried, ratio)


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


def head_label(spec: Mapping) -> str:
    """A candidate as ``cut:kind,key=value,...`` (its keyword arguments in their order)."""
    return f"{spec['cut']}:{spec['kind']}" + "".join(
        f",{k}={v}" for k, v in spec.items() if k not in ("cut", "kind"))


def _segments(heads: Sequence[Mapping]) -> list[str]:
    """The pieces of the exit program with ``heads`` (in cut order), as table keys: each
    head's piece from the previous cut (or the input), then the final piece."""
    starts = ["input", *[h["cut"] for h in heads]]
    return [f"{a} > {head_label(h)}" for a, h in zip(starts, heads)] + [
        f"{starts[-1]} > final"]


@dataclass
class LatencyTable:
    """Measured batch-1 time of every piece a configuration of candidates can run, in
    :class:`~splitexit.segmentation.DenseSteps`' form (one ONNX Runtime call per piece,
    answering its exit test, uint8 class map and payload), as ratios of medians to the
    backbone in the same form (its batch-1 graph answering its class map), all timed
    interleaved in one run (:func:`measure_latency_table`). Medians, since a search ranks
    pieces that differ by a few microseconds and a shared machine's slow phases move means.

    Attributes:
        segments: ``"start > head"`` (``start``: ``input`` or the previous exit's cut;
            ``head``: :func:`head_label` or ``final``) -> ratio.
        tests: policy key (:func:`~splitexit.segmentation.sweep.policy_key`) -> the ratio its
            exit test adds over the test of ``policy``, the one the pieces were built with
            (each test timed as its own graph on a logit map; the call's overhead cancels).
        reference_ms: the backbone's median batch-1 milliseconds in the same run.
        mean_segments: the same pieces as ratios of means, for reports.
    """

    segments: dict[str, float]
    tests: dict[str, float]
    reference_ms: float
    policy: dict
    samples: int
    mean_segments: dict[str, float] = field(default_factory=dict)

    def expected(self, heads: Sequence[Mapping], policy: ThresholdPolicy,
                 fractions: Sequence[float]) -> float:
        """The mean batch-1 latency (ratio to the backbone) of the exit program with
        ``heads`` when ``fractions`` of the samples leave at each exit (the final one last):
        a sample leaving at exit ``i`` runs the pieces up to it.

        Raises:
            InputError: a piece or policy the table has not measured.
        """
        keys = _segments(heads)
        missing = [k for k in keys if k not in self.segments]
        if missing or policy_key(policy) not in self.tests:
            raise InputError(f"the latency table has no time for {missing or policy_key(policy)}"
                             "; measure it with measure_latency_table over these candidates "
                             "and policies")
        if len(fractions) != len(keys):
            raise InputError(f"{len(fractions)} exit fractions for {len(keys)} exits")
        test = self.tests[policy_key(policy)]
        pieces = [self.segments[k] + (test if i < len(heads) else 0.0)
                  for i, k in enumerate(keys)]
        return float(sum(f * t for f, t in zip(fractions, itertools.accumulate(pieces))))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> LatencyTable:
        return cls({k: float(v) for k, v in d["segments"].items()},
                   {k: float(v) for k, v in d["tests"].items()}, float(d["reference_ms"]),
                   dict(d["policy"]), int(d["samples"]),
                   {k: float(v) for k, v in d.get("mean_segments", {}).items()})


def measure_latency_table(bank: CandidateBank, model: MultiExitModel,
                          policies: Sequence[ThresholdPolicy], x: torch.Tensor,
                          directory: str | Path, threads: int = 1, chunks: int = 10
                          ) -> LatencyTable:
    """Time every piece a configuration of ``bank``'s candidates can run, and every policy's
    exit test, at batch 1 on ONNX Runtime (``threads`` intra-op threads), interleaved with
    the backbone over the samples ``x`` (:class:`LatencyTable`).

    Each candidate's piece is timed from the input and from every earlier cut, the final
    piece from every cut, each in the model :func:`assemble` builds (weights do not change
    the time) exported as :class:`~splitexit.segmentation.DenseSteps` pieces with
    ``policies[0]``.
    """
    from ..measure import interleaved_latency, torch_threads
    from ..optimize import fuse_for_inference
    from ..runtime.ort import OrtSession
    from .onnx_steps import DenseSteps, exit_test_graph

    if not policies:
        raise InputError("measure_latency_table needs at least one policy")
    directory = Path(directory)
    one, first = x[:1].numpy(), policies[0]

    def calls(heads: list, name: str) -> list:
        fused = fuse_for_inference(assemble(bank, model, heads))
        return DenseSteps(fused, first, directory / name, example=x[:2]).step_calls(one)

    fns = {"reference": calls([], "reference")[0]}
    cuts = sorted(set(bank._stage_of))
    for i, spec in enumerate(bank.candidates):
        k = bank._stage_of[i]
        single = calls([spec], f"c{i}")
        fns.setdefault(f"input > {head_label(spec)}", single[0])
        fns.setdefault(f"{spec['cut']} > final", single[1])
        for j in (c for c in cuts if c < k):  # after any head at an earlier cut
            before = bank.candidates[bank._stage_of.index(j)]
            fns.setdefault(f"{before['cut']} > {head_label(spec)}",
                           calls([before, spec], f"c{i}_after{j}")[1])
    with torch.no_grad():  # a real logit map (ArgMax's branches see real data)
        logits = {"logits": bank.eval()(x[:1])[0].numpy()}
    shape = logits["logits"].shape
    tests = {}
    for p in policies:
        key = policy_key(p)
        if key not in tests:
            session = OrtSession(exit_test_graph(p, 0, shape, directory / f"test{len(tests)}.onnx"),
                                 threads=threads)
            tests[key] = (lambda r=session._sess_run, o=list(session.output_names):
                          r(o, logits, None))
    fns.update({f"test: {k}": v for k, v in tests.items()})
    with torch_threads(threads):
        lat = interleaved_latency({k: (lambda b, c=c: c()) for k, c in fns.items()}, x,
                                  chunks=chunks)
    pieces = [k for k in lat if k != "reference" and not k.startswith("test: ")]

    def ratios(stat: str) -> dict[str, float]:
        return {k: lat[k][stat] / lat["reference"][stat] for k in pieces}

    ref = lat["reference"]["median_ms"]
    base = lat[f"test: {policy_key(first)}"]["median_ms"]
    return LatencyTable(ratios("median_ms"),
                        {k: (lat[f"test: {k}"]["median_ms"] - base) / ref for k in tests}, ref,
                        first.config(), len(x), ratios("mean_ms"))
