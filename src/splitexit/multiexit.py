"""MultiExitModel: a staged backbone with exit heads at cuts, exiting for real per sample.

``forward`` returns every exit's logits (training, offline analysis). ``infer`` runs stage by
stage and removes the samples that exit from the batch, so compute really shrinks; it agrees
exactly with ``simulate``, which replays the same policy over ``forward``'s logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError
from .policies import ExitPolicy
from .stages import Payload, StagedModel, payload_select, payload_tensors

__all__ = ["MultiExitModel", "ExitResult", "check_input"]


def check_input(x: torch.Tensor, input_shape: Sequence[int] | None = None) -> None:
    """Raise a clear :class:`InputError` for a wrong type, dtype, shape or non-finite input."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a torch.Tensor batch, got {type(x).__name__}; "
                         "convert with torch.as_tensor(x, dtype=torch.float32)")
    if not x.is_floating_point():
        raise InputError(f"expected a floating-point batch, got dtype {x.dtype}; scale images "
                         "to [0, 1] and convert with x.float() / 255")
    if input_shape is not None:
        want = tuple(input_shape)
        if x.dim() == len(want):
            raise InputError(f"expected a batch of shape (N, {', '.join(map(str, want))}), got "
                             f"{tuple(x.shape)}; add the batch dimension with x.unsqueeze(0)")
        if tuple(x.shape[1:]) != want:
            raise InputError(f"expected a batch of shape (N, {', '.join(map(str, want))}), "
                             f"got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("empty batch: pass at least one sample")
    if not torch.isfinite(x).all():
        raise InputError("input contains NaN or infinite values; clean or impute them first")


@dataclass
class ExitResult:
    """Per-sample outcome of early-exit inference.

    Attributes:
        predictions: predicted class per sample.
        exit_index: index of the exit each sample left at (``num_exits - 1`` is the final one).
        logits: the logits each prediction came from.
    """

    predictions: torch.Tensor
    exit_index: torch.Tensor
    logits: torch.Tensor

    def exit_fractions(self, num_exits: int) -> list[float]:
        counts = torch.bincount(self.exit_index, minlength=num_exits).double()
        return (counts / max(1, len(self.exit_index))).tolist()

    def accuracy(self, labels: torch.Tensor) -> float:
        return float((self.predictions == labels).double().mean())


class MultiExitModel(nn.Module):
    """A :class:`StagedModel` backbone plus exit heads at some of its cuts.

    The backbone's own output is the final exit. Heads are given by cut name.

    Args:
        backbone: the staged network; its output are the final logits.
        heads: ``{cut_name: head}``; each head maps the payload at its cut to logits.
        input_shape: per-sample input shape; inputs are checked against it when given.

    Example:
        >>> model = MultiExitModel(staged, {"layer1": LinearHead((16, 8, 8), 10)})
        >>> result = model.infer(x, MaxProb(0.9))
        >>> result.exit_index  # where each sample left
    """

    def __init__(self, backbone: StagedModel, heads: Mapping[str, nn.Module] | Iterable,
                 input_shape: Sequence[int] | None = None):
        super().__init__()
        self.backbone = backbone
        items = list(heads.items()) if isinstance(heads, Mapping) else list(heads)
        items.sort(key=lambda kv: backbone.cut_index(kv[0]))
        cuts = [c for c, _ in items]
        if len(set(cuts)) != len(cuts):
            raise InputError(f"one head per cut, got {cuts}")
        self.head_cuts: list[str] = cuts
        self.heads = nn.ModuleList([h for _, h in items])
        self.exit_stages = [backbone.cut_index(c) for c in cuts] + [backbone.num_stages - 1]
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    @property
    def num_exits(self) -> int:
        return len(self.heads) + 1

    @property
    def exit_names(self) -> list[str]:
        return [*self.head_cuts, "final"]

    def _features(self, e: int, payload: Payload) -> torch.Tensor:
        if isinstance(payload, tuple):
            if len(payload) == 1:
                return payload[0]
            raise InputError(
                f"the cut {self.head_cuts[e]!r} carries {len(payload)} tensors (it lies inside "
                "a block); attach exit heads at single-tensor cuts, e.g. after a whole block")
        return payload

    def run_head(self, e: int, payload: Payload, previous: torch.Tensor | None) -> torch.Tensor:
        head = self.heads[e]
        features = self._features(e, payload)
        if getattr(head, "uses_previous", False):
            return head(features, None if previous is None else previous.detach())
        return head(features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, in order (the last is the backbone's own output)."""
        outs: list[torch.Tensor] = []
        payload: Payload = x
        e = 0
        for k, stage in enumerate(self.backbone.stages):
            payload = stage(payload)
            while e < len(self.heads) and self.exit_stages[e] == k:
                outs.append(self.run_head(e, payload, outs[-1] if outs else None))
                e += 1
        outs.append(payload_tensors(payload)[0])
        return outs

    @torch.inference_mode()
    def infer(self, x: torch.Tensor, policy: ExitPolicy) -> ExitResult:
        """Early-exit inference for real: exited samples leave the batch.

        Raises:
            InputError: wrong type, dtype, shape, or non-finite input.
        """
        check_input(x, self.input_shape)
        n = x.shape[0]
        active = torch.arange(n)
        predictions = torch.empty(n, dtype=torch.long)
        exit_index = torch.empty(n, dtype=torch.long)
        out_logits: torch.Tensor | None = None
        state: dict | None = None
        previous: torch.Tensor | None = None
        payload: Payload = x
        e = 0
        last = self.num_exits - 1
        for k, stage in enumerate(self.backbone.stages):
            payload = stage(payload)
            while e <= last and self.exit_stages[e] == k:
                logits = (self.run_head(e, payload, previous) if e < last
                          else payload_tensors(payload)[0])
                if state is None:
                    state = policy.init_state(n, logits.shape[1])
                    out_logits = torch.empty(n, logits.shape[1], dtype=logits.dtype)
                fire, decision = policy.decide(e, logits, state)
                # one host sync per exit: how many leave now (all of them at the final exit)
                leaving = len(active) if e == last else int(fire.sum())
                if leaving == len(active):  # everyone left: no selection needed
                    predictions[active] = decision.argmax(dim=1)
                    exit_index[active] = e
                    out_logits[active] = decision.to(out_logits.dtype)
                    return ExitResult(predictions, exit_index, out_logits)
                if leaving:
                    rows = active[fire]
                    predictions[rows] = decision[fire].argmax(dim=1)
                    exit_index[rows] = e
                    out_logits[rows] = decision[fire].to(out_logits.dtype)
                    keep = ~fire
                    active = active[keep]
                    payload = payload_select(payload, keep)
                    state = {name: v[keep] for name, v in state.items()}
                    logits = logits[keep]
                previous = logits
                e += 1
        raise AssertionError("unreachable: the final exit takes every remaining sample")

    @torch.no_grad()
    def simulate(self, logits: Sequence[torch.Tensor], policy: ExitPolicy) -> ExitResult:
        """Replay ``policy`` offline over every exit's logits (as returned by ``forward``)."""
        if len(logits) != self.num_exits:
            raise InputError(f"expected logits of {self.num_exits} exits, got {len(logits)}")
        return simulate_exits(logits, policy)

    @torch.no_grad()
    def collect_logits(self, x: torch.Tensor, batch_size: int = 512) -> list[torch.Tensor]:
        """Every exit's logits over a data set, in batches (eval mode)."""
        was_training = self.training
        self.eval()
        chunks = [self(x[i: i + batch_size]) for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return [torch.cat([c[e] for c in chunks]) for e in range(self.num_exits)]


def simulate_exits(logits: Sequence[torch.Tensor], policy: ExitPolicy) -> ExitResult:
    """Offline replay of a policy over per-exit logits ``[(N, C), ...]``."""
    n, c = logits[0].shape
    state = policy.init_state(n, c)
    decided = torch.zeros(n, dtype=torch.bool)
    predictions = torch.empty(n, dtype=torch.long)
    exit_index = torch.empty(n, dtype=torch.long)
    out = torch.empty(n, c, dtype=logits[0].dtype)
    last = len(logits) - 1
    for e, lg in enumerate(logits):
        fire, decision = policy.decide(e, lg, state)
        new = ~decided if e == last else fire & ~decided
        predictions[new] = decision[new].argmax(dim=1)
        exit_index[new] = e
        out[new] = decision[new].to(out.dtype)
        decided |= new
        if bool(decided.all()):
            break
    return ExitResult(predictions, exit_index, out)
