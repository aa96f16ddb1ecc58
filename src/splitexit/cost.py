"""The cost table: MACs, parameters, bytes and measured latency per stage, head and cut.

Measured once per model and read by calibration, the split planner, reports and benchmarks.
MACs come from torch's own ``torch.utils.flop_counter`` (FLOPs / 2, counting the matrix and
convolution work that dominates); latency is the median of repeats on this machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .measure import measure_latency
from .stages import Payload, StagedModel, payload_nbytes

__all__ = ["CostTable", "count_macs", "param_bytes", "cost_table", "mean_macs"]


def count_macs(fn: Callable[[], object]) -> float:
    """MACs of one call of ``fn`` (FLOPs counted by torch, divided by 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2


def param_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (dense)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class PartCost:
    """Cost of one stage or head, per sample."""

    name: str
    macs: float
    params: int
    param_bytes: int
    latency_b1_s: float | None = None
    latency_batched_s: float | None = None  # per batch of `batch_size`


@dataclass
class CostTable:
    """Per-sample costs of a (multi-exit) model.

    Attributes:
        stages: one entry per backbone stage.
        heads: one entry per exit head (empty for a plain backbone).
        cut_payload_bytes: raw (fp32) payload bytes per sample at each cut.
        exit_macs: MACs to reach and decide at each exit (stages up to it plus all heads
            evaluated so far); the last entry is a sample that runs to the end.
        exit_latency_b1_s: the same, in measured batch-1 seconds, when latency was measured.
    """

    stages: list[PartCost]
    heads: list[PartCost]
    cut_names: list[str]
    cut_payload_bytes: list[int]
    input_bytes: int
    exit_macs: list[float]
    backbone_macs: float
    exit_latency_b1_s: list[float] | None = None
    batch_size: int = 256
    extra: dict = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        return sum(p.params for p in self.stages + self.heads)

    @property
    def total_param_bytes(self) -> int:
        return sum(p.param_bytes for p in self.stages + self.heads)

    def device_macs(self, cut: int) -> float:
        """Backbone MACs up to and including stage ``cut``."""
        return sum(s.macs for s in self.stages[: cut + 1])

    def to_dict(self) -> dict:
        return asdict(self)


def mean_macs(exit_index: torch.Tensor, exit_macs: Sequence[float]) -> float:
    """Mean MACs per sample of an exit assignment."""
    table = torch.tensor(list(exit_macs), dtype=torch.float64)
    return float(table[exit_index].mean())


def _stage_inputs(model: StagedModel, x: torch.Tensor) -> list[Payload]:
    inputs, payload = [], x
    with torch.no_grad():
        for stage in model.stages:
            inputs.append(payload)
            payload = stage(payload)
    return inputs


def cost_table(model: nn.Module, example: torch.Tensor, measure: bool = True,
               batch_size: int = 256, repeats: int = 20) -> CostTable:
    """Build the cost table of a :class:`StagedModel` or :class:`MultiExitModel`.

    Args:
        model: the model, in eval mode while measuring.
        example: a batch of real inputs (at least one sample; ``batch_size`` rows are reused
            cyclically for the batched timing).
        measure: also time every stage and head at batch 1 and at ``batch_size``.
    """
    from .multiexit import MultiExitModel

    multi = isinstance(model, MultiExitModel)
    backbone: StagedModel = model.backbone if multi else model
    was_training = model.training
    model.eval()
    one = example[:1]
    reps = (batch_size + len(example) - 1) // len(example)
    batch = example.repeat(reps, *([1] * (example.dim() - 1)))[:batch_size]
    inputs_1 = _stage_inputs(backbone, one)
    inputs_b = _stage_inputs(backbone, batch) if measure else None

    def timed(fn_1, fn_b) -> tuple[float | None, float | None]:
        if not measure:
            return None, None
        return measure_latency(fn_1, repeats), measure_latency(fn_b, max(3, repeats // 4))

    stages = []
    for i, stage in enumerate(backbone.stages):
        macs = count_macs(lambda s=stage, p=inputs_1[i]: s(p))
        lat = timed(lambda s=stage, p=inputs_1[i]: s(p),
                    lambda s=stage, p=(inputs_b[i] if inputs_b else None): s(p))
        stages.append(PartCost(stage.name if hasattr(stage, "name") else f"stage{i}", macs,
                               sum(p.numel() for p in stage.parameters()), param_bytes(stage),
                               *lat))
    heads = []
    if multi:
        for e, head in enumerate(model.heads):
            k = model.exit_stages[e]
            with torch.no_grad():
                feat_1 = backbone.stages[k](inputs_1[k])
                feat_b = backbone.stages[k](inputs_b[k]) if inputs_b else None
                logits_1 = torch.zeros(1, _num_classes(model, feat_1, e))
            prev_1 = logits_1
            prev_b = logits_1.expand(batch_size, -1) if inputs_b else None

            def call(f, prev, e=e):
                return model.run_head(e, f, prev)

            macs = count_macs(lambda f=feat_1, p=prev_1: call(f, p))
            lat = timed(lambda f=feat_1, p=prev_1: call(f, p),
                        lambda f=feat_b, p=prev_b: call(f, p))
            heads.append(PartCost(model.head_cuts[e], macs,
                                  sum(p.numel() for p in head.parameters()), param_bytes(head),
                                  *lat))
    cut_bytes = [payload_nbytes(p) for p in inputs_1[1:]]
    stage_macs = [s.macs for s in stages]
    exit_stages = model.exit_stages if multi else [len(stages) - 1]
    exit_macs, exit_lat = [], []
    for e, k in enumerate(exit_stages):
        heads_so_far = heads[: e + 1] if e < len(heads) else heads
        exit_macs.append(sum(stage_macs[: k + 1]) + sum(h.macs for h in heads_so_far))
        if measure:
            exit_lat.append(sum(s.latency_b1_s for s in stages[: k + 1])
                            + sum(h.latency_b1_s for h in heads_so_far))
    model.train(was_training)
    return CostTable(stages, heads, list(backbone.cut_names), cut_bytes,
                     payload_nbytes(one), exit_macs, sum(stage_macs),
                     exit_lat if measure else None, batch_size)


def _num_classes(model, features: torch.Tensor, e: int) -> int:
    head = model.heads[e]
    if hasattr(head, "num_classes"):
        return head.num_classes
    return model.run_head(e, features, None).shape[1]
